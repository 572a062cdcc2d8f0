"""`tips train recipe=NAME|PATH [key=value ...] [--dry-run] [-v]`: train a recipe on Ray Train.

The recipe is a packaged one by name (``tips recipes`` lists them) or a YAML file; every
``key=value`` after it overrides one config key (OmegaConf dot-list: ``optim.lr=1e-4``,
``data.caption_ratios={alt:0.5,syn:0.5}``). The config is validated and the data, the
resume checkpoint and the model shapes are checked before any worker starts.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from orchestrator.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    config_sections,
    fail,
    recipes_table,
    setup_logging,
    split_args,
)

if TYPE_CHECKING:
    from orchestrator.config import TipsConfig

PROG = "tips train"
SUMMARY = "train a recipe (TIPS, CLOC or MUG) with Ray Train"


def usage() -> str:
    return f"""usage: tips train recipe=NAME|PATH [key=value ...] [--dry-run] [-v]

{SUMMARY}.

  recipe=NAME|PATH  a packaged recipe (below) or a YAML file (default: tiny_cpu)
  key=value         override a config key, e.g. train.total_steps=200 optim.lr=1e-4
  --dry-run         print the resolved config and exit (nothing starts)
  -v, --verbose     also show Ray's own per-report log lines
  -h, --help        this text

config sections and their keys:
{config_sections()}

packaged recipes:
{recipes_table()}

exit codes: 0 done, 1 the run failed (one line; the full log path is printed), 2 usage or
config error (nothing started), 130 interrupted (the last checkpoint is kept; rerun the same
command to resume)."""


def main(argv: list[str]) -> int:
    from orchestrator import config as config_lib
    from orchestrator.recipes import find_recipe

    try:
        args = split_args(argv, PROG, named=("recipe",), flags=("--dry-run",))
    except UsageError as e:
        return fail(PROG, str(e), EXIT_USAGE)
    if args.help:
        print(usage())
        return EXIT_OK
    setup_logging(args.verbose)
    try:
        verbose = ["run.ray_log_level=info"] if args.verbose else []
        cfg = config_lib.load(find_recipe(args.named.get("recipe")), [*verbose, *args.overrides])
    except config_lib.ConfigError as e:
        return fail(PROG, f"config error: {e}", EXIT_USAGE)
    if "--dry-run" in args.flags:
        from orchestrator.train.driver import describe_backend

        print(f"# {describe_backend(cfg)}")  # a YAML comment: the output still parses
        print(config_lib.to_yaml(cfg), end="")
        return EXIT_OK
    try:
        return _run(cfg)
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler exits
        return _interrupted(cfg)


def _run(cfg: TipsConfig) -> int:
    import ray.train

    from orchestrator.train.driver import (
        PreflightError,
        absolutize,
        failure_line,
        fatal_error,
        fit,
        write_failure_log,
    )

    cfg = absolutize(cfg)
    try:
        result = fit(cfg)
        error = result.error or fatal_error(cfg)
    except PreflightError as e:
        return fail(PROG, f"failed: {e}", EXIT_FAILED)
    except ray.train.TrainingFailedError as e:
        error = e
    if error is not None:
        if isinstance(error, str):  # a failure the workers stopped at without retrying
            return fail(PROG, f"failed: {error}", EXIT_FAILED)
        log = write_failure_log(cfg, error)
        print(f"{PROG}: failed: {failure_line(error)}", file=sys.stderr)
        return fail(PROG, f"full error and tracebacks: {log}", EXIT_FAILED)
    _print_summary(cfg)
    from orchestrator.train.driver import run_uri
    from orchestrator.train.state import newest_checkpoint

    # the run directory's own copy: in local mode Ray's result points at a temporary one
    final = newest_checkpoint(run_uri(cfg), cfg.storage)
    if final is None and result.checkpoint is not None:
        final = result.checkpoint.path
    if final is not None:
        print(f"{PROG}: final checkpoint: {pasteable_uri(final, cfg)}")
    return EXIT_OK


def _interrupted(cfg: TipsConfig) -> int:
    """Ctrl-C: Ray Train aborts the run; what was checkpointed stays on storage, and the
    same command resumes from the newest complete checkpoint there."""
    from orchestrator.train.driver import absolutize, run_uri
    from orchestrator.train.state import newest_checkpoint

    cfg = absolutize(cfg)
    try:
        newest = newest_checkpoint(run_uri(cfg), cfg.storage)
    except OSError:
        newest = None
    kept = f"newest checkpoint {pasteable_uri(newest, cfg)}" if newest else "no checkpoint yet"
    return fail(
        PROG, f"interrupted ({kept}); run the same command again to resume", EXIT_INTERRUPTED
    )


def _print_summary(cfg: TipsConfig) -> None:
    from orchestrator.train.driver import metrics_path
    from orchestrator.train.metrics import read_history

    path = metrics_path(cfg)
    if not path:
        return
    rows = read_history(path)
    print(loss_curve_table(rows))
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if evals:
        last = evals[-1]
        shown = ", ".join(
            f"{k[5:]} {v:.2f}" for k, v in sorted(last.items()) if k.startswith("eval/")
        )
        print(f"{PROG}: eval at step {int(last['train/step'])}: {shown}")
    for r in rows:
        if isinstance(r.get("warning"), str):
            print(f"{PROG}: warning at step {int(r['train/step'])}: {r['warning']}")
    print(f"{PROG}: metrics history: {path}")


def pasteable_uri(path: str, cfg: TipsConfig) -> str:
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
