"""Device, precision, batching and preprocessing shared by the evaluation tasks.

Contract: images enter as uint8 [H, W, 3] numpy arrays (from a reader's ``Split``) and reach
the model as float [B, 3, S, S] in [0, 1] with no mean/std normalisation here
(docs/method.md, "Input pixels").
Global tasks resize the short side to S (bicubic, antialiased) and centre-crop; dense tasks
resize the whole image to S x S and compare predictions at the label's own resolution.
On CUDA the encoders run under bf16 autocast; on CPU in fp32. Features leave as fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from orchestrator.eval.readers.base import Split


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU evaluation runs fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def native_size(vision: nn.Module) -> int:
    """The side the vision tower's position grid was trained at (patch * grid)."""
    grid = getattr(vision, "grid_size", None)
    return int(grid * vision.patch_size) if grid else 224


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return torch.tensor(img, dtype=torch.float32).permute(2, 0, 1).div_(255.0)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of [B, 3, H, W] (or [3, H, W]) images, clamped to [0, 1]."""
    squeeze = x.ndim == 3
    x = x.unsqueeze(0) if squeeze else x
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return x[0] if squeeze else x


def center_crop_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side of [3, H, W] to ``size``, then centre-crop to size x size."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = resize(x, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size]


def index_batches(n: int, batch_size: int) -> Iterator[list[int]]:
    for start in range(0, n, batch_size):
        yield list(range(start, min(start + batch_size, n)))


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar over images (disabled in periodic evaluation)."""
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def stack_images(
    split: Split, indices: Sequence[int], prep: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """[B, 3, S, S] float batch of ``prep(to_tensor(image))`` for the given indices."""
    return torch.stack([prep(to_tensor(split.image(i))) for i in indices])


@torch.no_grad()
def encode_images(
    vision: nn.Module,
    split: Split,
    size: int,
    batch_size: int,
    cls: str = "alt",
    desc: str = "encode",
    show_progress: bool = True,
) -> torch.Tensor:
    """Global image embeddings (one CLS token) for a whole split.

    Args:
        vision: the image tower (``forward -> EncoderOutput``).
        split: images to encode.
        size: square input side (short-side resize + centre crop).
        batch_size: images per forward pass.
        cls: "alt" (``cls_alt``, TIPS's choice for zero-shot) or "syn" (``cls_syn``).
        desc: progress-bar label.
        show_progress: draw a progress bar.

    Returns:
        [N, D] float32 on CPU, L2-normalised.
    """
    if cls not in ("alt", "syn"):
        raise ValueError(f"cls must be 'alt' or 'syn', got {cls!r}")
    device = model_device(vision)
    out = []
    with progress(len(split), desc, show_progress) as bar:
        for idx in index_batches(len(split), batch_size):
            x = stack_images(split, idx, lambda t: center_crop_square(t, size)).to(device)
            with autocast(device):
                enc = vision(x)
            emb = enc.cls_alt if cls == "alt" else enc.cls_syn
            out.append(F.normalize(emb.float(), dim=-1).cpu())
            bar.update(len(idx))
    return torch.cat(out) if out else torch.zeros(0, getattr(vision, "embed_dim", 0))


@torch.no_grad()
def encode_texts(
    text: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """[T, D] float32 L2-normalised text embeddings on CPU."""
    device = model_device(text)
    out = []
    for start in range(0, len(texts), batch_size):
        ids = torch.as_tensor(tokenizer(list(texts[start : start + batch_size])), device=device)
        with autocast(device):
            emb = text(ids)
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode, restoring each one's previous mode afterwards (None: skip)."""
    modules = tuple(m for m in modules if m is not None)
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, t in zip(modules, was):
            m.train(t)
