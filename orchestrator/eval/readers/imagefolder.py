"""ImageFolder classification datasets (the torchvision layout), for zero-shot and k-NN.

Layout (either form)::

    ROOT/<class_name>/<image>.jpg                  one split ("val")
    ROOT/train/<class_name>/<image>.jpg            train split (k-NN memory bank)
    ROOT/val/<class_name>/<image>.jpg              val split (evaluated)
    ROOT/classnames.txt                            optional: one readable name per line,
                                                   in sorted folder order (e.g. ImageNet's
                                                   synset folders -> "goldfish", ...)

Class ids follow the sorted folder names (torchvision ``ImageFolder``); readable names are
the folder names with "_" as spaces unless ``classnames.txt`` gives them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.eval.readers.base import (
    EvalDataset,
    Split,
    layout_error,
    list_images,
    load_rgb,
)

LAYOUT = """\
  ROOT/<class_name>/<image>.jpg              (a single split), or
  ROOT/train/<class_name>/<image>.jpg and ROOT/val/<class_name>/<image>.jpg
  ROOT/classnames.txt                        (optional: readable names, sorted folder order)"""

SPLIT_DIRS = ("train", "val", "test")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split(folder: Path, classes: list[str]) -> Split:
    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        d = folder / name
        if d.is_dir():
            files = list_images(d)
            paths += files
            labels += [c] * len(files)
    if not paths:
        raise layout_error(folder, "no images found in any class folder", LAYOUT)
    return Split(
        size=len(paths),
        image_fn=lambda i: load_rgb(paths[i]),
        labels=np.asarray(labels, dtype=np.int64),
        keys=[f"{p.parent.name}/{p.stem}" for p in paths],
    )


def read_imagefolder(root: str | Path, name: str = "imagefolder") -> EvalDataset:
    """Read an ImageFolder tree.

    Args:
        root: the dataset root (see the module docstring for the layout).
        name: dataset name for the results table.

    Returns:
        EvalDataset with split "val" (and "train" when ``ROOT/train`` exists).

    Raises:
        ReaderError: missing root, no class folders, or no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise layout_error(root, "not a directory", LAYOUT)
    split_roots = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
    if not split_roots:
        split_roots = {"val": root}
    classes = sorted({d.name for folder in split_roots.values() for d in _class_dirs(folder)})
    if not classes:
        raise layout_error(root, "no class folders found", LAYOUT)
    splits = {s: _split(folder, classes) for s, folder in split_roots.items()}
    if "val" not in splits and "test" in splits:
        splits["val"] = splits["test"]
    readable = [c.replace("_", " ") for c in classes]
    names_file = root / "classnames.txt"
    if names_file.is_file():
        lines = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if len(lines) != len(classes):
            raise layout_error(
                names_file,
                f"has {len(lines)} names but there are {len(classes)} class folders",
                LAYOUT,
            )
        readable = lines
    return EvalDataset(name=name, splits=splits, class_names=readable, root=str(root))
