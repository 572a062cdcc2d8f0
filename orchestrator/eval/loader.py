"""Load the encoders to evaluate: from our training checkpoints or the released TIPS files.

Contract: ``load_encoders(spec) -> Encoders(vision, text, tokenizer, temperature, source)``,
in eval mode. ``spec`` is one of

* a checkpoint: a ``checkpoint_<step:08d>/`` directory (``model.pt`` = the objective's
  state dict, ``config.yaml`` = the resolved run config; docs/design.md, "Checkpoints"),
  a run directory holding several (the highest step is taken), or its ``model.pt``; a
  sharded checkpoint (DCP shards, ``train.checkpoint_format=sharded``) is read whole;
  local or ``s3://`` (copied to a temporary directory first). The objective is rebuilt
  from ``config.yaml`` and loaded strictly; ``which="student"`` takes the student's towers,
  ``which="teacher"`` the EMA vision tower of a full-EMA run (text stays the student's);
* ``released=<vision.npz>,<text.npz>,<variant>[,<tokenizer.model>]``: the authors' PyTorch
  files (docs/method.md, "Released checkpoint files") through
  ``tips_model.checkpoints.load_released``; the SentencePiece model defaults to
  ``tokenizer.model`` beside the text file (docs/method.md, "Tokenizer").
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


class LoadError(ValueError):
    """A checkpoint or released model cannot be found or does not load; names the path."""


@dataclass
class Encoders:
    """The towers an evaluation needs.

    Attributes:
        vision: image tower, ``forward(images) -> EncoderOutput``.
        text: text tower, ``forward(ids [B,T]) -> [B,D]``.
        tokenizer: ``tokenizer(list[str]) -> int64 [B,T]``.
        temperature: contrastive temperature (logits = cosine / temperature).
        source: where they came from (for reports).
    """

    vision: nn.Module
    text: nn.Module | None  # None for vision-only objectives (MUG): only vision tasks run
    tokenizer: Any
    temperature: float
    source: str = ""

    def to(self, device: torch.device | str) -> Encoders:
        self.vision.to(device)
        if self.text is not None:
            self.text.to(device)
        return self

    def eval(self) -> Encoders:
        self.vision.eval()
        if self.text is not None:
            self.text.eval()
        return self


def encoders_from_objective(
    objective: nn.Module, tokenizer: Any, which: str = "student", source: str = ""
) -> Encoders:
    """Pick the towers out of a TIPS-style objective (``student.vision/.text/.temperature``).

    Raises:
        LoadError: ``which="teacher"`` on an objective without an EMA vision tower.
    """
    student = objective.student
    if which == "student":
        vision = student.vision
    elif which == "teacher":
        teacher = getattr(objective, "teacher", None)
        if teacher is None or "vision" not in teacher:
            raise LoadError(
                f"{source or 'objective'}: which=teacher needs a full-EMA run (objective.teacher="
                "full_ema); this one keeps no EMA vision tower"
            )
        vision = teacher["vision"]
    else:
        raise LoadError(f"which must be 'student' or 'teacher', got {which!r}")
    text = getattr(student, "text", None)
    temp_module = getattr(student, "temperature", None)
    temperature = float(temp_module().detach()) if temp_module is not None else 1.0
    return Encoders(vision, text, tokenizer, temperature, source).eval()


def _fetch(uri: str) -> Path:
    """A local path for ``uri``; ``s3://`` URIs are copied into a temporary directory
    through ``orchestrator.storage`` (its endpoint override and region settings)."""
    import pyarrow.fs as pafs

    from orchestrator import storage

    if not storage.is_s3(uri):
        return Path(uri).expanduser()
    fs, path = storage.filesystem(uri)
    local = Path(tempfile.mkdtemp(prefix="tips_eval_ckpt_"))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise LoadError(f"{uri}: not found")
    if info.type == pafs.FileType.File:
        dest = local / Path(path).name
        pafs.copy_files(path, str(dest), source_filesystem=fs)
        return dest
    if fs.get_file_info(f"{path.rstrip('/')}/model.pt").type != pafs.FileType.File:
        # A run directory: copy only its latest checkpoint, not every one.
        subdirs = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        ckpts = [
            i.path
            for i in subdirs
            if i.type == pafs.FileType.Directory and _CKPT_RE.match(Path(i.path).name)
        ]
        if ckpts:
            path = max(ckpts, key=lambda p: int(_CKPT_RE.match(Path(p).name).group(1)))
            local = local / Path(path).name
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs)
    logger.info("copied %s to %s", uri, local)
    return local


def find_checkpoint(path: Path) -> Path:
    """The checkpoint directory for a checkpoint dir, its model.pt, or a run directory.

    Raises:
        LoadError: nothing with a model.pt and config.yaml is found.
    """
    if path.is_file() and path.name == "model.pt":
        path = path.parent
    if _has_weights(path):
        if not (path / "config.yaml").is_file():
            raise LoadError(f"{path}: has model.pt but no config.yaml (the resolved run config)")
        return path
    if path.is_dir():
        found = [
            p for p in path.rglob("checkpoint_*") if _CKPT_RE.match(p.name) and _has_weights(p)
        ]
        if found:
            best = max(found, key=lambda p: (int(_CKPT_RE.match(p.name).group(1)), str(p)))
            logger.info("%s: using the latest checkpoint %s", path, best.name)
            return find_checkpoint(best)
    raise LoadError(
        f"{path}: not a checkpoint; expected a checkpoint_<step>/ directory with model.pt and "
        "config.yaml, its model.pt, or a run directory containing such directories"
    )


def _has_weights(path: Path) -> bool:
    """``model.pt``, or a sharded checkpoint's DCP index (orchestrator/train/checkpoint.py)."""
    return (path / "model.pt").is_file() or (path / ".metadata").is_file()


def _model_state(ckpt: Path) -> dict:
    """``model.pt``, or the model part of a sharded checkpoint read whole in this process."""
    from tips_model.checkpoints import load_state_dict

    if (ckpt / "model.pt").is_file():
        return load_state_dict(ckpt / "model.pt")
    from orchestrator.train.checkpoint import read_full_state

    return read_full_state(str(ckpt))["model"]


def load_checkpoint(uri: str, which: str = "student") -> Encoders:
    """Rebuild the objective from ``config.yaml`` and load ``model.pt`` (strict)."""
    import yaml

    from orchestrator import config as config_lib
    from tips_model.objectives import build_objective
    from tips_model.tokenizer import build_tokenizer

    ckpt = find_checkpoint(_fetch(uri))
    try:
        cfg = config_lib.from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    except config_lib.ConfigError as e:
        raise LoadError(f"{ckpt / 'config.yaml'}: {e}") from e
    m = cfg.model
    tokenizer = build_tokenizer(m.tokenizer, path=m.tokenizer_path, max_len=m.max_text_len)
    objective = build_objective(cfg.objective, m, vocab_size=tokenizer.vocab_size)
    state = _model_state(ckpt)
    try:
        objective.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LoadError(f"{ckpt / 'model.pt'} does not match config.yaml's model: {e}") from e
    return encoders_from_objective(objective, tokenizer, which=which, source=str(uri))


def parse_released(spec: str) -> tuple[str, str, str, str | None]:
    """``"v.npz,t.npz,B[,tokenizer.model]"`` -> (vision, text, variant, tokenizer or None)."""
    parts = [p.strip() for p in spec.strip("[]").split(",") if p.strip()]
    if len(parts) not in (3, 4):
        raise LoadError(
            f"released={spec!r}: expected <vision.npz>,<text.npz>,<variant>[,<tokenizer.model>]"
        )
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else None


def load_released_encoders(spec: str) -> Encoders:
    """Load the authors' released ``.npz`` files and their SentencePiece tokenizer."""
    from tips_model.checkpoints import load_released
    from tips_model.tokenizer import build_tokenizer

    vision_npz, text_npz, variant, tok_path = parse_released(spec)
    tok = Path(tok_path) if tok_path else Path(text_npz).parent / "tokenizer.model"
    if not tok.is_file():
        raise LoadError(
            f"released model tokenizer not found at {tok}; pass it as the 4th element: "
            "released=<vision.npz>,<text.npz>,<variant>,<tokenizer.model>"
        )
    model = load_released(vision_npz, text_npz, variant)
    # 64 tokens: docs/method.md, "Tokenizer"
    tokenizer = build_tokenizer("sentencepiece", path=str(tok), max_len=64)
    return Encoders(model.vision, model.text, tokenizer, model.temperature, f"released={spec}")


def load_encoders(spec: str, which: str = "student") -> Encoders:
    """Load encoders from a checkpoint URI or ``released=...`` (see the module docstring)."""
    if spec.startswith("released="):
        return load_released_encoders(spec.split("=", 1)[1])
    return load_checkpoint(spec, which=which)
