"""COCO / Flickr30k captions in the Karpathy-split JSON format, for image-text retrieval.

Layout::

    ROOT/dataset_coco.json  (or dataset_flickr30k.json, dataset_flickr8k.json)
    ROOT/<filepath>/<filename>      COCO: ROOT/val2014/COCO_val2014_000000391895.jpg
    ROOT/<filename>                 Flickr30k (no "filepath"), also accepted under
    ROOT/images/... or ROOT/flickr30k-images/...

JSON (Karpathy & Fei-Fei 2015, ``neuraltalk2`` release)::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "...jpg",
      "split": "train|restval|val|test", "sentences": [{"raw": "A man ..."}, ...]}, ...]}

The standard retrieval test sets are the "test" splits: 5,000 COCO images / 1,000 Flickr30k
images with 5 captions each (CLIP, ALIGN; docs/method.md, "Published numbers"). "restval"
counts as "train".
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.eval.readers.base import EvalDataset, Split, layout_error, load_rgb

LAYOUT = """\
  ROOT/dataset_coco.json | dataset_flickr30k.json   (Karpathy split JSON:
      {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw": ...}]}]})
  ROOT/<filepath>/<filename>  or  ROOT/<filename>  or  ROOT/images/...  or
  ROOT/flickr30k-images/<filename>"""

_SPLIT_ALIASES = {"restval": "train"}


def _find_json(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("dataset_*.json"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise layout_error(
                path, f"several Karpathy JSON files ({[p.name for p in found]}); name one", LAYOUT
            )
    raise layout_error(path, "no dataset_*.json Karpathy split file found", LAYOUT)


def _candidates(root: Path, entry: dict) -> list[Path]:
    fp, fn = entry.get("filepath", ""), entry["filename"]
    out = [root / fp / fn, root / fn, root / "images" / fp / fn, root / "images" / fn]
    return out + [root / "flickr30k-images" / fn]


def read_karpathy(path: str | Path, image_root: str | Path | None = None) -> EvalDataset:
    """Read a Karpathy-split captions JSON and locate its images.

    Args:
        path: the JSON file, or a directory holding exactly one ``dataset_*.json``.
        image_root: where image paths are relative to (default: the JSON's directory).

    Returns:
        EvalDataset named after the JSON's "dataset" field, with splits among
        "train", "val", "test"; each image's ``captions`` are its sentences' "raw" text.

    Raises:
        ReaderError: no JSON, malformed JSON, or the first image of a split not found.
    """
    json_path = _find_json(Path(path))
    try:
        meta = json.loads(json_path.read_text())
        entries = meta["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise layout_error(json_path, f"not a Karpathy split JSON ({e!r})", LAYOUT) from e
    root = Path(image_root) if image_root else json_path.parent
    grouped: dict[str, list[dict]] = {}
    for entry in entries:
        if "filename" not in entry or "sentences" not in entry:
            raise layout_error(json_path, "an image entry lacks 'filename' or 'sentences'", LAYOUT)
        split = _SPLIT_ALIASES.get(entry.get("split", "test"), entry.get("split", "test"))
        grouped.setdefault(split, []).append(entry)
    if not grouped:
        raise layout_error(json_path, "no images listed", LAYOUT)
    splits = {}
    for split, items in grouped.items():
        # Which of the accepted layouts holds the images: decided on the split's first image.
        tried = _candidates(root, items[0])
        which = next((i for i, p in enumerate(tried) if p.is_file()), None)
        if which is None:
            raise layout_error(
                json_path,
                f"image {items[0]['filename']!r} not found; tried {[str(p) for p in tried]}",
                LAYOUT,
            )
        paths = [_candidates(root, e)[which] for e in items]
        splits[split] = Split(
            size=len(items),
            image_fn=lambda i, paths=paths: load_rgb(paths[i]),
            captions=[[str(s["raw"]).strip() for s in e["sentences"]] for e in items],
            keys=[Path(e["filename"]).stem for e in items],
        )
    name = str(meta.get("dataset", json_path.stem.removeprefix("dataset_")))
    return EvalDataset(name=name, splits=splits, root=str(json_path))
