"""The built-in synthetic evaluation set (``orchestrator.data.synthetic``), for every task.

Contract: ``read_synthetic(uri=None) -> EvalDataset`` with splits "train" (first half of the
records) and "val" (second half). With no ``uri`` the records are generated in memory
exactly as ``tips data synth`` writes its ``eval/`` split (``make_record(seed, "eval", i)``),
so the whole suite runs offline with nothing on disk; with a ``uri`` (local or s3://) the
written split is read through ``read_eval_split``.

Targets per task:

* segmentation: ``class_mask`` (ids into ``CLASS_NAMES``: background + 24 colour-shape
  classes); nothing is ignored;
* depth: the depth map in metres (objects 1.5-5.5 m, background plane 6-10 m), evaluated on
  (1e-3, 10] m like NYU;
* captions: the two synthetic captions of each image ("short", "long"); the noisy alt-text
  is left out;
* classification: the class covering the most pixels other than background (every scene has
  at least one visible shape).
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from orchestrator.eval.readers.base import EvalDataset, ReaderError, Split

SYNTHETIC_N = 128  # in-memory records: 64 "train" + 64 "val"
SYNTHETIC_SEED = 0
SYNTHETIC_IMAGE_SIZE = 64  # `tips data synth`'s default
SYNTHETIC_DEPTH_RANGE = (1e-3, 10.0)


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode == "P" or im.mode.startswith("RGB") else im)


@lru_cache(maxsize=4)
def _generate(n: int, seed: int, image_size: int) -> tuple:
    from orchestrator.data.synthetic import DEPTH_SCALE, make_record

    keys, images, masks, depths, captions = [], [], [], [], []
    for i in range(n):
        rec = make_record(seed, "eval", i, image_size)
        keys.append(rec["key"])
        images.append(_png(rec["image"]))
        masks.append(_png(rec["class_mask"]).astype(np.int64))
        depths.append(_png(rec["depth"]).astype(np.float32) / DEPTH_SCALE)
        captions.append([c["text"] for c in rec["captions"]])
    return keys, images, masks, depths, captions


def _read(uri: str) -> tuple:
    from orchestrator.data.shards import ShardError
    from orchestrator.data.synthetic import read_eval_split

    keys, images, masks, depths, captions = [], [], [], [], []
    try:
        for s in read_eval_split(uri):
            keys.append(s.key)
            images.append(s.image)
            masks.append(s.class_mask.astype(np.int64))
            depths.append(s.depth)
            captions.append([s.captions[k] for k in sorted(s.captions)])
    except ShardError as e:
        raise ReaderError(
            f"{uri}: not a synthetic evaluation split ({e}); expected the eval/ folder written "
            "by `tips data synth --out DIR` (DIR/eval/shard-*.parquet|tar with class_mask and "
            "depth columns)"
        ) from e
    if not keys:
        raise ReaderError(f"{uri}: the synthetic evaluation split has no records")
    return keys, images, masks, depths, captions


def dominant_class(mask: np.ndarray) -> int:
    """The most frequent non-zero class id of a mask (0 if it is all background)."""
    counts = np.bincount(mask.reshape(-1).astype(np.int64))
    counts[0] = 0
    return int(counts.argmax()) if counts.sum() > 0 else 0


def _split(keys, images, masks, depths, captions, idx: range) -> Split:
    idx = list(idx)
    return Split(
        size=len(idx),
        image_fn=lambda j: images[idx[j]],
        labels=np.asarray([dominant_class(masks[i]) for i in idx], dtype=np.int64),
        captions=[captions[i] for i in idx],
        mask_fn=lambda j: masks[idx[j]],
        depth_fn=lambda j: depths[idx[j]],
        keys=[keys[i] for i in idx],
    )


def read_synthetic(
    uri: str | None = None,
    n: int = SYNTHETIC_N,
    seed: int = SYNTHETIC_SEED,
    image_size: int = SYNTHETIC_IMAGE_SIZE,
) -> EvalDataset:
    """The synthetic evaluation set, generated in memory or read from ``uri``.

    Args:
        uri: a written eval split (``DIR/eval``), or None to generate ``n`` records.
        n: records to generate (ignored with ``uri``).
        seed: data-set seed (ignored with ``uri``).
        image_size: image side (ignored with ``uri``).

    Returns:
        EvalDataset "synthetic" with "train" and "val" halves and ``CLASS_NAMES``.

    Raises:
        ReaderError: ``uri`` is not an evaluation split, or fewer than 2 records.
    """
    from orchestrator.data.synthetic import CLASS_NAMES

    arrays = _read(uri) if uri else _generate(n, seed, image_size)
    total = len(arrays[0])
    if total < 2:
        raise ReaderError(f"{uri or 'synthetic'}: needs at least 2 records, found {total}")
    half = total // 2
    return EvalDataset(
        name="synthetic",
        splits={"train": _split(*arrays, range(half)), "val": _split(*arrays, range(half, total))},
        class_names=list(CLASS_NAMES),
        ignore_index=255,
        depth_range=SYNTHETIC_DEPTH_RANGE,
        root=uri or f"synthetic(n={n}, seed={seed}, size={image_size})",
    )
