"""Checkpoint files: our own state dicts, and import/export of the released TIPS weights.

Contracts:

* ``save_state_dict(obj, path)`` writes atomically (temp file in the same directory, fsync,
  ``os.replace``); ``load_state_dict(path)`` reads it back on CPU (``weights_only=True``).
* ``load_released(vision_npz, text_npz, variant) -> ReleasedTIPS`` imports the authors' PyTorch
  ``.npz`` files (TIPS v1 and TIPSv2; flat dicts keyed by ``state_dict`` names,
  docs/method.md, "Released checkpoint files") into our ``VisionTransformer`` /
  ``TextTransformer``; ``export_released`` writes the same format, so export -> import is
  bit-exact.

Released-file facts (docs/method.md, "Released checkpoint files"; google-deepmind/tips
``pytorch/run_image_encoder_inference.py``, ``pytorch/run_text_encoder_inference.py``,
``pytorch/TIPS_zeroshot_segmentation.ipynb``): the vision model is built with LayerScale
(``init_values=1.0``), exact-erf GELU, LayerNorm eps 1e-6, SwiGLU only for g, ``img_size`` 448
(224 for g14-LR); the text model with vocab 32000 and LayerNorm eps 1e-5; the text file carries
``temperature`` (and sometimes ``temperature_contrastive``), popped before a strict load. The
grid size is inferred here from ``pos_embed`` (1 + G*G rows, img_size = G*14) and the depth from
the block keys, so files with fewer blocks (our tests) load too; widths are checked against the
variant table.

Names (``REFERENCE_NAMES``): parameter names are identical to the reference in both towers; only
the text file's ``temperature`` scalar is extra. Outputs map as ``cls_alt`` <->
``x_norm_1st_clstoken`` (reference token 0, the ``cls_token``) and ``cls_syn`` <->
``x_norm_2nd_clstoken`` (reference token 1, implemented as its single register token),
``patch_tokens`` <-> ``x_norm_patchtokens`` (docs/method.md, "Two CLS tokens"; reference
``image_encoder.py forward_features``).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from tips_model.text import TextTransformer, build_text
from tips_model.vision import EncoderOutput, VisionTransformer, build_vision

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model it feeds."""


# ---- our own state ---------------------------------------------------------------------------


def _write_atomically(path: PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` to a temp file beside ``path``, fsync, then ``os.replace`` onto ``path``
    (a reader never sees a partial file; the temp file is removed on any failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(obj: dict[str, Any], path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (a reader never sees a partial file)."""
    _write_atomically(path, lambda f: torch.save(obj, f))


def load_state_dict(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a file written by ``save_state_dict`` (tensors, numbers, strings, containers)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file not found: {path}") from e


# ---- the reference's names -------------------------------------------------------------------

# Output names of the reference's ``forward_features`` <-> our EncoderOutput fields.
REFERENCE_OUTPUTS: dict[str, str] = {
    "cls_alt": "x_norm_1st_clstoken",  # token 0, reference ``cls_token``; web alt-text
    "cls_syn": "x_norm_2nd_clstoken",  # token 1, reference ``register_tokens``; synthetic caption
    "patch_tokens": "x_norm_patchtokens",
}
TEXT_SCALARS = ("temperature", "temperature_contrastive")  # in released text files only


def to_reference_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Our parameter names -> the reference's (identity for both towers).

    docs/method.md, "Released checkpoint files".
    """
    return dict(state)


def from_reference_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Reference parameter names -> ours, dropping the text file's temperature scalars."""
    return {k: v for k, v in state.items() if k not in TEXT_SCALARS}


def encoder_output_to_reference(out: EncoderOutput) -> dict[str, Tensor]:
    """EncoderOutput -> the reference's ``forward_features`` dict (CLS as [B,1,D])."""
    return {
        REFERENCE_OUTPUTS["cls_alt"]: out.cls_alt[:, None],
        REFERENCE_OUTPUTS["cls_syn"]: out.cls_syn[:, None],
        REFERENCE_OUTPUTS["patch_tokens"]: out.patch_tokens,
    }


def encoder_output_from_reference(feats: Mapping[str, Tensor]) -> EncoderOutput:
    """The reference's ``forward_features`` dict -> EncoderOutput."""
    patches = feats[REFERENCE_OUTPUTS["patch_tokens"]]
    d = patches.shape[-1]
    return EncoderOutput(
        cls_alt=feats[REFERENCE_OUTPUTS["cls_alt"]].reshape(-1, d),
        cls_syn=feats[REFERENCE_OUTPUTS["cls_syn"]].reshape(-1, d),
        patch_tokens=patches,
    )


# ---- released TIPS weights -------------------------------------------------------------------

# variant -> (vision factory, text factory); README / run_image_encoder_inference.py choices.
VARIANTS: dict[str, tuple[str, str]] = {
    "S": ("vit_s14", "text_s"),
    "B": ("vit_b14", "text_b"),
    "L": ("vit_l14", "text_l"),
    "So400m": ("vit_so400m14", "text_so400m"),
    "g": ("vit_g14", "text_g"),
}
_VARIANT_ALIASES = {"s": "S", "b": "B", "l": "L", "so400m": "So400m", "so": "So400m", "g": "g"}
RELEASED_PATCH = 14
RELEASED_VOCAB = 32000


def canonical_variant(variant: str) -> str:
    """'b' / 'B' -> 'B', 'so400m' / 'So' -> 'So400m' (case-insensitive)."""
    key = _VARIANT_ALIASES.get(str(variant).lower())
    if key is None:
        raise ValueError(f"unknown TIPS variant {variant!r}; known: {', '.join(VARIANTS)}")
    return key


class ReleasedTIPS(nn.Module):
    """A released TIPS model: ``.vision(images) -> EncoderOutput``, ``.text(ids) -> [B,D]``.

    Attributes:
        vision: the image tower.
        text: the text tower.
        temperature: contrastive temperature (logits = cosine / temperature;
            docs/method.md, "Similarity and temperature").
        variant: "S", "B", "L", "So400m" or "g" (None when unknown).
    """

    def __init__(
        self,
        vision: VisionTransformer,
        text: TextTransformer,
        temperature: float,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.temperature = float(temperature)
        self.variant = variant


def _read_npz(path: PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise CheckpointError(f"released checkpoint not found: {path}") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as an .npz file: {e}") from e


def _count_blocks(keys: list[str], pattern: str, path: PathLike) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not idx:
        raise CheckpointError(f"{path}: no block keys matching {pattern!r}")
    if idx != set(range(len(idx))):
        raise CheckpointError(f"{path}: block indices are not 0..n-1: {sorted(idx)}")
    return len(idx)


def check_state_shapes(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key.

    Args:
        expected: key -> shape the model needs.
        found: key -> shape in the file.
        source: the file name, for the message.
    """
    problems = [
        f"  missing key {k!r}: expected shape {tuple(s)}"
        for k, s in expected.items()
        if k not in found
    ]
    problems += [
        f"  unexpected key {k!r}: shape {tuple(s)}" for k, s in found.items() if k not in expected
    ]
    problems += [
        f"  shape mismatch for {k!r}: expected {tuple(expected[k])}, found {tuple(s)}"
        for k, s in found.items()
        if k in expected and tuple(expected[k]) != tuple(s)
    ]
    if problems:
        raise CheckpointError(f"{source} does not match the model:\n" + "\n".join(problems))


def _load_into(build: Any, arrays: dict[str, np.ndarray], source: str) -> nn.Module:
    """Build on the meta device, check shapes, then adopt the file's tensors (strict)."""
    with torch.device("meta"):
        model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_shapes(expected, {k: tuple(v.shape) for k, v in arrays.items()}, source)
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _vision_from_npz(path: PathLike, variant: str) -> VisionTransformer:
    arrays = _read_npz(path)
    if "pos_embed" not in arrays:
        raise CheckpointError(f"{path}: missing key 'pos_embed'")
    if arrays["pos_embed"].ndim != 3:
        raise CheckpointError(
            f"{path}: pos_embed must be (1, 1+G*G, D), found {arrays['pos_embed'].shape}"
        )
    rows = arrays["pos_embed"].shape[1] - 1
    grid = int(round(rows**0.5))
    if grid * grid != rows:
        raise CheckpointError(f"{path}: pos_embed has {rows + 1} rows, not 1 + G*G")
    depth = _count_blocks(list(arrays), r"blocks\.(\d+)\.", path)
    name = VARIANTS[variant][0]
    kwargs = dict(
        img_size=grid * RELEASED_PATCH,
        patch_size=RELEASED_PATCH,
        depth=depth,
        layerscale_init=1.0,
        gelu_approximate="none",
        ln_eps=1e-6,
    )
    _note_depth(name, depth, path)
    return _load_into(lambda: build_vision(name, **kwargs), arrays, f"{path} (variant {variant})")


def _text_from_npz(path: PathLike, variant: str) -> tuple[TextTransformer, float]:
    arrays = _read_npz(path)
    scalars = {k: arrays.pop(k) for k in TEXT_SCALARS if k in arrays}
    if not scalars:
        raise CheckpointError(f"{path}: missing key 'temperature'")
    value = scalars.get("temperature", scalars.get("temperature_contrastive"))
    if value.size != 1:
        raise CheckpointError(f"{path}: 'temperature' must be a scalar, found {value.shape}")
    temperature = float(value.reshape(-1)[0])
    depth = _count_blocks(list(arrays), r"transformer\.resblocks\.(\d+)\.", path)
    name = VARIANTS[variant][1]
    _note_depth(name, depth, path)
    text = _load_into(
        lambda: build_text(name, vocab_size=RELEASED_VOCAB, depth=depth, ln_eps=1e-5),
        arrays,
        f"{path} (variant {variant})",
    )
    return text, temperature


def _note_depth(name: str, depth: int, path: PathLike) -> None:
    with torch.device("meta"):
        full = build_vision(name) if name.startswith("vit") else build_text(name)
    n = len(full.blocks) if name.startswith("vit") else len(full.transformer.resblocks)
    if n != depth:
        logger.warning(
            "%s has %d blocks; %s has %d (loading the file's depth)", path, depth, name, n
        )


def load_released(vision_npz: PathLike, text_npz: PathLike, variant: str) -> ReleasedTIPS:
    """Import released TIPS / TIPSv2 PyTorch weights (strict).

    The files: docs/method.md, "Released checkpoint files".

    Args:
        vision_npz: e.g. ``tips_v2_oss_b14_vision.npz``.
        text_npz: e.g. ``tips_v2_oss_b14_text.npz``.
        variant: "S", "B", "L", "So400m" or "g" (case-insensitive).

    Returns:
        ReleasedTIPS in eval mode, float32, on CPU.

    Raises:
        CheckpointError: a file is missing or unreadable, or any key is missing, unexpected
            or mis-shaped for the variant (all listed, with expected and found shapes).
        ValueError: unknown variant.
    """
    variant = canonical_variant(variant)
    vision = _vision_from_npz(vision_npz, variant)
    text, temperature = _text_from_npz(text_npz, variant)
    return ReleasedTIPS(vision, text, temperature, variant)


def _save_npz(arrays: dict[str, np.ndarray], path: PathLike) -> None:
    _write_atomically(path, lambda f: np.savez(f, **arrays))


def export_released(
    model: ReleasedTIPS | tuple[VisionTransformer, TextTransformer, float],
    vision_npz: PathLike,
    text_npz: PathLike,
) -> None:
    """Write the released ``.npz`` format (float32; ``temperature`` in the text file).

    Args:
        model: a ReleasedTIPS, or (vision, text, temperature).
        vision_npz: output path of the vision file.
        text_npz: output path of the text file.
    """
    if isinstance(model, ReleasedTIPS):
        vision, text, temperature = model.vision, model.text, model.temperature
    else:
        vision, text, temperature = model

    def arrays(module: nn.Module) -> dict[str, np.ndarray]:
        sd = to_reference_names(module.state_dict())
        return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in sd.items()}

    text_arrays = arrays(text)
    text_arrays["temperature"] = np.asarray(temperature, dtype=np.float32)
    _save_npz(arrays(vision), vision_npz)
    _save_npz(text_arrays, text_npz)
