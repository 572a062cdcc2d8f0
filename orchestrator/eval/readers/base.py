"""The in-memory shape of an evaluation dataset, shared by every reader and task.

Contract: a reader returns ``EvalDataset(name, splits, class_names, ...)``; a ``Split`` is a
lazily loaded list of images plus whatever targets its kind has:

* classification: ``labels`` int64 [N] into ``class_names``;
* captions (retrieval): ``captions`` (a list of strings per image);
* segmentation: ``mask(i)`` -> int64 [H, W] class ids, ``ignore_index`` (255) = unlabeled;
* depth: ``depth(i)`` -> float32 [H, W] metres, 0 = no measurement.

``image(i)`` is always uint8 [H, W, 3] RGB. Nothing is decoded until asked for, so a reader
on a large dataset costs only its file listing. Readers raise ``ReaderError`` naming the path
and the layout they expected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class ReaderError(ValueError):
    """A dataset path does not hold the on-disk layout its reader expects."""


def layout_error(path: str | Path, what: str, layout: str) -> ReaderError:
    """A ReaderError that names the path, what is wrong, and the expected layout."""
    return ReaderError(f"{path}: {what}.\nExpected layout:\n{layout.rstrip()}")


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ReaderError(f"{path}: cannot decode image: {e}") from e


def load_index_png(path: str | Path) -> np.ndarray:
    """Decode a label PNG (palette or grayscale) to int64 [H, W] class ids.

    Raises:
        ReaderError: unreadable, or an RGB(A) colour image (class ids must be stored as
            palette indices or grey levels, as in VOC ``SegmentationClass`` and ADE20K).
    """
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise ReaderError(
                    f"{path}: label image is {im.mode}; expected a palette ('P') or grey ('L')"
                    " PNG whose pixel values are class ids"
                )
            return np.asarray(im, dtype=np.int64)
    except OSError as e:
        raise ReaderError(f"{path}: cannot decode label image: {e}") from e


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass
class Split:
    """One split: ``size`` images with lazily loaded pixels and targets.

    Attributes:
        size: number of images N.
        image_fn: i -> uint8 [H, W, 3].
        labels: int64 [N] class ids (classification), or None.
        captions: N lists of caption strings (retrieval), or None.
        mask_fn: i -> int64 [H, W] class ids (segmentation), or None.
        depth_fn: i -> float32 [H, W] metres (depth), or None.
        keys: N identifiers (file stems), for plots and debugging.
    """

    size: int
    image_fn: Callable[[int], np.ndarray]
    labels: np.ndarray | None = None
    captions: list[list[str]] | None = None
    mask_fn: Callable[[int], np.ndarray] | None = None
    depth_fn: Callable[[int], np.ndarray] | None = None
    keys: list[str] | None = None

    def __len__(self) -> int:
        return self.size

    def image(self, i: int) -> np.ndarray:
        return self.image_fn(i)

    def mask(self, i: int) -> np.ndarray:
        if self.mask_fn is None:
            raise ReaderError("this split has no segmentation masks")
        return self.mask_fn(i)

    def depth(self, i: int) -> np.ndarray:
        if self.depth_fn is None:
            raise ReaderError("this split has no depth maps")
        return self.depth_fn(i)

    def subset(self, indices: Sequence[int]) -> Split:
        """The images at ``indices`` (in that order), targets included."""
        idx = [int(i) for i in indices]

        def remap(fn: Callable[[int], np.ndarray] | None) -> Callable[[int], np.ndarray] | None:
            return None if fn is None else (lambda j: fn(idx[j]))

        return Split(
            size=len(idx),
            image_fn=remap(self.image_fn),  # type: ignore[arg-type]
            labels=None if self.labels is None else self.labels[idx],
            captions=None if self.captions is None else [self.captions[i] for i in idx],
            mask_fn=remap(self.mask_fn),
            depth_fn=remap(self.depth_fn),
            keys=None if self.keys is None else [self.keys[i] for i in idx],
        )

    def limit(self, max_images: int | None) -> Split:
        """At most ``max_images`` images, evenly spaced over the split (deterministic), so
        that a class-sorted listing keeps every class."""
        if max_images is None or max_images <= 0 or max_images >= self.size:
            return self
        return self.subset(np.linspace(0, self.size - 1, max_images).round().astype(int))


@dataclass
class EvalDataset:
    """A named dataset with its splits (``train``, ``val``, ``test``) and metadata.

    Attributes:
        name: e.g. "voc2012", "ade20k", "synthetic".
        splits: split name -> Split.
        class_names: readable class names (prompts use them), index = class id.
        ignore_index: segmentation label to ignore.
        depth_range: (min, max) metres of valid depth for evaluation (NYU: 1e-3, 10).
        root: where it was read from.
    """

    name: str
    splits: dict[str, Split]
    class_names: list[str] | None = None
    ignore_index: int = IGNORE_INDEX
    depth_range: tuple[float, float] = (1e-3, 10.0)
    root: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def split(self, *names: str) -> Split:
        """The first of ``names`` this dataset has.

        Raises:
            ReaderError: none of them exist.
        """
        for n in names:
            if n in self.splits:
                return self.splits[n]
        raise ReaderError(
            f"{self.root or self.name}: no split named {' or '.join(names)}; "
            f"this dataset has {sorted(self.splits)}"
        )

    def has_split(self, name: str) -> bool:
        return name in self.splits

    def with_splits(self, splits: dict[str, Split]) -> EvalDataset:
        return replace(self, splits=splits)
