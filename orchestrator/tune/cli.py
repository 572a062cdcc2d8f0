"""`tips tune sweep=PATH [key=value ...] [resume=true] [--dry-run | --report]`.

``key=value`` whose first part is a sweep-file field (``num_samples=8``,
``scheduler.grace_period=40``, ``name=...``, ``storage_uri=s3://...``) sets the sweep;
any other key (``train.total_steps=2000``, ``data.train_uri=...``) is added to the base
recipe for every trial. The sweep file, every swept key and the base recipe are validated
before Ray starts. ``--dry-run`` prints the resolved sweep and exits; ``--report`` rewrites
the tables, best recipe and plots of an existing sweep from its directory (no trial runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

SWEEPS_DIR = Path(__file__).resolve().parent.parent.parent / "recipes" / "sweeps"


def resolve_sweep(value: str) -> Path:
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    for candidate in (SWEEPS_DIR / value, SWEEPS_DIR / f"{value}.yaml"):
        if candidate.is_file():
            return candidate
    return path


def main_tune(argv: list[str]) -> int:
    from orchestrator import config as config_lib
    from orchestrator.__main__ import resolve_recipe
    from orchestrator.tune.spec import SweepError, load_sweep, split_overrides

    flags = {a for a in argv if a.startswith("--")}
    if flags - {"--dry-run", "--report"}:
        unknown = sorted(flags - {"--dry-run", "--report"})
        print(f"tips tune: unknown flag(s) {unknown}", file=sys.stderr)
        return 2
    args = [a for a in argv if not a.startswith("--")]
    sweep_arg = [a for a in args if a.startswith("sweep=")]
    resume_arg = [a for a in args if a.startswith("resume=")]
    rest = [a for a in args if not a.startswith(("sweep=", "resume="))]
    if len(sweep_arg) != 1:
        print("tips tune: give exactly one sweep=PATH (see recipes/sweeps/)", file=sys.stderr)
        return 2
    resume_value = resume_arg[-1].split("=", 1)[1].lower() if resume_arg else "false"
    if resume_value not in ("true", "false"):
        print(f"tips tune: resume must be true or false, got {resume_value!r}", file=sys.stderr)
        return 2
    sweep_overrides, recipe_overrides = split_overrides(rest)
    try:
        sweep = load_sweep(
            resolve_sweep(sweep_arg[0].split("=", 1)[1]),
            sweep_overrides,
            recipe_overrides,
            resolve_recipe=resolve_recipe,
        )
    except (SweepError, config_lib.ConfigError) as e:
        print(f"tips tune: sweep error: {e}", file=sys.stderr)
        return 2
    if "--dry-run" in flags:
        print(f"sweep {sweep.spec.name} -> {sweep.uri}")
        print(f"metric {sweep.spec.metric} ({sweep.spec.mode}), scheduler {sweep.spec.scheduler}")
        for key, sampler in sweep.space.items():
            print(f"  {key}: {sampler.kind} {list(sampler.args)}")
        print(config_lib.to_yaml(sweep.base), end="")
        return 0

    from orchestrator.tune import report
    from orchestrator.tune.tuner import run_sweep, unfinished_trials

    try:
        if "--report" in flags:
            from orchestrator.tune.tuner import load_results

            grid = load_results(sweep)
        else:
            grid = run_sweep(sweep, resume=resume_value == "true")
    except SweepError as e:
        print(f"tips tune: {e}", file=sys.stderr)
        return 2
    outputs = report.write(grid, sweep)
    rows = report.collect(grid, sweep)
    print(report.to_markdown(rows, sweep))
    for kind, uri in outputs.items():
        print(f"tips tune: {kind}: {uri}")
    left = unfinished_trials(grid, sweep)
    if left:
        again = " ".join(a for a in argv if not a.startswith(("resume=", "--")))
        print(
            f"tips tune: the sweep was interrupted with {left} trial(s) unfinished (the tables "
            f"above are partial); continue it with: tips tune {again} resume=true",
            file=sys.stderr,
        )
        return 130
    errors = [r for r in rows if r["error"]]
    if errors:
        print(f"tips tune: {len(errors)} trial(s) failed: see {sweep.uri}", file=sys.stderr)
        return 1
    return 0
