"""Dataset readers for the evaluation suite, and ``open_dataset(spec, kind)`` to pick one.

A dataset ``spec`` (``tips eval data.<task>=SPEC``) is one of:

* ``synthetic`` - the built-in synthetic set, generated in memory (offline, CI);
* ``synthetic:<uri>`` - a synthetic eval split written by ``tips data synth`` (``DIR/eval``);
* ``<format>:<path>`` - an explicit reader: imagefolder, karpathy (coco, flickr30k), voc,
  ade20k, nyu;
* ``<path>`` - detected from its layout among the readers of the task's kind.

Kinds: "classification" (zero_shot_cls, knn), "captions" (retrieval), "segmentation"
(zero_shot_seg, linear_seg), "depth" (depth). A path that matches no layout raises a
``ReaderError`` listing every layout the kind accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestrator.eval.readers.base import (
    IGNORE_INDEX,
    EvalDataset,
    ReaderError,
    Split,
    load_index_png,
    load_rgb,
)
from orchestrator.eval.readers.captions import LAYOUT as KARPATHY_LAYOUT
from orchestrator.eval.readers.captions import read_karpathy
from orchestrator.eval.readers.imagefolder import LAYOUT as IMAGEFOLDER_LAYOUT
from orchestrator.eval.readers.imagefolder import read_imagefolder
from orchestrator.eval.readers.nyu import LAYOUT as NYU_LAYOUT
from orchestrator.eval.readers.nyu import read_nyu
from orchestrator.eval.readers.segmentation import (
    ADE20K_CLASSES,
    ADE_LAYOUT,
    VOC_CLASSES,
    VOC_LAYOUT,
    read_ade20k,
    read_voc,
)
from orchestrator.eval.readers.synthetic import read_synthetic

SYNTHETIC_LAYOUT = "  DIR/eval/shard-*.parquet|tar written by `tips data synth --out DIR`"

READERS: dict[str, Callable[[str], EvalDataset]] = {
    "imagefolder": read_imagefolder,
    "karpathy": read_karpathy,
    "coco": read_karpathy,
    "flickr30k": read_karpathy,
    "voc": read_voc,
    "ade20k": read_ade20k,
    "nyu": read_nyu,
    "synthetic": read_synthetic,
}
KINDS: dict[str, tuple[str, ...]] = {
    "classification": ("imagefolder",),
    "captions": ("karpathy",),
    "segmentation": ("voc", "ade20k"),
    "depth": ("nyu",),
}
_LAYOUTS = {
    "imagefolder": IMAGEFOLDER_LAYOUT,
    "karpathy": KARPATHY_LAYOUT,
    "voc": VOC_LAYOUT,
    "ade20k": ADE_LAYOUT,
    "nyu": NYU_LAYOUT,
}


def _is_synthetic_split(path: Path) -> bool:
    return path.is_dir() and (
        (path / "_manifest.json").is_file()
        or any(path.glob("shard-*.parquet"))
        or any(path.glob("shard-*.tar"))
    )


def _looks_like(fmt: str, path: Path) -> bool:
    """Cheap layout probes used for detection (the reader then checks the details)."""
    if fmt == "voc":
        return any(
            (p / "SegmentationClass").is_dir()
            for p in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012")
        )
    if fmt == "ade20k":
        return any((p / "annotations").is_dir() for p in (path, path / "ADEChallengeData2016"))
    if fmt == "karpathy":
        return (path.is_file() and path.suffix == ".json") or any(path.glob("dataset_*.json"))
    if fmt == "nyu":
        return (
            path.suffix == ".mat"
            or (path / "nyu_depth_v2_labeled.mat").is_file()
            or (path / "train" / "depth").is_dir()
            or (path / "test" / "depth").is_dir()
        )
    return path.is_dir()  # imagefolder: any directory, checked by the reader


def open_dataset(spec: str, kind: str) -> EvalDataset:
    """Open the dataset named by ``spec`` for a task of ``kind`` (see the module docstring).

    Raises:
        ReaderError: unknown format, or a path that matches none of the kind's layouts.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {sorted(KINDS)}")
    if spec == "synthetic":
        return read_synthetic()
    fmt, sep, rest = spec.partition(":")
    if sep and fmt in READERS and not rest.startswith("//"):
        return READERS[fmt](rest)
    if spec.startswith(("s3://", "s3a://")):
        return read_synthetic(spec)  # only the synthetic split is read from object storage
    path = Path(spec).expanduser()
    if not path.exists():
        raise ReaderError(
            f"{spec}: no such file or directory (nor a known dataset name: "
            f"synthetic, or <format>:<path> with format in {sorted(READERS)})"
        )
    if _is_synthetic_split(path):
        return read_synthetic(str(path))
    for fmt in KINDS[kind]:
        if _looks_like(fmt, path):
            return READERS[fmt](str(path))
    layouts = "\n".join(f"{fmt}:\n{_LAYOUTS[fmt]}" for fmt in KINDS[kind])
    raise ReaderError(
        f"{spec}: matches no {kind} dataset layout. Expected one of:\n{layouts}\n"
        f"synthetic:\n{SYNTHETIC_LAYOUT}"
    )


__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "KINDS",
    "READERS",
    "VOC_CLASSES",
    "EvalDataset",
    "ReaderError",
    "Split",
    "load_index_png",
    "load_rgb",
    "open_dataset",
    "read_ade20k",
    "read_imagefolder",
    "read_karpathy",
    "read_nyu",
    "read_synthetic",
    "read_voc",
]
