"""TIPS multi-crop augmentation on uint8 images (numpy + torch CPU ops, no Ray).

    spec = CropSpec.from_config(cfg.augment)
    out = multi_crop(jpeg_bytes, spec, record_rng(seed, epoch, key, STREAM_CROPS))
    out.global_crops  # [G, 3, H, W] uint8   (TIPS: G=1, H=W=224)
    out.local_crops   # [M, 3, h, w] uint8   (TIPS: M=6, h=w=98)

TIPS trains with random-resized crops and horizontal flips only
(docs/method.md, "Crops and augmentation"); the optional colour jitter and grayscale are off
by default. Crop boxes follow torchvision's ``RandomResizedCrop.get_params`` (area fraction
~ U[scale], log-uniform aspect in [3/4, 4/3], 10 tries, then a centre crop). Speed, per image
(docs/ray.md, "Ray Data"; issue 3 benchmark):

1. The crop boxes are drawn from the header size *before* decoding, so a JPEG is decoded in
   draft mode (DCT scaling 1/2, 1/4, 1/8) at the smallest size that still gives every crop
   at least its output resolution.
2. Crops are resized as uint8 tensors with ``torch.nn.functional.interpolate`` (antialiased),
   about 2x faster than PIL per crop; pixels stay uint8 until the training device.

All randomness comes from the ``np.random.Generator`` passed in; ``record_rng`` derives it
from (seed, epoch, record key, stream) with a stable hash, so the same record gets the same
crops in any process, batch or order (tested directly vs. inside Ray Data).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

STREAM_CROPS, STREAM_MASKS, STREAM_CAPTIONS, STREAM_REGIONS = 0, 1, 2, 3
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default aspect range
_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a record key (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def record_rng(seed: int, epoch: int, key: str, stream: int) -> np.random.Generator:
    """The generator of one record's random choices for one ``stream`` (crops, masks, ...)."""
    entropy = [seed % 2**63, epoch % 2**63, key_hash(key), stream]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@dataclass(frozen=True)
class CropSpec:
    """Multi-crop settings (``cfg.augment``); sizes in pixels, scales as area fractions."""

    num_global: int = 1
    global_size: int = 224
    global_scale: tuple[float, float] = (0.32, 1.0)
    num_local: int = 6
    local_size: int = 98
    local_scale: tuple[float, float] = (0.05, 0.32)
    hflip_prob: float = 0.5
    interpolation: str = "bilinear"
    color_jitter_prob: float = 0.0
    grayscale_prob: float = 0.0

    @classmethod
    def from_config(cls, a: Any) -> CropSpec:
        return cls(
            num_global=a.num_global_crops,
            global_size=a.global_crop_size,
            global_scale=tuple(a.global_crop_scale),
            num_local=a.num_local_crops,
            local_size=a.local_crop_size,
            local_scale=tuple(a.local_crop_scale),
            hflip_prob=a.hflip_prob,
            interpolation=a.interpolation,
            color_jitter_prob=a.color_jitter_prob,
            grayscale_prob=a.grayscale_prob,
        )

    def sizes(self) -> list[int]:
        """Output side of every crop, globals first."""
        return [self.global_size] * self.num_global + [self.local_size] * self.num_local


class CropPlan(NamedTuple):
    boxes: np.ndarray  # [G+M, 4] float (x0, y0, w, h) in source pixels
    flips: np.ndarray  # [G+M] bool
    jitter: np.ndarray  # [G+M, 3] brightness, contrast, saturation factors (1 = off)
    gray: np.ndarray  # [G+M] bool
    size: tuple[int, int]  # source (width, height) in pixels


class CropOutput(NamedTuple):
    global_crops: np.ndarray  # [G, 3, H, W] uint8
    local_crops: np.ndarray  # [M, 3, h, w] uint8


def crop_box(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float]
) -> tuple[float, float, float, float]:
    """One RandomResizedCrop box ``(x0, y0, w, h)`` (torchvision's algorithm, numpy RNG)."""
    area = width * height
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return float(x0), float(y0), float(w), float(h)
    in_ratio = width / height  # fallback: the whole image at a clamped aspect, centred
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        w, h = int(round(height * _RATIO[1])), height
    else:
        w, h = width, height
    return float((width - w) // 2), float((height - h) // 2), float(w), float(h)


def plan_crops(spec: CropSpec, rng: np.random.Generator, width: int, height: int) -> CropPlan:
    """Draw every crop box, flip and (optional) photometric choice for one image."""
    n = spec.num_global + spec.num_local
    boxes = np.zeros((n, 4), dtype=np.float64)
    flips = np.zeros(n, dtype=bool)
    jitter = np.ones((n, 3), dtype=np.float32)
    gray = np.zeros(n, dtype=bool)
    for i in range(n):
        scale = spec.global_scale if i < spec.num_global else spec.local_scale
        boxes[i] = crop_box(rng, width, height, scale)
        flips[i] = rng.random() < spec.hflip_prob
        if spec.color_jitter_prob > 0 and rng.random() < spec.color_jitter_prob:
            jitter[i] = rng.uniform(0.6, 1.4, size=3)  # DINOv2 strengths 0.4 (hue omitted)
        if spec.grayscale_prob > 0:
            gray[i] = rng.random() < spec.grayscale_prob
    return CropPlan(boxes, flips, jitter, gray, (width, height))


def draft_factor(plan: CropPlan, spec: CropSpec) -> int:
    """Largest JPEG DCT downscale (1, 2, 4, 8) that keeps every crop at >= its output size."""
    sizes = np.asarray(spec.sizes(), dtype=np.float64)
    if len(sizes) == 0:
        return 1
    slack = float(np.min(np.minimum(plan.boxes[:, 2], plan.boxes[:, 3]) / sizes))
    for factor in (8, 4, 2):
        if slack >= factor:
            return factor
    return 1


def decode_for_crops(
    data: bytes, spec: CropSpec, rng: np.random.Generator, draft: bool = True
) -> tuple[np.ndarray, CropPlan, tuple[float, float]]:
    """Read the header, plan the crops, decode (in draft mode when it helps).

    Returns:
        ``(image [H', W', 3] uint8, plan in source pixels, (sx, sy) decoded / source size)``.

    Raises:
        Exception: whatever PIL raises for corrupt or truncated bytes (callers count it).
    """
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        plan = plan_crops(spec, rng, width, height)
        if draft and im.format == "JPEG":
            factor = draft_factor(plan, spec)
            if factor > 1:
                im.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        rgb.load()
        image = np.array(rgb)  # writable: torch.from_numpy warns on read-only arrays
    return image, plan, (image.shape[1] / width, image.shape[0] / height)


def _photometric(crop: torch.Tensor, jitter: np.ndarray, gray: bool) -> torch.Tensor:
    x = crop.float()
    if not np.all(jitter == 1.0):
        b, c, s = (float(v) for v in jitter)
        x = x * b
        mean = (x * _GRAY).sum(1, keepdim=True).mean()
        x = (x - mean) * c + mean
        luma = (x * _GRAY).sum(1, keepdim=True)
        x = (x - luma) * s + luma
    if gray:
        x = (x * _GRAY).sum(1, keepdim=True).repeat(1, 3, 1, 1)
    return x.clamp_(0, 255).round_().to(torch.uint8)


def apply_crops(
    image: np.ndarray, plan: CropPlan, spec: CropSpec, scale: tuple[float, float] = (1.0, 1.0)
) -> CropOutput:
    """Cut, resize and flip every planned crop of a decoded image.

    Args:
        image: ``[H', W', 3]`` uint8, possibly decoded at reduced size.
        plan: boxes in source pixels (from ``plan_crops``).
        spec: crop sizes and interpolation.
        scale: ``(sx, sy)`` decoded size / source size.

    Returns:
        ``global_crops [G, 3, S, S]`` and ``local_crops [M, 3, s, s]``, uint8.
    """
    src = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # [3, H', W']
    height, width = image.shape[:2]
    sx, sy = scale
    out_g = np.empty((spec.num_global, 3, spec.global_size, spec.global_size), np.uint8)
    out_l = np.empty((spec.num_local, 3, spec.local_size, spec.local_size), np.uint8)
    photometric = (plan.gray | np.any(plan.jitter != 1.0, axis=1)).tolist()
    flips = plan.flips.tolist()
    for i, size in enumerate(spec.sizes()):
        x0, y0, w, h = plan.boxes[i].tolist()
        left, top = min(int(x0 * sx), width - 1), min(int(y0 * sy), height - 1)
        right = max(min(math.ceil((x0 + w) * sx), width), left + 1)
        bottom = max(min(math.ceil((y0 + h) * sy), height), top + 1)
        region = src[:, top:bottom, left:right].unsqueeze(0)  # [1, 3, h, w]
        crop = F.interpolate(
            region, size=(size, size), mode=spec.interpolation, antialias=True, align_corners=False
        )
        if flips[i]:
            crop = crop.flip(-1)
        if photometric[i]:
            crop = _photometric(crop, plan.jitter[i], bool(plan.gray[i]))
        target = out_g[i] if i < spec.num_global else out_l[i - spec.num_global]
        target[...] = crop[0].numpy()
    return CropOutput(out_g, out_l)


def crop_regions(
    regions: list[dict[str, Any]] | None,
    plan: CropPlan,
    max_regions: int,
    rng: np.random.Generator,
    min_visible: float = 0.5,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Map region boxes (xyxy in [0, 1] of the source image) into global crop 0's frame.

    A region is kept when at least ``min_visible`` of its area lies inside the crop (so its
    text still describes what is seen); its box is clipped to the crop and mirrored with a
    flipped crop. More than ``max_regions`` kept: a random subset, in their original order.

    Returns:
        ``boxes [R, 4]`` float32 xyxy in [0, 1] (0 = padding), ``texts`` (R strings, "" =
        padding), ``valid [R]`` bool, with ``R = max_regions``.
    """
    width, height = plan.size
    cx0, cy0, cw, ch = plan.boxes[0].tolist()
    kept: list[tuple[list[float], str]] = []
    for r in regions or ():
        text = str(r.get("text") or "").strip()
        x0, y0, x1, y1 = (float(v) for v in r["box"])
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
        ix0, iy0, ix1, iy1 = max(x0, cx0), max(y0, cy0), min(x1, cx0 + cw), min(y1, cy0 + ch)
        area = (x1 - x0) * (y1 - y0)
        if not text or area <= 0 or ix1 <= ix0 or iy1 <= iy0:
            continue
        if (ix1 - ix0) * (iy1 - iy0) < min_visible * area:
            continue
        box = [(ix0 - cx0) / cw, (iy0 - cy0) / ch, (ix1 - cx0) / cw, (iy1 - cy0) / ch]
        if plan.flips[0]:
            box = [1.0 - box[2], box[1], 1.0 - box[0], box[3]]
        kept.append((box, text))
    if len(kept) > max_regions:
        keep = np.sort(rng.choice(len(kept), size=max_regions, replace=False))
        kept = [kept[i] for i in keep]
    boxes = np.zeros((max_regions, 4), dtype=np.float32)
    valid = np.zeros(max_regions, dtype=bool)
    texts = [""] * max_regions
    for i, (box, text) in enumerate(kept):
        boxes[i], valid[i], texts[i] = box, True, text
    return boxes, texts, valid


def multi_crop(
    data: bytes, spec: CropSpec, rng: np.random.Generator, draft: bool = True
) -> CropOutput:
    """Encoded image bytes -> the record's global and local crops (see module doc)."""
    image, plan, scale = decode_for_crops(data, spec, rng, draft)
    return apply_crops(image, plan, spec, scale)


def augment_batch(
    batch: dict[str, np.ndarray], *, spec: CropSpec, seed: int, epoch: int, draft: bool = True
) -> dict[str, np.ndarray]:
    """Ray Data-style batch function: ``{key, image}`` -> ``{key, global_crops, local_crops}``.

    Per-record seeds make the output independent of batching: calling this directly or via
    ``ray.data.from_items(...).map_batches(augment_batch, fn_kwargs=...)`` gives the same
    crops. (The training pipeline adds per-record error handling around ``multi_crop``.)

    Returns:
        ``global_crops [B, G, 3, S, S]`` and ``local_crops [B, M, 3, s, s]`` uint8.
    """
    keys = [str(k) for k in batch["key"]]
    outs = [
        multi_crop(bytes(data), spec, record_rng(seed, epoch, key, STREAM_CROPS), draft)
        for key, data in zip(keys, batch["image"])
    ]
    return {
        "key": np.asarray(keys, dtype=object),
        "global_crops": np.stack([o.global_crops for o in outs]),
        "local_crops": np.stack([o.local_crops for o in outs]),
    }
