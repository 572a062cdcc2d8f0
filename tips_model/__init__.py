"""tips_model: pure-PyTorch TIPS / TIPSv2 encoders, losses and objectives (no Ray, no I/O
beyond checkpoint files)."""
