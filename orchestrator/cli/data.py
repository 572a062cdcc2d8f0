"""`tips data synth|pack|inspect`: make, convert and check shard sets (local or s3://).

    tips data synth --out URI --n N --seed S [--image-size P] [--format parquet|webdataset]
                    [--shard-size K] [--n-eval M] [--overwrite]
    tips data pack --images DIR (--captions FILE.jsonl | --coco FILE.json) --out URI
                   [--shard-size N] [--format parquet|webdataset] [--coco-kind short]
    tips data inspect URI [--format auto|parquet|webdataset] [--no-decode] [--json]
    tips data ingest SRC --out URI [--format parquet|webdataset] [--image-column C]
                     [--text-column C] [--key-column C] [--overwrite]
    tips data caption SRC --out URI --kind KIND --model ID|DIR [--prompt P] [--prompts YAML]
                      [--batch-size B] [--concurrency C] [--num-gpus G] [--num-cpus N]
    tips data regions SRC --out URI --model ID|DIR --queries "a dog,a red car" [--threshold T]
                      [--max-regions R] [--batch-size B] [--concurrency C] [--num-gpus G]
    every sub-verb: [--endpoint-url URL] [--region R]   (else AWS_ENDPOINT_URL / AWS_REGION)

``synth`` writes ``URI/train`` and ``URI/eval`` (orchestrator/data/synthetic.py); ``pack``
and ``inspect`` are orchestrator/data/pack.py; ``ingest`` (img2dataset / Hugging Face
Parquet) ``caption`` (synthetic captions) and ``regions`` (detector boxes for CLOC) are Ray Data
jobs in orchestrator/data/ingest.py, orchestrator/data/caption.py and
orchestrator/data/regions.py. These are tools, not runs: they take
``--flags`` like any command-line tool, where train/tune/eval take ``key=value`` config.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
from typing import Any

from orchestrator import storage as st
from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from orchestrator.data.pack import _progress, inspect_shards, pack
from orchestrator.data.shards import ShardError

PROG = "tips data"
SUMMARY = "shards: synth, pack, ingest (img2dataset, HF), caption, regions, inspect"


def _storage(args: argparse.Namespace) -> Any:
    return SimpleNamespace(endpoint_url=args.endpoint_url, region=args.region)


def run_synth(args: argparse.Namespace) -> int:
    from orchestrator.data.synthetic import write_synthetic

    n_eval = args.n_eval if args.n_eval is not None else max(16, args.n // 8)
    with _progress(args.n + n_eval, "synth") as bar:
        written = write_synthetic(
            args.out,
            args.n,
            args.seed,
            image_size=args.image_size,
            format=args.format,
            shard_size=args.shard_size,
            n_eval=n_eval,
            storage=_storage(args),
            overwrite=args.overwrite,
            progress=bar.update,
        )
    for split, shards in written.items():
        rows = sum(s.num_rows for s in shards)
        print(
            f"{split}: {rows} records in {len(shards)} {args.format} shards at "
            f"{st.join_uri(st.normalize_uri(args.out), split)}"
        )
    return 0


# --------------------------------------------------------------------------- pack


def run_pack(args: argparse.Namespace) -> int:
    written, skipped = pack(
        args.images,
        args.out,
        captions=args.captions,
        coco=args.coco,
        shard_size=args.shard_size,
        format=args.format,
        coco_kind=args.coco_kind,
        storage=_storage(args),
        overwrite=args.overwrite,
    )
    total = sum(skipped.values())
    detail = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    print(f"packed {written} records into {st.normalize_uri(args.out)}; skipped {total} ({detail})")
    return EXIT_OK if written else EXIT_FAILED


def run_inspect(args: argparse.Namespace) -> int:
    report = inspect_shards(args.uri, _storage(args), args.format, decode=not args.no_decode)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for name, value in report.items():
        print(f"{name:>20}: {value}")
    return 0


# --------------------------------------------------------------------------- ingest, caption


def run_ingest(args: argparse.Namespace) -> int:
    from orchestrator.data.ingest import Columns, ingest

    columns = Columns(args.image_column, args.text_column, args.key_column)
    with _progress(None, "ingest (files)") as bar:
        report = ingest(
            args.src,
            args.out,
            format=args.format,
            columns=columns,
            row_group_size=args.row_group_size,
            storage=_storage(args),
            overwrite=args.overwrite,
            progress=bar.update,
        )
    print(f"ingested {report.summary()} into {st.normalize_uri(args.out)}")
    return EXIT_OK if report.written or report.shards_skipped else EXIT_FAILED


def run_caption(args: argparse.Namespace) -> int:
    from orchestrator.data.caption import caption_shards, caption_spec, check_model
    from orchestrator.data.shards import list_shards

    spec = caption_spec(args.kind, args.prompts, args.prompt, args.max_new_tokens)
    check_model(args.model)
    total = list_shards(args.src, _storage(args)).num_rows
    with _progress(total, f"caption {spec.kind}") as bar:
        report = caption_shards(
            args.src,
            args.out,
            model=args.model,
            spec=spec,
            **_model_job_options(args, bar.update),
        )
    print(
        f"captioned {report.captioned} records ({spec.kind!r}, {args.model}) in "
        f"{report.seconds:.1f} s; wrote {report.summary()} into {st.normalize_uri(args.out)}"
    )
    return EXIT_OK if report.written or report.shards_skipped else EXIT_FAILED


def _model_job_options(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    """The settings ``caption`` and ``regions`` share: actor pool, devices, storage."""
    return {
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "num_gpus": args.num_gpus,
        "num_cpus": args.num_cpus,
        "device": args.device,
        "storage": _storage(args),
        "overwrite": args.overwrite,
        "progress": progress,
    }


def run_regions(args: argparse.Namespace) -> int:
    from orchestrator.data.caption import check_model
    from orchestrator.data.regions import RegionSpec, region_shards
    from orchestrator.data.shards import list_shards

    queries = [q.strip() for q in (args.queries or "").split(",") if q.strip()]
    if args.queries_file:
        queries += [q.strip() for q in st.read_text(args.queries_file).splitlines() if q.strip()]
    spec = RegionSpec(tuple(queries), args.threshold, args.max_regions)
    if not queries:
        raise ValueError("regions needs text queries: --queries 'a dog,a car' or --queries-file")
    check_model(args.model)
    total = list_shards(args.src, _storage(args)).num_rows
    with _progress(total, "regions") as bar:
        report = region_shards(
            args.src,
            args.out,
            model=args.model,
            spec=spec,
            **_model_job_options(args, bar.update),
        )
    print(
        f"detected regions in {report.captioned} records ({args.model}) in "
        f"{report.seconds:.1f} s; wrote {report.summary()} into {st.normalize_uri(args.out)}"
    )
    return EXIT_OK if report.written or report.shards_skipped else EXIT_FAILED


def _job(fn: Any) -> Any:
    """A Ray job verb: refusals before the start stay usage errors (exit 2); anything that
    fails once the job runs is a failed run (exit 1, one line)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ShardError, ValueError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 (a Ray task or actor error: one line)
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            return fail(f"{PROG} {args.verb}", f"failed: {first}", EXIT_FAILED)

    return run


def _add_job_parsers(sub: Any) -> list[argparse.ArgumentParser]:
    g = sub.add_parser("ingest", help="img2dataset tars / Parquet, HF Parquet -> shards")
    g.add_argument("src", help="folder or s3:// prefix of .tar or .parquet files")
    g.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
    g.add_argument("--image-column", default=None, help="Parquet: image bytes or {bytes} struct")
    g.add_argument("--text-column", default=None, help="Parquet: the alt-text column")
    g.add_argument("--key-column", default=None, help="Parquet: the record key column")
    g.add_argument("--row-group-size", type=int, default=64)
    c = sub.add_parser("caption", help="add synthetic captions of a kind (Ray Data actors)")
    c.add_argument("src", help="shard set to caption (left unchanged)")
    c.add_argument("--kind", required=True, help="caption kind, e.g. short or long")
    c.add_argument("--model", required=True, help="Hugging Face model id (cached) or folder")
    c.add_argument("--prompt", default=None, help="override the kind's prompt")
    c.add_argument("--prompts", default=None, help="YAML of {kind: {prompt, max_new_tokens}}")
    c.add_argument("--max-new-tokens", type=int, default=None)
    r = sub.add_parser("regions", help="add detector boxes + phrases (CLOC regions)")
    r.add_argument("src", help="shard set to label (left unchanged)")
    r.add_argument("--model", required=True, help="OWLv2 (or other zero-shot detector) id/folder")
    r.add_argument("--queries", default=None, help="comma-separated phrases to detect")
    r.add_argument("--queries-file", default=None, help="one phrase per line")
    r.add_argument("--threshold", type=float, default=0.2)
    r.add_argument("--max-regions", type=int, default=8)
    for q in (c, r):
        q.add_argument("--batch-size", type=int, default=8, help="images per model call")
        q.add_argument("--concurrency", type=int, default=1, help="model actors")
        q.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (0.5 shares)")
        q.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (threads) per actor")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda")
    for q in (g, c, r):
        q.add_argument("--out", required=True)
        q.add_argument("--overwrite", action="store_true", help="else finished shards are kept")
    return [g, c, r]


# --------------------------------------------------------------------------- argv


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=SUMMARY)
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("synth", help="write the synthetic spatial data set")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--n-eval", type=int, default=None)
    k = sub.add_parser("pack", help="pack images + captions into shards")
    k.add_argument("--images", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--captions", help="JSONL of {file, alt_text, captions}")
    k.add_argument("--coco", help="COCO-style captions JSON")
    k.add_argument("--coco-kind", default="short")
    for q in (s, k):
        q.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
        q.add_argument("--shard-size", type=int, default=1000 if q is k else 256)
        q.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("inspect", help="count shards, rows, kinds and bad records")
    i.add_argument("uri")
    i.add_argument("--format", choices=("auto", "parquet", "webdataset"), default="auto")
    i.add_argument("--no-decode", action="store_true")
    i.add_argument("--json", action="store_true")
    for q in (s, k, i, *_add_job_parsers(sub)):
        q.add_argument("--endpoint-url", default=None)
        q.add_argument("--region", default=None)
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``tips data ...``; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        verbs = {"synth": run_synth, "pack": run_pack, "inspect": run_inspect}
        verbs.update(ingest=_job(run_ingest), caption=_job(run_caption), regions=_job(run_regions))
        return verbs[args.verb](args)
    except (ShardError, ValueError, FileNotFoundError) as e:
        return fail(f"{PROG} {args.verb}", str(e), EXIT_USAGE)
