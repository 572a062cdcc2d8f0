"""tips_model: pure-PyTorch TIPS / TIPSv2 encoders, losses and objectives.

No Ray, no I/O beyond checkpoint files. The public names are re-exported here; objectives
live in ``tips_model.objectives`` (``build_objective``, ``list_objectives``).
"""

from tips_model.checkpoints import CheckpointError, ReleasedTIPS, export_released, load_released
from tips_model.text import TextTransformer, build_text
from tips_model.tokenizer import Tokenizer, build_tokenizer
from tips_model.vision import EncoderOutput, VisionTransformer, build_vision

__all__ = [
    "CheckpointError",
    "EncoderOutput",
    "ReleasedTIPS",
    "TextTransformer",
    "Tokenizer",
    "VisionTransformer",
    "build_text",
    "build_tokenizer",
    "build_vision",
    "export_released",
    "load_released",
]
