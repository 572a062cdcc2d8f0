"""`tips data caption`: synthetic captions of a named kind, added to shards on Ray Data.

    caption_shards(src, out, model=, spec=CaptionSpec(kind, prompt, max_new_tokens), ...)
        -> JobReport (orchestrator/data/ingest.py)

TIPS trains on captions written by an image-captioning model beside the web alt-text, at
several granularities (docs/design.md, "Shard schema": ``captions[].kind``). The kinds and
their prompts live in caption_prompts.yaml beside this file (``--prompts`` names another).

The job, per source shard set (orchestrator/data/shards.py):

1. one read task per pending row group (``from_items`` -> ``map_batches``) yields
   ``(shard, unit, pos, n, image)`` rows; an unreadable run of records is one row with
   ``n`` records and no image;
2. ``map_batches(Captioner, concurrency=C, num_gpus=G, batch_size=B)``: an actor pool, each
   actor holding one ``CaptionModel`` (transformers ``AutoProcessor`` +
   ``AutoModelForImageTextToText``: BLIP, Florence-2, PaliGemma, VisionEncoderDecoder...;
   bf16 on GPU, float32 on CPU), returns only ``(shard, unit, pos, n, text, status)``, so
   image bytes never reach the driver;
3. the driver counts rows per shard; when a shard's rows are all in, a Ray task re-reads
   it, adds ``{kind, text}`` to each captioned record (a caption of the same kind is
   replaced), records ``{"captioner": {kind: {model, prompt}}}`` in ``meta``, and publishes
   it whole under the same name (``ingest.publish_shard``). Every other column passes
   through unchanged.

Steps 1-3 are ``annotate_shards``, which ``tips data regions`` (orchestrator/data/regions.py)
runs with a detector actor instead. Output shards already published are skipped on a rerun
(resume shard by shard). A record
whose image does not decode keeps its row without the new caption and is counted
(``corrupt_image``); so are empty captions and model failures on one image.

Models load with ``local_files_only`` when ``HF_HUB_OFFLINE`` is set: nothing is downloaded
then; pass a model id already in the Hugging Face cache or a ``save_pretrained`` folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from orchestrator import storage as st
from orchestrator.data.ingest import (
    JobReport,
    clear_output,
    finished_names,
    init_ray,
    merge_manifest,
    publish_shard,
    stats_row,
)
from orchestrator.data.shards import (
    BadRecord,
    Record,
    ShardInfo,
    iter_unit,
    list_shards,
)

logger = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).with_name("caption_prompts.yaml")
TRUE = ("1", "true", "yes", "on")
READ_TASKS = 4  # row groups read at once
WRITE_TASKS = 4  # shards written at once (each holds its shard in memory)


@dataclass(frozen=True)
class CaptionSpec:
    """One caption kind: the prompt given with each image and the token budget."""

    kind: str
    prompt: str = ""
    max_new_tokens: int = 40


def load_prompts(path: str | Path | None = None) -> dict[str, CaptionSpec]:
    """Caption kinds from a YAML ``{kind: {prompt, max_new_tokens}}`` (default: packaged)."""
    import yaml

    doc = yaml.safe_load(Path(path or PROMPTS_FILE).read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of caption kinds")
    return {
        str(kind): CaptionSpec(
            str(kind), str(v.get("prompt") or ""), int(v.get("max_new_tokens", 40))
        )
        for kind, v in doc.items()
    }


def caption_spec(
    kind: str,
    prompts: str | Path | None = None,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
) -> CaptionSpec:
    """The spec of ``kind`` from the prompts file; ``prompt`` / ``max_new_tokens`` override.

    Raises:
        ValueError: ``kind`` is not in the file and no ``prompt`` is given.
    """
    known = load_prompts(prompts)
    if kind not in known and prompt is None:
        raise ValueError(
            f"caption kind {kind!r} has no prompt in {prompts or PROMPTS_FILE} "
            f"(kinds: {sorted(known)}); pass --prompt"
        )
    base = known.get(kind, CaptionSpec(kind))
    return CaptionSpec(
        kind,
        base.prompt if prompt is None else prompt,
        max_new_tokens or base.max_new_tokens,
    )


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE


def check_model(model: str) -> None:
    """Refuse, before any job starts, a model that is neither a folder nor (offline) in the
    local Hugging Face cache.

    Raises:
        ValueError: with the command that fetches it.
    """
    if Path(model).expanduser().is_dir():
        if not (Path(model).expanduser() / "config.json").is_file():
            raise ValueError(f"{model}: no config.json (a save_pretrained folder is expected)")
        return
    if Path(model).expanduser().exists() or model.startswith(("/", "./", "../")):
        raise ValueError(f"{model}: not a model folder")
    if offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ValueError(
                f"model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                f"is set: download it first (`hf download {model}`) or pass a folder"
            )


# --------------------------------------------------------------------------- the model


class CaptionModel:
    """A transformers captioning model: ``CaptionModel(id_or_folder, spec)(images) -> texts``.

    ``AutoProcessor`` prepares images and prompt together (BLIP, Florence-2, PaliGemma...);
    a VisionEncoderDecoder folder has no processor class, so its image processor and
    tokenizer are loaded apart and the prompt becomes the decoder's first tokens. The
    prompt's tokens are cut from what ``generate`` returns (greedy decoding).
    """

    def __init__(
        self,
        model: str,
        spec: CaptionSpec,
        device: str = "auto",
        local_files_only: bool | None = None,
        num_threads: int | None = None,
    ) -> None:
        import torch
        from transformers import (
            AutoImageProcessor,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device, self.spec, self.name = device, spec, model
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        kw = {"local_files_only": offline() if local_files_only is None else local_files_only}
        self.processor = AutoProcessor.from_pretrained(model, **kw)
        self.image_processor = None
        if not hasattr(self.processor, "image_processor"):  # a tokenizer: VisionEncoderDecoder
            self.image_processor = AutoImageProcessor.from_pretrained(model, **kw)
            self.processor = AutoTokenizer.from_pretrained(model, **kw)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype, **kw)
        self.model.to(device).eval()
        self.calls = 0

    def _inputs(self, images: list[Image.Image]) -> tuple[dict[str, Any], Any]:
        import torch

        n, prompt = len(images), self.spec.prompt
        if self.image_processor is not None:
            pixels = self.image_processor(images, return_tensors="pt")["pixel_values"]
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            start = self.model.config.decoder_start_token_id
            prefix = torch.tensor([[start, *ids]] * n)
            inputs = {
                "pixel_values": pixels,
                "decoder_input_ids": prefix,
                "decoder_attention_mask": torch.ones_like(prefix),
            }
        else:
            text = [prompt] * n if prompt else None
            inputs = dict(self.processor(images=images, text=text, return_tensors="pt"))
            prefix = inputs.get("input_ids")
        moved = {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }
        return moved, prefix

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (greedy, at most ``spec.max_new_tokens`` new tokens)."""
        import torch

        self.calls += 1
        inputs, prefix = self._inputs(images)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.spec.max_new_tokens, do_sample=False
            )
        out = out.cpu()
        texts = []
        for i in range(out.shape[0]):
            cut = 0
            if prefix is not None:  # the longest shared start: the prompt the model echoes
                p = prefix[i].cpu()
                while cut < min(len(p), out.shape[1]) and out[i, cut] == p[cut]:
                    cut += 1
            texts.append(self.tokenizer.decode(out[i, cut:], skip_special_tokens=True).strip())
        return texts


def caption_images(model: Callable[[list[Any]], list[str]], images: list[bytes | None]) -> Any:
    """``(texts, statuses)`` for encoded images; None = an unreadable record. One batched
    call; if it fails, one call per image, so a single bad image loses only itself."""
    texts, status = [""] * len(images), ["unreadable"] * len(images)
    good: list[tuple[int, Image.Image]] = []
    for i, data in enumerate(images):
        if data is None:
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                good.append((i, im.convert("RGB")))
        except Exception:  # noqa: BLE001 (any decode failure: counted, the job goes on)
            status[i] = "corrupt_image"
    try:
        results = model([im for _, im in good]) if good else []
    except Exception as e:  # noqa: BLE001
        logger.warning("batch of %d failed (%s); captioning one by one", len(good), e)
        results = []
        for _, im in good:
            try:
                results.extend(model([im]))
            except Exception:  # noqa: BLE001
                results.append(None)
    for (i, _), text in zip(good, results, strict=True):
        texts[i] = text or ""
        status[i] = "ok" if text else ("caption_failed" if text is None else "empty_caption")
    return texts, status


class Captioner:
    """The Ray Data actor: one ``CaptionModel`` per actor, called on batches of rows."""

    def __init__(
        self,
        model: str,
        spec: dict[str, Any],
        device: str,
        local_files_only: bool,
        num_threads: int | None,
    ) -> None:
        self.model = CaptionModel(model, CaptionSpec(**spec), device, local_files_only, num_threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = [
            None if bad else data for data, bad in zip(batch["image"], batch["bad"], strict=True)
        ]
        texts, status = caption_images(self.model, images)
        keep = ("shard", "unit", "pos", "n")
        return {**{k: batch[k] for k in keep}, "text": texts, "status": status}


# --------------------------------------------------------------------------- shards


def unit_rows(info: ShardInfo, shard: int, unit: int, storage: Any | None) -> dict[str, list]:
    """The rows of one read unit for the captioning stage (key and image only)."""
    rows: dict[str, list] = {k: [] for k in ("shard", "unit", "pos", "n", "image", "bad")}
    for pos, item in enumerate(iter_unit(info, unit, storage, columns=["key", "image"])):
        bad = isinstance(item, BadRecord)
        for k, v in zip(
            rows,
            (shard, unit, pos, item.count if bad else 1, b"" if bad else item["image"], bad),
            strict=True,
        ):
            rows[k].append(v)
    return rows


def _meta_doc(meta: Any) -> dict[str, Any]:
    try:
        doc = json.loads(meta) if isinstance(meta, str) else (meta or {})
    except ValueError:
        doc = {"source_meta": meta}
    return doc if isinstance(doc, dict) else {"source_meta": doc}


def meta_json(meta: Any, update: dict[str, Any]) -> str:
    """A record's ``meta`` (JSON string, dict or None) with ``update``'s keys set, as JSON."""
    return json.dumps({**_meta_doc(meta), **update})


def _meta_with(meta: Any, kind: str, entry: dict[str, str]) -> str:
    doc = _meta_doc(meta)
    doc.setdefault("captioner", {})[kind] = entry
    return json.dumps(doc)


def add_captions(rec: Record, kind: str, text: str, entry: dict[str, str]) -> Record:
    """``rec`` with caption ``{kind, text}`` (replacing one of that kind) and ``meta`` noting
    the model; every other field is the same object."""
    caps = [c for c in rec.get("captions") or [] if c["kind"] != kind]
    return {
        **rec,
        "captions": [*caps, {"kind": kind, "text": text}],
        "meta": _meta_with(rec.get("meta"), kind, entry),
    }


def caption_apply(rec: Record, text: str, kind: str, entry: dict[str, str]) -> Record:
    """``write_annotated``'s update for captions (a module function: it travels to tasks)."""
    return add_captions(rec, kind, text, entry)


def write_annotated(
    info: ShardInfo,
    task: int,
    dst: str,
    payloads: dict[tuple[int, int], str],
    apply: Callable[[Record, str], Record],
    storage: Any | None,
) -> dict[str, Any]:
    """Re-read shard ``info``, ``apply(record, payloads[(unit, pos)])`` to each record that
    has a payload (others stay as they are), publish the result at ``dst``."""
    records: list[Record] = []
    lost = 0
    for unit in range(len(info.row_groups)):
        for pos, item in enumerate(iter_unit(info, unit, storage)):
            if isinstance(item, BadRecord):
                lost += item.count
                continue
            payload = payloads.get((unit, pos))
            records.append(apply(item, payload) if payload else item)
    published = None
    if records:
        published = publish_shard(
            records, dst, format=info.format, row_group_size=info.row_groups[0], storage=storage
        )
    skipped = Counter({"unreadable": lost} if lost else {})
    return stats_row(task, len(records), skipped, published, captioned=len(payloads))


# --------------------------------------------------------------------------- the job


class _Collector:
    """Driver side: gathers caption rows per shard and starts a shard's write task as soon
    as all of its records are in (a shard is published only whole)."""

    def __init__(self, pending: dict[int, tuple[ShardInfo, str]], write: Callable) -> None:
        self.pending, self.write = pending, write
        self.texts: dict[int, dict[tuple[int, int], str]] = {i: {} for i in pending}
        self.seen: Counter = Counter()
        self.status: Counter = Counter()
        self.futures: list[Any] = []
        self.done: list[dict[str, Any]] = []

    def add(self, batch: dict[str, Any]) -> int:
        """Take one batch of caption rows; returns how many records it accounted for."""
        records = 0
        for shard, unit, pos, n, text, status in zip(
            *(batch[k] for k in ("shard", "unit", "pos", "n", "text", "status")), strict=True
        ):
            shard, n = int(shard), int(n)
            records += n
            self.seen[shard] += n
            if status == "ok":
                self.texts[shard][(int(unit), int(pos))] = str(text)
            elif status != "unreadable":  # unreadable records are counted by the writer
                self.status[str(status)] += n
            info, dst = self.pending[shard]
            if self.seen[shard] == info.num_rows:
                self._throttle(WRITE_TASKS - 1)
                self.futures.append(self.write(info, shard, dst, self.texts.pop(shard)))
        return records

    def _throttle(self, limit: int) -> None:
        """Wait until at most ``limit`` shard writes are running."""
        import ray

        while len(self.futures) > limit:
            ready, self.futures = ray.wait(self.futures, num_returns=1)
            self.done.extend(ray.get(ready))

    def finish(self) -> list[dict[str, Any]]:
        """Every write's stats row, once all are done."""
        self._throttle(0)
        return self.done


def caption_shards(
    src: str,
    out: str,
    *,
    model: str,
    spec: CaptionSpec,
    batch_size: int = 8,
    concurrency: int = 1,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    device: str = "auto",
    storage: Any | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> JobReport:
    """Caption every record of the shards at ``src`` into new shards at ``out``.

    Args:
        model: a Hugging Face model id (in the local cache when offline) or a folder.
        spec: the caption kind, its prompt and token budget (``caption_spec``).
        batch_size: images per model call; concurrency: model actors; num_gpus: GPUs per
            actor (fractional shares a GPU); num_cpus: CPUs per actor (its torch threads).
        overwrite: delete ``out``'s shards first, else finished shards are skipped.

    Raises:
        ValueError: ``out`` is ``src``; ShardError: no shards at ``src``.
    """
    entry = {"model": model, "prompt": spec.prompt}
    actor_kwargs = {"model": model, "spec": asdict(spec)}
    return annotate_shards(
        src,
        out,
        Job(Captioner, actor_kwargs, partial(caption_apply, kind=spec.kind, entry=entry)),
        Pool(batch_size, concurrency, num_gpus, num_cpus, device),
        storage=storage,
        overwrite=overwrite,
        progress=progress,
    )


@dataclass(frozen=True)
class Job:
    """What an annotation job runs: the actor class (constructed with ``kwargs`` plus
    ``device``, ``local_files_only``, ``num_threads``; called on batches of unit rows, it
    returns ``shard, unit, pos, n, text, status``) and the record update for each ``text``."""

    actor: type
    kwargs: dict[str, Any]
    apply: Callable[[Record, str], Record]


@dataclass(frozen=True)
class Pool:
    """The actor pool: images per call, actors, GPUs and CPUs per actor, device."""

    batch_size: int = 8
    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    device: str = "auto"


def annotate_shards(
    src: str,
    out: str,
    job: Job,
    pool: Pool,
    *,
    storage: Any | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> JobReport:
    """Run ``job`` over every pending shard of ``src`` into ``out`` (see the module doc);
    ``tips data caption`` and ``tips data regions`` (orchestrator/data/regions.py)."""
    import ray

    out = st.normalize_uri(out)
    if out == st.normalize_uri(src):
        raise ValueError(f"{out}: write the new shards to a new location, not over the input")
    listing = list_shards(src, storage)
    if overwrite:
        clear_output(out, storage)
    done = finished_names(out, storage)
    names = {i: s.uri.rsplit("/", 1)[-1] for i, s in enumerate(listing.shards)}
    pending = {
        i: (s, st.join_uri(out, names[i]))
        for i, s in enumerate(listing.shards)
        if names[i] not in done
    }
    report = JobReport(shards_skipped=len(listing.shards) - len(pending))
    if listing.unreadable:
        report.skipped["unreadable_shards"] += len(listing.unreadable)
    start = time.monotonic()
    if pending:
        init_ray()
        write = ray.remote(num_cpus=0)(write_annotated)  # like the reads: no CPU held
        collector = _Collector(
            pending,
            lambda info, i, dst, texts: write.remote(info, i, dst, texts, job.apply, storage),
        )
        for batch in _annotate_dataset(pending, job, pool, storage).iter_batches(
            batch_size=None, batch_format="numpy"
        ):
            n = collector.add(batch)
            if progress:
                progress(n)
        for row in collector.finish():
            report.add(row)
        report.skipped.update(collector.status)
        if collector.texts:  # rows missing: never published, a rerun tries these again
            logger.warning(
                "%d shards incomplete: %s", len(collector.texts), sorted(collector.texts)
            )
            report.skipped["incomplete_shards"] += len(collector.texts)
    report.seconds = time.monotonic() - start
    if report.infos:
        merge_manifest(out, report.infos, storage)
    return report


def _annotate_dataset(
    pending: dict[int, tuple[ShardInfo, str]], job: Job, pool: Pool, storage: Any | None
) -> Any:
    """read units -> model actors, as a lazy Ray Data dataset of result rows."""
    import ray.data

    units = [
        {"shard": i, "unit": u} for i, (s, _) in pending.items() for u in range(len(s.row_groups))
    ]
    infos = {i: s for i, (s, _) in pending.items()}

    def read(batch: dict[str, Any]) -> dict[str, list]:
        parts = [
            unit_rows(infos[int(s)], int(s), int(u), storage)
            for s, u in zip(batch["shard"], batch["unit"], strict=True)
        ]
        return {k: [v for p in parts for v in p[k]] for k in parts[0]}

    ds = ray.data.from_items(units, override_num_blocks=len(units))
    # reads hold no CPU (I/O; the actors may hold every CPU: a read waiting for one would
    # stall the pool), at most READ_TASKS at a time
    ds = ds.map_batches(
        read,
        batch_size=1,
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=min(READ_TASKS, len(units))),
        batch_format="numpy",
    )
    device = pool.device
    if device == "auto":
        device = "cuda" if pool.num_gpus else "cpu"
    return ds.map_batches(
        job.actor,
        fn_constructor_kwargs={
            **job.kwargs,
            "device": device,
            "local_files_only": offline(),
            "num_threads": None if pool.num_gpus else max(1, int(pool.num_cpus)),
        },
        batch_size=pool.batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool.concurrency),
        num_gpus=pool.num_gpus or None,
        num_cpus=pool.num_cpus,
        batch_format="numpy",
    )
