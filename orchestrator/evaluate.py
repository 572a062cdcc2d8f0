"""`tips eval`: run the evaluation suite on a checkpoint or on the released TIPS weights.

    tips eval checkpoint=runs/tiny_cpu/checkpoint_00000200 out=eval_out
    tips eval checkpoint=s3://bucket/runs/tips_b14 tasks=[zero_shot_seg,retrieval] \
        data.zero_shot_seg=/data/ADEChallengeData2016 data.retrieval=/data/coco
    tips eval released=v2_b14_vision.npz,v2_b14_text.npz,B tasks=[linear_seg,depth] \
        data.linear_seg=voc:/data/VOCdevkit data.depth=/data/nyu image_size=448

Arguments (``key=value``, no flags): ``checkpoint=URI`` or
``released=<vision.npz>,<text.npz>,<variant>[,<tokenizer.model>]``; ``which=student|teacher``;
``tasks=[...]`` (default: all of ``orchestrator.eval.tasks.ALL_TASKS``); ``data.<task>=SPEC``
(default ``synthetic``, the built-in set; see ``orchestrator.eval.readers`` for specs and
layouts); ``out=DIR``; ``device=cpu|cuda``; and any ``EvalOptions`` field
(``batch_size=64 image_size=448 cls=syn knn_k=20 probe_steps=300 max_images=500`` ...).

Output: a table on stdout, ``DIR/results.json`` (settings, per-task results and flat
``eval/<task>/<metric>`` keys), ``DIR/results.md``, and ``DIR/<task>.png`` for each dense
task (a few images: truth vs prediction). Python API: ``run_eval(...)``; periodic
evaluation during training: ``evaluate_during_training(...)``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.eval.loader import Encoders, LoadError, load_encoders
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.periodic import PERIODIC_TASKS, evaluate_during_training
from orchestrator.eval.plots import save_examples_figure
from orchestrator.eval.readers import EvalDataset, ReaderError, open_dataset
from orchestrator.eval.result import EvalResult, format_table, write_results
from orchestrator.eval.runtime import eval_mode, pick_device
from orchestrator.eval.tasks import ALL_TASKS, DENSE_TASKS, get_task

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_TASKS",
    "PERIODIC_TASKS",
    "EvalRequest",
    "evaluate_during_training",
    "main_eval",
    "parse_eval_args",
    "run_eval",
]


@dataclass
class EvalRequest:
    """What ``tips eval`` was asked to do (everything but the task settings)."""

    checkpoint: str | None = None
    released: str | None = None
    which: str = "student"
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    data: dict[str, str] = field(default_factory=dict)
    out: str = "eval_results"
    device: str | None = None

    @property
    def model_spec(self) -> str:
        return f"released={self.released}" if self.released else str(self.checkpoint)


TEXT_TASKS = ("zero_shot_cls", "retrieval", "zero_shot_seg")
VISION_TASKS = ("linear_seg", "depth", "knn")


def run_eval(
    model: Encoders | str,
    tasks: Sequence[str] = ALL_TASKS,
    data: Mapping[str, str | EvalDataset] | None = None,
    options: EvalOptions | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    which: str = "student",
) -> list[EvalResult]:
    """Evaluate a model on the given tasks.

    Args:
        model: loaded ``Encoders``, or a spec for ``load_encoders`` (checkpoint URI or
            ``released=...``).
        tasks: task names, in the order to run.
        data: task -> dataset spec or an ``EvalDataset``; missing tasks use "synthetic".
        options: task settings (default ``EvalOptions()``).
        out_dir: where to write results.json, results.md and the dense-task PNGs; None
            writes nothing.
        device: "cpu", "cuda", ...; default CUDA when available.
        which: "student" or "teacher" (checkpoints of full-EMA runs).

    Returns:
        One EvalResult per task.

    Raises:
        ValueError: unknown task or bad option. LoadError / ReaderError: see their messages.
    """
    opts = options or EvalOptions()
    opts.check()
    modules = [get_task(t) for t in tasks]  # unknown names fail before any loading
    enc = load_encoders(model, which=which) if isinstance(model, str) else model
    enc.to(pick_device(device))
    text_tasks = [m.TASK for m in modules if m.TASK in TEXT_TASKS]
    if enc.text is None and text_tasks:
        raise LoadError(
            f"{enc.source or 'model'} has no text tower (a vision-only objective such as mug): "
            f"tasks {text_tasks} need one; run {[t for t in VISION_TASKS if t in tasks]} instead"
        )
    datasets: dict[tuple[str, str], EvalDataset] = {}
    results = []
    with eval_mode(enc.vision, enc.text):
        for task in modules:
            spec = (data or {}).get(task.TASK, "synthetic")
            if isinstance(spec, EvalDataset):
                ds = spec
            else:
                key = (spec, "any" if spec == "synthetic" else task.KIND)
                if key not in datasets:
                    datasets[key] = open_dataset(spec, task.KIND)
                ds = datasets[key]
            t0 = time.perf_counter()
            result = task.run(enc, ds, opts)
            result.extra["seconds"] = round(time.perf_counter() - t0, 3)
            logger.info("%s on %s: %s", task.TASK, ds.name, result.metrics)
            results.append(result)
    if out_dir is not None:
        settings = {
            "options": dataclasses.asdict(opts),
            "tasks": list(tasks),
            "data": {k: v if isinstance(v, str) else v.name for k, v in (data or {}).items()},
        }
        for r in results:
            if r.task in DENSE_TASKS:
                figure = save_examples_figure(r, Path(out_dir) / f"{r.task}.png")
                if figure is not None:
                    r.extra["figure"] = figure.name
        write_results(results, out_dir, enc.source, settings)
    return results


# ---------------------------------------------------------------------------- CLI

_REQUEST_KEYS = {f.name for f in dataclasses.fields(EvalRequest)} - {"data"}
_OPTION_FIELDS = {f.name: f for f in dataclasses.fields(EvalOptions)}


def _cast(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={value!r}: expected true or false")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: expected {type(default).__name__}") from None


def parse_eval_args(argv: Sequence[str]) -> tuple[EvalRequest, EvalOptions]:
    """``key=value`` arguments -> (EvalRequest, EvalOptions).

    Raises:
        ValueError: malformed argument, unknown key or wrong type (the message names it).
    """
    req, opts = EvalRequest(), EvalOptions()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"arguments are key=value, got {arg!r}")
        if key.startswith("data."):
            get_task(key[5:])
            req.data[key[5:]] = value
        elif key == "tasks":
            req.tasks = [t.strip() for t in value.strip("[]").split(",") if t.strip()]
            for t in req.tasks:
                get_task(t)
        elif key in _REQUEST_KEYS:
            setattr(req, key, value.strip("[]") if key == "released" else value)
        elif key in _OPTION_FIELDS:
            setattr(opts, key, _cast(key, value, getattr(opts, key)))
        else:
            known = sorted(_REQUEST_KEYS | set(_OPTION_FIELDS) | {"data.<task>"})
            raise ValueError(f"unknown key {key!r}; known keys: {', '.join(known)}")
    if bool(req.checkpoint) == bool(req.released):
        raise ValueError(
            "give exactly one of checkpoint=URI or released=<vision.npz>,"
            "<text.npz>,<variant>[,<tokenizer.model>]"
        )
    if req.which not in ("student", "teacher"):
        raise ValueError(f"which={req.which!r}: must be student or teacher")
    opts.check()
    return req, opts


def main_eval(argv: list[str]) -> int:
    """The ``tips eval`` verb. Returns 0 on success, 2 on usage errors, 1 on load/read errors."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        req, opts = parse_eval_args(argv)
    except ValueError as e:
        print(f"tips eval: {e}", file=sys.stderr)
        return 2
    try:
        results = run_eval(
            req.model_spec, req.tasks, req.data, opts, req.out, req.device, req.which
        )
    except (LoadError, ReaderError, FileNotFoundError) as e:
        print(f"tips eval: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    out = Path(req.out)
    written = ["results.json", "results.md"]
    written += [r.extra["figure"] for r in results if "figure" in r.extra]
    print(f"tips eval: wrote {', '.join(str(out / w) for w in written)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(main_eval(sys.argv[1:]))
