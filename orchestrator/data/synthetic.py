"""The synthetic spatial data set: coloured shapes at known places and depths.

What it is for: docs/design.md, "Synthetic data set".

    write_synthetic("demo_data/synth", n=1024, seed=0)   # == tips data synth --out ... --n 1024
    -> demo_data/synth/train/shard-*.parquet   image, alt_text, captions, regions, meta
       demo_data/synth/eval/shard-*.parquet    the same + class_mask, depth (PNG bytes)

Each image shows 1-4 shapes (``SHAPES`` x ``COLOURS`` x ``SIZES``) at random, mostly
non-overlapping places on a textured background (``BACKGROUNDS``). Every object sits at its
own depth (metres, ``OBJECT_DEPTH_M``) in front of a background plane that recedes from 6 m
(bottom row) to 10 m (top row); nearer objects are painted over farther ones.

Text: ``short`` caption = the most visible object and where it is ("a red circle at the top
left"); ``long`` caption = every visible object, near to far, with size and place, the
relation of the two nearest, and the background; ``alt_text`` is web-like: noisy and partial
(sometimes a file name or a wrong colour); ``regions`` = one xyxy box in [0, 1] and a phrase
per visible object.

Evaluation split (``eval/``): extra binary columns ``class_mask`` (8-bit PNG of class ids,
index into ``CLASS_NAMES``, 0 = background) and ``depth`` (16-bit PNG, millimetres);
``read_eval_split`` decodes them. ``CLASS_NAMES`` is the fixed zero-shot vocabulary.

Record ``i`` of split ``s`` depends only on ``(seed, s, i)``: the set is deterministic and can
be generated in any order.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from orchestrator import storage as st
from orchestrator.data.shards import BadRecord, Record, ShardInfo, ShardWriter, iter_records

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 200),
    "orange": (250, 135, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.14, "large": 0.21}  # radius / side
BACKGROUNDS = ("striped", "checkered", "mottled", "gradient")
CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(
    f"{colour} {shape}" for shape in SHAPES for colour in COLOUR_NAMES
)
CAPTION_KINDS = ("short", "long")
OBJECT_DEPTH_M = (1.5, 5.5)
BACKGROUND_DEPTH_M = (6.0, 10.0)  # bottom row, top row
DEPTH_SCALE = 1000.0  # depth PNG units per metre (millimetres)
SPLITS = {"train": 0, "eval": 1}
_PLACES = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the center", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)


def class_id(shape: str, colour: str) -> int:
    """Class index of a (shape, colour) pair in ``CLASS_NAMES``."""
    return 1 + SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, fraction of the width
    cy: float  # centre, fraction of the height
    depth: float  # metres
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # visible xyxy in [0, 1]
    visible: float = 0.0  # visible fraction of its pixels

    @property
    def place(self) -> str:
        row, col = min(int(self.cy * 3), 2), min(int(self.cx * 3), 2)
        return _PLACES[row][col]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


class Scene(NamedTuple):
    image: np.ndarray  # [H, W, 3] uint8
    class_mask: np.ndarray  # [H, W] uint8, index into CLASS_NAMES
    depth: np.ndarray  # [H, W] float32 metres
    objects: list[SceneObject]  # far to near (painting order)
    background: str


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float):
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # apex up, base at cy + 0.7 r
        t = (dy + r) / (1.7 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= 0.95 * r * t)
    arm = 0.33 * r  # cross
    return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    base = rng.uniform(90, 170) + rng.uniform(-12, 12, size=3)  # muted: never an object colour
    other = base + rng.choice([-1, 1]) * rng.uniform(25, 45)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "striped":
        angle, period = rng.uniform(0, math.pi), rng.uniform(5, 14)
        t = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0
    elif kind == "checkered":
        cell = int(rng.integers(4, 12))
        t = ((xx // cell + yy // cell) % 2).astype(bool)
    elif kind == "mottled":
        coarse = rng.random((6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    else:  # gradient
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / size
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    t = np.asarray(t, dtype=np.float32)[..., None]
    img = base * (1 - t) + other * t + rng.normal(0, 4, size=(size, size, 3))
    return img


def _place_objects(rng: np.random.Generator) -> list[SceneObject]:
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(1, 5))):
        size = str(rng.choice(list(SIZES)))
        r = SIZES[size]
        for _try in range(20):  # keep shapes mostly apart so captions stay true
            cx, cy = rng.uniform(r, 1 - r, size=2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > 0.8 * (r + SIZES[o.size]) for o in objects):
                objects.append(
                    SceneObject(
                        shape=str(rng.choice(SHAPES)),
                        colour=str(rng.choice(COLOUR_NAMES)),
                        size=size,
                        cx=float(cx),
                        cy=float(cy),
                        depth=float(rng.uniform(*OBJECT_DEPTH_M)),
                    )
                )
                break
    return sorted(objects, key=lambda o: -o.depth)  # far to near


def render_scene(rng: np.random.Generator, image_size: int = 64) -> Scene:
    """Draw one scene.

    Args:
        rng: the scene's generator.
        image_size: side in pixels (square images).

    Returns:
        The image, per-pixel class ids and depth, and the objects with their visible boxes.
    """
    s = image_size
    background = str(rng.choice(BACKGROUNDS))
    img = _background(rng, s, background)
    yy, xx = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5) / s
    rows = np.linspace(BACKGROUND_DEPTH_M[1], BACKGROUND_DEPTH_M[0], s, dtype=np.float32)
    depth = np.repeat(rows[:, None], s, axis=1)
    owner = np.full((s, s), -1, dtype=np.int64)
    class_mask = np.zeros((s, s), dtype=np.uint8)
    objects = _place_objects(rng)
    sizes = []
    for i, o in enumerate(objects):
        m = _shape_mask(o.shape, xx, yy, o.cx, o.cy, SIZES[o.size])
        shade = np.asarray(COLOURS[o.colour], np.float32) * rng.uniform(0.9, 1.05)
        img[m] = shade + rng.normal(0, 3, size=(int(m.sum()), 3))
        depth[m], owner[m], class_mask[m] = o.depth, i, class_id(o.shape, o.colour)
        sizes.append(max(int(m.sum()), 1))
    for i, o in enumerate(objects):
        ys, xs = np.nonzero(owner == i)
        o.visible = len(ys) / sizes[i]
        if len(ys):
            o.box = (xs.min() / s, ys.min() / s, (xs.max() + 1) / s, (ys.max() + 1) / s)
    image = np.clip(img, 0, 255).round().astype(np.uint8)
    return Scene(image, class_mask, depth.astype(np.float32), objects, background)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def captions_for(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """``(short, long, alt_text)`` for a scene (only objects at least 30% visible)."""
    seen = [o for o in reversed(scene.objects) if o.visible >= 0.3]  # near to far
    tone = scene.background
    if not seen:
        return (
            f"a {tone} background",
            f"an empty {tone} background with no shapes",
            f"{tone} texture",
        )
    main = max(seen, key=lambda o: o.visible * SIZES[o.size])
    short = f"{_article(main.colour)} {main.name} {main.place}"
    phrases = [f"{_article(o.size)} {o.size} {o.name} {o.place}" for o in seen]
    if len(seen) == 1:
        long = f"{phrases[0]}, in front of a {tone} background"
    else:
        long = "from near to far: " + ", ".join(phrases) + f"; on a {tone} background"
        a, b = seen[0], seen[1]
        side = "left of" if a.cx < b.cx else "right of"
        long += f". the {a.name} is in front of the {b.name} and {side} it"
    pick = seen[int(rng.integers(len(seen)))]
    colour = pick.colour if rng.random() > 0.2 else str(rng.choice(COLOUR_NAMES))  # noisy
    templates = (
        f"{colour} {pick.shape}",
        f"IMG_{int(rng.integers(1000, 9999))}.png",
        f"nice {pick.shape} pic",
        f"#{colour} #{pick.shape} #art",
        "abstract shapes wallpaper",
        f"{pick.shape}s on {tone} paper, free download",
    )
    return short, long, templates[int(rng.integers(len(templates)))]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_record(seed: int, split: str, index: int, image_size: int = 64) -> Record:
    """Record ``index`` of ``split`` ("train" | "eval"); eval records carry dense maps."""
    rng = np.random.default_rng([seed % 2**32, SPLITS[split], index])
    scene = render_scene(rng, image_size)
    short, long, alt = captions_for(scene, rng)
    record: Record = {
        "key": f"{split}-{index:07d}",
        "image": _png(scene.image),
        "alt_text": alt,
        "captions": [{"kind": "short", "text": short}, {"kind": "long", "text": long}],
        "regions": [
            {
                "box": [round(float(v), 4) for v in o.box],
                "text": f"{_article(o.size)} {o.size} {o.name}",
            }
            for o in reversed(scene.objects)
            if o.visible >= 0.3
        ],
        "meta": json.dumps(
            {
                "background": scene.background,
                "objects": [
                    {
                        "shape": o.shape,
                        "colour": o.colour,
                        "size": o.size,
                        "cx": round(o.cx, 4),
                        "cy": round(o.cy, 4),
                        "depth_m": round(o.depth, 3),
                        "class_id": class_id(o.shape, o.colour),
                        "visible": round(o.visible, 3),
                    }
                    for o in scene.objects
                ],
            }
        ),
    }
    if split == "eval":
        record["class_mask"] = _png(scene.class_mask)
        record["depth"] = _png(np.round(scene.depth * DEPTH_SCALE).astype(np.uint16))
    return record


def write_synthetic(
    out_uri: str,
    n: int,
    seed: int = 0,
    *,
    image_size: int = 64,
    format: str = "parquet",
    shard_size: int = 256,
    n_eval: int | None = None,
    storage: Any | None = None,
    overwrite: bool = False,
    progress: Any | None = None,
) -> dict[str, list[ShardInfo]]:
    """Write ``out_uri/train`` (``n`` records) and ``out_uri/eval`` (``n_eval`` records).

    Args:
        out_uri: output directory or ``s3://bucket/prefix``.
        n: training records.
        seed: data-set seed.
        image_size: image side in pixels.
        format: "parquet" or "webdataset".
        shard_size: records per shard.
        n_eval: evaluation records (default ``max(16, n // 8)``).
        storage: ``cfg.storage`` or None.
        overwrite: replace existing shards.
        progress: optional callable ``progress(num_records)`` (e.g. a tqdm ``update``).

    Returns:
        Split name -> written shards.
    """
    n_eval = max(16, n // 8) if n_eval is None else n_eval
    written = {}
    for split, count in (("train", n), ("eval", n_eval)):
        extras = ("class_mask", "depth") if split == "eval" else ()
        with ShardWriter(
            st.join_uri(out_uri, split),
            format=format,
            shard_size=shard_size,
            row_group_size=min(64, shard_size),
            extra_columns=extras,
            storage=storage,
            overwrite=overwrite,
        ) as writer:
            for i in range(count):
                writer.write(make_record(seed, split, i, image_size))
                if progress is not None:
                    progress(1)
        written[split] = writer.shards
    return written


class EvalSample(NamedTuple):
    key: str
    image: np.ndarray  # [H, W, 3] uint8
    class_mask: np.ndarray  # [H, W] uint8, index into CLASS_NAMES (0 = background)
    depth: np.ndarray  # [H, W] float32 metres
    alt_text: str
    captions: dict[str, str]  # kind -> text
    regions: list[dict[str, Any]]  # {box: xyxy in [0, 1], text}


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "I;16", "I") else im)


def read_eval_split(uri: str, storage: Any | None = None) -> Iterator[EvalSample]:
    """Decode the evaluation split (``out_uri/eval``) record by record, in key order.

    Raises:
        ShardError: a record lacks ``class_mask`` / ``depth`` (not an evaluation split).
    """
    from orchestrator.data.shards import ShardError

    for rec in iter_records(uri, storage):
        if isinstance(rec, BadRecord):
            raise ShardError(f"{uri}: evaluation record {rec.key} unreadable: {rec.detail}")
        if not rec.get("class_mask") or not rec.get("depth"):
            raise ShardError(
                f"{uri}: record {rec['key']} has no class_mask/depth column; "
                "pass the eval/ split written by `tips data synth`"
            )
        yield EvalSample(
            key=rec["key"],
            image=_decode(rec["image"]),
            class_mask=_decode(rec["class_mask"]).astype(np.uint8),
            depth=_decode(rec["depth"]).astype(np.float32) / DEPTH_SCALE,
            alt_text=rec["alt_text"],
            captions={c["kind"]: c["text"] for c in rec["captions"]},
            regions=list(rec.get("regions") or []),
        )


def load_eval_arrays(
    uri: str, storage: Any | None = None, limit: int | None = None
) -> dict[str, Any]:
    """The evaluation split stacked: images [N, H, W, 3] uint8, class_mask [N, H, W] uint8,
    depth [N, H, W] float32 metres, keys and captions lists."""
    samples = []
    for sample in read_eval_split(uri, storage):
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    return {
        "keys": [s.key for s in samples],
        "images": np.stack([s.image for s in samples]),
        "class_mask": np.stack([s.class_mask for s in samples]),
        "depth": np.stack([s.depth for s in samples]),
        "captions": [s.captions for s in samples],
        "class_names": CLASS_NAMES,
    }
