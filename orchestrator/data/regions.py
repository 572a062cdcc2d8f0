"""`tips data regions`: boxes and phrases from an open-vocabulary detector, for CLOC.

    region_shards(src, out, model=, spec=RegionSpec(queries, threshold, max_regions), ...)
        -> JobReport (orchestrator/data/ingest.py)

CLOC's region objective reads the ``regions`` column: a list of ``{box, text}`` with the box
xyxy in [0, 1] of the image (orchestrator/data/shards.py; the synthetic set writes the same,
orchestrator/data/synthetic.py; the pipeline crops them, orchestrator/data/pipeline.py). An
open-vocabulary detector (OWLv2 through transformers: ``AutoProcessor`` +
``AutoModelForZeroShotObjectDetection``, e.g. ``google/owlv2-base-patch16-ensemble``) scores
each text query against each image; detections above ``threshold``, best first, at most
``max_regions``, become the record's regions (replacing any), with ``meta.regions`` noting
model, queries and threshold. The execution is ``tips data caption``'s
(orchestrator/data/caption.py ``annotate_shards``): read tasks, an actor pool of detectors,
shards published whole, finished shards skipped on a rerun, bad images counted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from PIL import Image

from orchestrator.data.caption import (
    Captioner,
    Job,
    Pool,
    annotate_shards,
    meta_json,
    offline,
)
from orchestrator.data.ingest import JobReport
from orchestrator.data.shards import Record


@dataclass(frozen=True)
class RegionSpec:
    """The text queries (phrases) to detect, the score threshold, regions kept per image."""

    queries: tuple[str, ...]
    threshold: float = 0.2
    max_regions: int = 8


class DetectModel:
    """``DetectModel(id_or_folder, spec)(images) -> [JSON list of {box, text}]`` per image."""

    def __init__(
        self,
        model: str,
        spec: RegionSpec,
        device: str = "auto",
        local_files_only: bool | None = None,
        num_threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device, self.spec = device, spec
        kw = {"local_files_only": offline() if local_files_only is None else local_files_only}
        self.processor = AutoProcessor.from_pretrained(model, **kw)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model, **kw)
        self.model.to(device).eval()
        # OWL-ViT/OWLv2 pad each image to a square at the bottom right: boxes come relative
        # to that square
        self.square = self.model.config.model_type.startswith("owl")

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        queries = [list(self.spec.queries)] * len(images)
        inputs = self.processor(
            text=queries, images=images, return_tensors="pt", padding=True, truncation=True
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [
            (max(im.size), max(im.size)) if self.square else (im.size[1], im.size[0])
            for im in images
        ]
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.spec.threshold, target_sizes=sizes, text_labels=queries
        )
        return [
            json.dumps(self._regions(r, im.size)) for r, im in zip(results, images, strict=True)
        ]

    def _regions(self, result: dict[str, Any], size: tuple[int, int]) -> list[dict[str, Any]]:
        w, h = size
        order = result["scores"].argsort(descending=True).tolist()
        out = []
        for i in order:
            x0, y0, x1, y1 = result["boxes"][i].tolist()
            box = [min(max(v / s, 0.0), 1.0) for v, s in ((x0, w), (y0, h), (x1, w), (y1, h))]
            if box[2] > box[0] and box[3] > box[1]:  # a box with no area tells CLOC nothing
                out.append({"box": [round(v, 4) for v in box], "text": result["text_labels"][i]})
            if len(out) == self.spec.max_regions:
                break
        return out


class Detector(Captioner):
    """The Ray Data actor: one ``DetectModel`` per actor (batches as ``Captioner``)."""

    def __init__(
        self,
        model: str,
        spec: dict[str, Any],
        device: str,
        local_files_only: bool,
        num_threads: int | None,
    ) -> None:
        spec = {**spec, "queries": tuple(spec["queries"])}
        self.model = DetectModel(model, RegionSpec(**spec), device, local_files_only, num_threads)


def regions_apply(rec: Record, payload: str, entry: dict[str, Any]) -> Record:
    """``rec`` with its ``regions`` replaced by the detections; ``meta.regions`` = entry."""
    return {**rec, "regions": json.loads(payload), "meta": meta_json(rec.get("meta"), entry)}


def region_shards(
    src: str,
    out: str,
    *,
    model: str,
    spec: RegionSpec,
    batch_size: int = 8,
    concurrency: int = 1,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    device: str = "auto",
    storage: Any | None = None,
    overwrite: bool = False,
    progress: Any = None,
) -> JobReport:
    """Detect ``spec.queries`` in every record of ``src``; new shards at ``out``.

    Raises:
        ValueError: no queries, ``out`` is ``src``; ShardError: no shards at ``src``.
    """
    if not spec.queries or not all(q.strip() for q in spec.queries):
        raise ValueError("regions needs at least one non-empty text query (--queries)")
    entry = {"regions": {"model": model, **asdict(spec)}}
    job = Job(Detector, {"model": model, "spec": asdict(spec)}, partial(regions_apply, entry=entry))
    return annotate_shards(
        src,
        out,
        job,
        Pool(batch_size, concurrency, num_gpus, num_cpus, device),
        storage=storage,
        overwrite=overwrite,
        progress=progress,
    )
