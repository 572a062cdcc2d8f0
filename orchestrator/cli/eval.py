"""`tips eval (checkpoint=URI | released=V,T,VARIANT) [tasks=[...]] [key=value ...]`.

    tips eval checkpoint=runs/tiny_cpu/checkpoint_00000200 out=eval_out
    tips eval checkpoint=s3://bucket/runs/tips_b14 tasks=[zero_shot_seg,retrieval] \\
        data.zero_shot_seg=/data/ADEChallengeData2016 data.retrieval=/data/coco
    tips eval released=v2_b14_vision.npz,v2_b14_text.npz,B tasks=[linear_seg,depth] \\
        data.linear_seg=voc:/data/VOCdevkit data.depth=/data/nyu image_size=448

The arguments are merged the way ``tips train`` merges overrides (OmegaConf dot-list onto a
typed schema: ``EvalRequest`` + ``EvalOptions``), so types and unknown keys are refused with
the key named, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    fail,
    setup_logging,
    split_args,
)

PROG = "tips eval"
SUMMARY = (
    "evaluate a checkpoint or the released TIPS weights (classification, retrieval, seg, depth)"
)


def usage() -> str:
    from orchestrator.eval.options import EvalOptions
    from orchestrator.eval.tasks import ALL_TASKS

    opts = "\n".join(
        f"  {f.name}={f.default}" for f in dataclasses.fields(EvalOptions) if f.name != "progress"
    )
    return f"""usage: tips eval (checkpoint=URI | released=V.npz,T.npz,VARIANT[,tokenizer.model])
                 [tasks=[...]] [data.TASK=SPEC ...] [out=DIR] [key=value ...] [-v]

{SUMMARY}.

  checkpoint=URI      a run's checkpoint directory (local or s3://)
  released=...        the released TIPS weights (.npz vision and text, variant B/L/So400m/g)
  which=student       student or teacher (checkpoints of full-EMA runs)
  tasks=[...]         any of {", ".join(ALL_TASKS)} (default: all)
  data.TASK=SPEC      the data set of a task: synthetic (default), or a reader spec such as
                      voc:/data/VOCdevkit, ade20k:/data/ADE, nyu:/data/nyu, a COCO folder
  out=DIR             where results.json, results.md and the figures go (eval_results)
  device=cpu|cuda     default: CUDA when available
  -v, --verbose       debug logging
  -h, --help          this text

task settings (key=value, defaults shown):
{opts}
  progress=true

exit codes: 0 done, 1 the model or a data set could not be read (the line names it),
2 usage error (nothing loaded)."""


def parse_eval_args(argv: list[str]) -> tuple[Any, Any]:
    """``key=value`` arguments -> (EvalRequest, EvalOptions), through OmegaConf.

    Raises:
        ValueError: a malformed argument, an unknown key or a wrong type (the message names it).
    """
    from orchestrator import config as config_lib
    from orchestrator.eval.options import EvalOptions
    from orchestrator.eval.suite import EvalRequest
    from orchestrator.eval.tasks import get_task

    request_keys = {f.name for f in dataclasses.fields(EvalRequest)}
    released = [a for a in argv if a.startswith("released=")]  # commas, not a YAML list
    rest = [a for a in argv if not a.startswith("released=")]
    try:
        dotlist = config_lib.parse_overrides(rest)
    except config_lib.ConfigError as e:
        raise ValueError(str(e)) from None
    raw = OmegaConf.to_container(dotlist)
    req_part = {k: v for k, v in raw.items() if k in request_keys}
    opt_part = {k: v for k, v in raw.items() if k not in request_keys}
    if isinstance(req_part.get("tasks"), str):  # tasks=depth
        req_part["tasks"] = [t.strip() for t in req_part["tasks"].split(",") if t.strip()]
    if released:
        req_part["released"] = released[-1].split("=", 1)[1].strip("[]")
    req = _merge(EvalRequest, req_part)
    opts = _merge(EvalOptions, opt_part, known=sorted(request_keys | {"data.<task>"}))
    for task in [*req.tasks, *req.data]:
        get_task(task)  # unknown task names fail here, with the list
    if bool(req.checkpoint) == bool(req.released):
        raise ValueError(
            "give exactly one of checkpoint=URI or released=<vision.npz>,"
            "<text.npz>,<variant>[,<tokenizer.model>]"
        )
    if req.which not in ("student", "teacher"):
        raise ValueError(f"which={req.which!r}: must be student or teacher")
    opts.check()
    return req, opts


def _merge(schema: type, values: dict[str, Any], known: list[str] = ()) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        if "not in struct" in msg or "Key '" in msg and "not in" in msg:
            names = sorted({f.name for f in dataclasses.fields(schema)} | set(known))
            raise ValueError(f"unknown key {key!r}; known keys: {', '.join(names)}") from None
        raise ValueError(f"key {key!r}: {msg}") from None


def main(argv: list[str]) -> int:
    """The ``tips eval`` verb. 0 on success, 2 on usage errors, 1 on load/read errors."""
    try:
        args = split_args(argv, PROG)
    except UsageError as e:
        return fail(PROG, str(e), EXIT_USAGE)
    if args.help:
        print(usage())
        return EXIT_OK
    if not args.overrides:
        print(usage())
        return EXIT_USAGE
    setup_logging(args.verbose)
    try:
        req, opts = parse_eval_args(args.overrides)
    except ValueError as e:
        return fail(PROG, str(e), EXIT_USAGE)
    from orchestrator.eval.loader import LoadError
    from orchestrator.eval.readers import ReaderError
    from orchestrator.eval.result import format_table
    from orchestrator.eval.suite import run_eval

    try:
        results = run_eval(
            req.model_spec, req.tasks, req.data, opts, req.out, req.device, req.which
        )
    except (LoadError, ReaderError, FileNotFoundError) as e:
        return fail(PROG, str(e), EXIT_FAILED)
    print(format_table(results))
    out = Path(req.out)
    written = ["results.json", "results.md"]
    written += [r.extra["figure"] for r in results if "figure" in r.extra]
    print(f"{PROG}: wrote {', '.join(str(out / w) for w in written)}")
    return EXIT_OK
