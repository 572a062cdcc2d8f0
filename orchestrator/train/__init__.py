"""Training: the Ray Train driver, the per-worker loop and what the loop is made of.

    driver.py    fit(cfg): preflight checks, the TorchTrainer, failure handling (driver side)
    loop.py      train_loop_per_worker: the step, checkpoints, metrics (worker side)
    state.py     checkpoint directories on disk and storage; finding the newest good one
    optim.py     AdamW / Adafactor, parameter groups, LR / WD / momentum schedules
    adafactor.py the Adafactor optimizer (big_vision's variant)
    parallel.py  DDP / FSDP wrapping, gathering full state for checkpoints
    metrics.py   metrics history, the progress line, collapse monitoring
    loggers.py   experiment trackers (TensorBoard, MLflow, W&B) fed by rank 0
    xla.py       torch_xla (TPU): the Ray Train backend and the loop's XlaStrategy

Submodules are imported where used: ``driver`` pulls in Ray, the rest only torch.
"""
