"""Semantic segmentation datasets: PASCAL VOC 2012 and ADE20K (ADEChallengeData2016).

PASCAL VOC 2012 (Everingham et al. 2010; 21 classes incl. background, 255 = void border)::

    ROOT = VOCdevkit/VOC2012 (VOCdevkit/ or its parent also accepted)
    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png            palette PNG, pixel value = class id
    ROOT/ImageSets/Segmentation/train.txt      one <id> per line (1,464 images)
    ROOT/ImageSets/Segmentation/val.txt        (1,449 images)

ADE20K scene parsing (Zhou et al. 2017; 150 classes)::

    ROOT = ADEChallengeData2016 (or its parent)
    ROOT/images/{training,validation}/ADE_*.jpg
    ROOT/annotations/{training,validation}/ADE_*.png   grey PNG: 0 = other, k = class k
    ROOT/objectInfo150.txt                              optional: class names

ADE label 0 ("other") becomes 255 (ignored) and class k becomes k-1, the mmsegmentation
``reduce_zero_label`` convention also used by the TIPS zero-shot notebook
(docs/method.md, "Evaluation protocols").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.eval.readers.base import (
    IGNORE_INDEX,
    EvalDataset,
    Split,
    layout_error,
    list_images,
    load_index_png,
    load_rgb,
)

VOC_LAYOUT = """\
  VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  VOCdevkit/VOC2012/SegmentationClass/<id>.png     (palette PNG, values = class ids, 255 void)
  VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt"""

ADE_LAYOUT = """\
  ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
  ADEChallengeData2016/annotations/{training,validation}/ADE_*.png  (0 = other, 1..150)
  ADEChallengeData2016/objectInfo150.txt                          (optional)"""

# Readable forms of the VOC class folder names (prompts read better with spaces).
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant",
    "sheep", "sofa", "train", "tv monitor",
]  # fmt: skip

# First synonym of each objectInfo150.txt entry, as in mmsegmentation's ADE20KDataset.
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
]  # fmt: skip


def _first_existing(candidates: list[Path], marker: str) -> Path | None:
    return next((c for c in candidates if (c / marker).is_dir()), None)


def read_voc(root: str | Path) -> EvalDataset:
    """Read PASCAL VOC 2012 segmentation (splits "train" and "val").

    Raises:
        ReaderError: the folders or split files of the layout are missing.
    """
    given = Path(root)
    base = _first_existing(
        [given, given / "VOC2012", given / "VOCdevkit" / "VOC2012"], "SegmentationClass"
    )
    if base is None:
        raise layout_error(given, "no SegmentationClass/ folder found", VOC_LAYOUT)
    sets = base / "ImageSets" / "Segmentation"
    splits = {}
    for split in ("train", "val"):
        list_file = sets / f"{split}.txt"
        if not list_file.is_file():
            continue
        ids = [ln.split()[0] for ln in list_file.read_text().splitlines() if ln.strip()]
        first = base / "JPEGImages" / f"{ids[0]}.jpg" if ids else None
        if first is None or not first.is_file():
            raise layout_error(
                base, f"{list_file.name} lists {ids[:1]} but {first} is missing", VOC_LAYOUT
            )
        splits[split] = Split(
            size=len(ids),
            image_fn=lambda i, ids=ids: load_rgb(base / "JPEGImages" / f"{ids[i]}.jpg"),
            mask_fn=lambda i, ids=ids: load_index_png(base / "SegmentationClass" / f"{ids[i]}.png"),
            keys=ids,
        )
    if not splits:
        raise layout_error(base, f"no split files train.txt / val.txt in {sets}", VOC_LAYOUT)
    return EvalDataset(name="voc2012", splits=splits, class_names=list(VOC_CLASSES), root=str(base))


def _ade_names(base: Path) -> list[str]:
    info = base / "objectInfo150.txt"
    if not info.is_file():
        return list(ADE20K_CLASSES)
    names = []
    for line in info.read_text().splitlines()[1:]:  # header: Idx Ratio Train Val Name
        cols = line.split("\t") if "\t" in line else line.split(None, 4)
        if len(cols) >= 5:
            names.append(cols[-1].split(";")[0].strip())
    return names if len(names) == 150 else list(ADE20K_CLASSES)


def _ade_mask(path: Path) -> np.ndarray:
    label = load_index_png(path)
    return np.where(label == 0, IGNORE_INDEX, label - 1)


def read_ade20k(root: str | Path) -> EvalDataset:
    """Read ADEChallengeData2016 (splits "train" and "val"), labels reduced to 0..149.

    Raises:
        ReaderError: the images/annotations folders are missing or an image has no
            annotation.
    """
    given = Path(root)
    base = _first_existing([given, given / "ADEChallengeData2016"], "annotations")
    if base is None or not (base / "images").is_dir():
        raise layout_error(given, "no images/ and annotations/ folders found", ADE_LAYOUT)
    splits = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        img_dir, ann_dir = base / "images" / folder, base / "annotations" / folder
        if not img_dir.is_dir():
            continue
        images = list_images(img_dir)
        missing = [p.name for p in images if not (ann_dir / f"{p.stem}.png").is_file()]
        if missing:
            raise layout_error(
                ann_dir,
                f"{len(missing)} images have no annotation PNG, e.g. {missing[0]}",
                ADE_LAYOUT,
            )
        splits[split] = Split(
            size=len(images),
            image_fn=lambda i, images=images: load_rgb(images[i]),
            mask_fn=lambda i, images=images, ann_dir=ann_dir: _ade_mask(
                ann_dir / f"{images[i].stem}.png"
            ),
            keys=[p.stem for p in images],
        )
    if not splits:
        raise layout_error(base, "no images/training or images/validation folder", ADE_LAYOUT)
    return EvalDataset(name="ade20k", splits=splits, class_names=_ade_names(base), root=str(base))
