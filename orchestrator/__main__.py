"""`tips <verb> ...` == `python -m orchestrator <verb> ...`.

Verbs:
    train recipe=PATH [key=value ...] [--dry-run]   train (config errors stop before Ray starts)
    tune  sweep=PATH [key=value ...] [resume=true] [--dry-run|--report]   a Ray Tune sweep
    eval  checkpoint=URI|released=V,T,VARIANT tasks=[...] ...
    data  synth|pack|inspect ...
    cluster local up|add|preempt|stop|status|down ...   a multi-node Ray cluster on this machine

Arguments are ``recipe=PATH`` plus dotted ``key=value`` overrides; there are no argparse
flags mirroring config keys. A recipe path is looked up as given, then under the project's
``recipes/`` folder; with no recipe, ``recipes/tiny_cpu.yaml`` is the default.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "tiny_cpu.yaml"
USAGE = __doc__


def resolve_recipe(value: str | None) -> Path:
    """``recipe=`` as given, else relative to the project's recipes/ folder."""
    name = value or DEFAULT_RECIPE
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # config.load reports it as not found


def split_args(argv: list[str]) -> tuple[str | None, list[str], set[str]]:
    recipe, overrides, flags = None, [], set()
    for arg in argv:
        if arg.startswith("--"):
            flags.add(arg)
        elif arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return recipe, overrides, flags


def main_train(argv: list[str]) -> int:
    from orchestrator import config as config_lib

    recipe, overrides, flags = split_args(argv)
    unknown = flags - {"--dry-run"}
    if unknown:
        print(f"tips train: unknown flag(s) {sorted(unknown)}; only --dry-run", file=sys.stderr)
        return 2
    try:
        cfg = config_lib.load(resolve_recipe(recipe), overrides)
    except config_lib.ConfigError as e:
        print(f"tips train: config error: {e}", file=sys.stderr)
        return 2
    if "--dry-run" in flags:
        print(config_lib.to_yaml(cfg), end="")
        return 0
    import ray.train

    from orchestrator.metrics import read_history
    from orchestrator.trainer import (
        PreflightError,
        absolutize,
        failure_line,
        fatal_error,
        fit,
        metrics_path,
        write_failure_log,
    )

    cfg = absolutize(cfg)
    try:
        result = fit(cfg)
        error = result.error or fatal_error(cfg)
    except PreflightError as e:
        print(f"tips train: failed: {e}", file=sys.stderr)
        return 1
    except ray.train.TrainingFailedError as e:
        error = e
    if error is not None:
        if isinstance(error, str):  # a failure the workers stopped at without retrying
            print(f"tips train: failed: {error}", file=sys.stderr)
            return 1
        log = write_failure_log(cfg, error)
        print(f"tips train: failed: {failure_line(error)}", file=sys.stderr)
        print(f"tips train: full error and tracebacks: {log}", file=sys.stderr)
        return 1
    path = metrics_path(cfg)
    if path:
        rows = read_history(path)
        print(loss_curve_table(rows))
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        if evals:
            last = evals[-1]
            shown = ", ".join(
                f"{k[5:]} {v:.2f}" for k, v in sorted(last.items()) if k.startswith("eval/")
            )
            print(f"tips train: eval at step {int(last['train/step'])}: {shown}")
        warned = [r for r in rows if isinstance(r.get("warning"), str)]
        for r in warned:
            print(f"tips train: warning at step {int(r['train/step'])}: {r['warning']}")
        print(f"tips train: metrics history: {path}")
    if result.checkpoint is not None:
        print(f"tips train: final checkpoint: {pasteable_uri(result.checkpoint.path, cfg)}")
    return 0


def pasteable_uri(path: str, cfg: Any) -> str:
    """A checkpoint path as ``tips eval checkpoint=`` takes it: Ray reports S3 checkpoints
    as ``bucket/key``, without the scheme."""
    if cfg.run.storage_uri.startswith("s3://") and "://" not in path:
        return "s3://" + path.lstrip("/")
    return path


DIAGNOSTICS = {
    "metric/ibot/token_loss": "ibot per token",
    "metric/dino/entropy": "dino target H",
    "metric/ibot/entropy": "ibot target H",
}


def loss_curve_table(rows: list[dict[str, float]], max_rows: int = 11) -> str:
    """A compact table of the loss terms at evenly spaced reports."""
    if not rows:
        return "tips train: no metrics were reported"
    keep = sorted({round(i * (len(rows) - 1) / max(1, max_rows - 1)) for i in range(max_rows)})
    terms = sorted(k for k in rows[-1] if k.startswith("loss/"))
    # the per-token iBOT loss and the teacher target entropies (log K = collapsed to uniform)
    extra = [k for k in DIAGNOSTICS if k in rows[-1]]
    terms += extra
    header = ["step", *(DIAGNOSTICS.get(t, t[5:]) for t in terms), "samples/s"]
    lines = [" | ".join(f"{h:>15}" for h in header)]
    for i in keep:
        r = rows[i]
        cells = [f"{int(r.get('train/step', 0)):>15d}"]
        cells += [f"{r.get(t, float('nan')):>15.4f}" for t in terms]
        cells.append(f"{r.get('perf/samples_per_s', 0.0):>15.1f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb == "train":
        return main_train(rest)
    if verb == "tune":
        from orchestrator.tune.cli import main_tune

        return main_tune(rest)
    if verb == "eval":
        from orchestrator.evaluate import main_eval

        return main_eval(rest)
    if verb == "data":
        from orchestrator.data.cli import main_data

        return main_data(rest)
    if verb == "cluster":
        from orchestrator.cluster.local import main_cluster

        return main_cluster(rest)
    print(f"tips: unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
