"""NYU Depth v2 (Silberman et al. 2012) for the monocular depth probe.

Two layouts are read:

1. The labeled MATLAB file (1,449 RGB-D frames, 480x640)::

       ROOT/nyu_depth_v2_labeled.mat   "images" [480,640,3,N] uint8, "depths" [480,640,N] metres
       ROOT/splits.mat                 optional: "trainNdxs" (795), "testNdxs" (654), 1-based

   The released file is MATLAB v7.3 (HDF5): it needs ``h5py`` (arrays appear transposed,
   [N,3,640,480]); older v5 files are read with ``scipy.io.loadmat``. Without ``splits.mat``
   the standard sizes are kept by order: the first 795 frames train, the rest test (logged).

2. A folder of PNGs (e.g. exported from the above or from the raw dumps)::

       ROOT/{train,test}/rgb/<name>.png|jpg
       ROOT/{train,test}/depth/<name>.png     uint16, millimetres (0 = no measurement)

Depth is evaluated on 1e-3 < d <= 10 m (Eigen et al. 2014). Splits: "train" and "val"
(= the test split).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from orchestrator.eval.readers.base import (
    EvalDataset,
    ReaderError,
    Split,
    layout_error,
    list_images,
    load_rgb,
)

logger = logging.getLogger(__name__)

LAYOUT = """\
  ROOT/nyu_depth_v2_labeled.mat  ("images" [480,640,3,N] uint8, "depths" [480,640,N] metres)
  ROOT/splits.mat                (optional: "trainNdxs", "testNdxs", 1-based)
or
  ROOT/{train,test}/rgb/<name>.png|jpg
  ROOT/{train,test}/depth/<name>.png   (uint16 millimetres, 0 = invalid)"""

MAT_NAME = "nyu_depth_v2_labeled.mat"
DEPTH_PNG_SCALE = 1000.0  # uint16 PNG units per metre (millimetres)
NYU_TRAIN_SIZE = 795  # the standard split sizes (795 train / 654 test)
NYU_DEPTH_RANGE = (1e-3, 10.0)


def _load_mat(path: Path) -> tuple[object, object, bool]:
    """(images, depths, transposed): numpy arrays (v5) or lazy h5py datasets (v7.3)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["images", "depths"])
        if "images" not in mat or "depths" not in mat:
            raise layout_error(path, "has no 'images' and 'depths' variables", LAYOUT)
        return mat["images"], mat["depths"], False
    except NotImplementedError:  # scipy: "Please use HDF reader for matlab v7.3 files"
        pass
    try:
        import h5py
    except ImportError as e:
        raise ReaderError(
            f"{path}: MATLAB v7.3 (HDF5) file; reading it needs h5py (`pip install h5py`), "
            "or convert it to the PNG folder layout:\n" + LAYOUT
        ) from e
    f = h5py.File(str(path), "r")
    if "images" not in f or "depths" not in f:
        raise layout_error(path, "has no 'images' and 'depths' datasets", LAYOUT)
    return f["images"], f["depths"], True


def _mat_splits(root: Path, n: int) -> dict[str, np.ndarray]:
    splits_file = root / "splits.mat"
    if splits_file.is_file():
        import scipy.io

        s = scipy.io.loadmat(str(splits_file))
        if "trainNdxs" not in s or "testNdxs" not in s:
            raise layout_error(splits_file, "has no 'trainNdxs' / 'testNdxs'", LAYOUT)
        return {"train": s["trainNdxs"].reshape(-1) - 1, "val": s["testNdxs"].reshape(-1) - 1}
    cut = NYU_TRAIN_SIZE if n > NYU_TRAIN_SIZE else max(n // 2, 1)
    logger.warning("%s: no splits.mat; using frames [0, %d) as train, the rest as test", root, cut)
    return {"train": np.arange(cut), "val": np.arange(cut, n)}


def _read_mat(root: Path, path: Path) -> dict[str, Split]:
    images, depths, transposed = _load_mat(path)
    n = images.shape[0] if transposed else images.shape[-1]  # type: ignore[union-attr]

    def image(i: int) -> np.ndarray:
        if transposed:  # h5py view [N,3,W,H]
            return np.ascontiguousarray(np.asarray(images[i]).transpose(2, 1, 0), np.uint8)
        return np.ascontiguousarray(images[..., i], np.uint8)  # type: ignore[index]

    def depth(i: int) -> np.ndarray:
        d = np.asarray(depths[i]).T if transposed else depths[..., i]  # type: ignore[index]
        return np.ascontiguousarray(d, np.float32)

    out = {}
    for split, idx in _mat_splits(root, n).items():
        idx = [int(i) for i in idx]
        out[split] = Split(
            size=len(idx),
            image_fn=lambda j, idx=idx: image(idx[j]),
            depth_fn=lambda j, idx=idx: depth(idx[j]),
            keys=[f"{i:04d}" for i in idx],
        )
    return out


def _load_depth_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        d = np.asarray(im)
    if d.ndim != 2:
        raise layout_error(
            path, f"depth PNG has shape {d.shape}; expected one uint16 channel", LAYOUT
        )
    return d.astype(np.float32) / DEPTH_PNG_SCALE


def _read_pngs(root: Path) -> dict[str, Split]:
    out = {}
    for split, folder in (("train", "train"), ("val", "test"), ("val", "val")):
        rgb_dir, depth_dir = root / folder / "rgb", root / folder / "depth"
        if split in out or not rgb_dir.is_dir():
            continue
        if not depth_dir.is_dir():
            raise layout_error(root / folder, "has rgb/ but no depth/ folder", LAYOUT)
        rgbs = list_images(rgb_dir)
        missing = [p.name for p in rgbs if not (depth_dir / f"{p.stem}.png").is_file()]
        if missing:
            raise layout_error(
                depth_dir, f"no depth PNG for {len(missing)} images, e.g. {missing[0]}", LAYOUT
            )
        out[split] = Split(
            size=len(rgbs),
            image_fn=lambda i, rgbs=rgbs: load_rgb(rgbs[i]),
            depth_fn=lambda i, rgbs=rgbs, d=depth_dir: _load_depth_png(d / f"{rgbs[i].stem}.png"),
            keys=[p.stem for p in rgbs],
        )
    return out


def read_nyu(root: str | Path) -> EvalDataset:
    """Read NYU Depth v2 from the labeled .mat or a folder of PNGs.

    Args:
        root: the folder (or the .mat file itself).

    Raises:
        ReaderError: neither layout found, or a v7.3 file without h5py.
    """
    root = Path(root)
    if root.is_file() and root.suffix == ".mat":
        splits = _read_mat(root.parent, root)
    elif (root / MAT_NAME).is_file():
        splits = _read_mat(root, root / MAT_NAME)
    elif root.is_dir():
        splits = _read_pngs(root)
    else:
        raise layout_error(root, "does not exist", LAYOUT)
    if not splits:
        raise layout_error(root, f"neither {MAT_NAME} nor {{train,test}}/rgb folders found", LAYOUT)
    return EvalDataset(
        name="nyu_depth_v2", splits=splits, depth_range=NYU_DEPTH_RANGE, root=str(root)
    )
