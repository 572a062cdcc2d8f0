"""`tips data synth|pack|inspect`: make, convert and check shard sets (local or s3://).

    tips data synth --out URI --n N --seed S [--image-size P] [--format parquet|webdataset]
                    [--shard-size K] [--n-eval M] [--overwrite]
    tips data pack --images DIR (--captions FILE.jsonl | --coco FILE.json) --out URI
                   [--shard-size N] [--format parquet|webdataset] [--coco-kind short]
    tips data inspect URI [--format auto|parquet|webdataset] [--no-decode] [--json]
    every sub-verb: [--endpoint-url URL] [--region R]   (else AWS_ENDPOINT_URL / AWS_REGION)

``synth`` writes ``URI/train`` and ``URI/eval`` (orchestrator/data/synthetic.py); ``pack``
and ``inspect`` are orchestrator/data/pack.py. These are tools, not runs: they take
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
SUMMARY = "make synthetic shards, pack images + captions into shards, inspect a shard set"


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
    for q in (s, k, i):
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
        return {"synth": run_synth, "pack": run_pack, "inspect": run_inspect}[args.verb](args)
    except (ShardError, ValueError, FileNotFoundError) as e:
        return fail(f"{PROG} {args.verb}", str(e), EXIT_USAGE)
