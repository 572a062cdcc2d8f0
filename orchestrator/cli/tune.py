"""`tips tune sweep=NAME|PATH [key=value ...] [resume=true] [--dry-run | --report] [-v]`.

``key=value`` whose first part is a sweep-file field (``num_samples=8``,
``scheduler.grace_period=40``, ``name=...``, ``storage_uri=s3://...``) sets the sweep;
any other key (``train.total_steps=2000``, ``data.train_uri=...``) is added to the base
recipe for every trial. The sweep file, every swept key and the base recipe are validated
before Ray starts. ``--dry-run`` prints the resolved sweep and exits; ``--report`` rewrites
the tables, best recipe and plots of an existing sweep from its directory (no trial runs).
"""

from __future__ import annotations

import sys

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

PROG = "tips tune"
SUMMARY = "sweep a recipe's settings with Ray Tune (ASHA, PBT, grid, random)"


def usage() -> str:
    import dataclasses

    from orchestrator.tune.spec import SweepFile

    fields = ", ".join(f.name for f in dataclasses.fields(SweepFile))
    return f"""usage: tips tune sweep=NAME|PATH [key=value ...] [resume=true]
                 [--dry-run|--report] [-v]

{SUMMARY}.

  sweep=NAME|PATH  a packaged sweep (below) or a sweep YAML file
  key=value        a sweep-file field: {fields}
                   sets the sweep; any other key overrides the base recipe of every trial
  resume=true      continue an interrupted sweep where it stopped
  --dry-run        print the resolved sweep (space, metric, base config) and exit
  --report         rewrite the tables, best recipe and plots of an existing sweep
  -v, --verbose    also show Ray's own log lines
  -h, --help       this text

packaged sweeps:
{recipes_table(sweeps=True)}

recipe config sections (keys a sweep may search or override):
{config_sections()}

exit codes: 0 done, 1 a trial failed (the table names it), 2 usage or sweep error (nothing
started), 130 interrupted (rerun with resume=true)."""


def main(argv: list[str]) -> int:
    from orchestrator import config as config_lib
    from orchestrator.recipes import find_recipe, find_sweep
    from orchestrator.tune.spec import SweepError, load_sweep, split_overrides

    try:
        args = split_args(argv, PROG, named=("sweep", "resume"), flags=("--dry-run", "--report"))
    except UsageError as e:
        return fail(PROG, str(e), EXIT_USAGE)
    if args.help:
        print(usage())
        return EXIT_OK
    setup_logging(args.verbose)
    flags = args.flags
    if "sweep" not in args.named:
        return fail(PROG, "give sweep=NAME|PATH (tips recipes lists the sweeps)", EXIT_USAGE)
    resume_value = args.named.get("resume", "false").lower()
    if resume_value not in ("true", "false"):
        return fail(PROG, f"resume must be true or false, got {resume_value!r}", EXIT_USAGE)
    sweep_overrides, recipe_overrides = split_overrides(args.overrides)
    try:
        sweep = load_sweep(
            find_sweep(args.named["sweep"]),
            sweep_overrides,
            recipe_overrides,
            resolve_recipe=find_recipe,
        )
    except (SweepError, config_lib.ConfigError) as e:
        return fail(PROG, f"sweep error: {e}", EXIT_USAGE)
    if "--dry-run" in flags:
        print(f"sweep {sweep.spec.name} -> {sweep.uri}")
        print(f"metric {sweep.spec.metric} ({sweep.spec.mode}), scheduler {sweep.spec.scheduler}")
        for key, sampler in sweep.space.items():
            print(f"  {key}: {sampler.kind} {list(sampler.args)}")
        print(config_lib.to_yaml(sweep.base), end="")
        return EXIT_OK

    from orchestrator.tune import report
    from orchestrator.tune.tuner import run_sweep, unfinished_trials

    try:
        if "--report" in flags:
            from orchestrator.tune.tuner import load_results

            grid = load_results(sweep)
        else:
            grid = run_sweep(sweep, resume=resume_value == "true")
    except SweepError as e:
        return fail(PROG, str(e), EXIT_USAGE)
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
        return EXIT_INTERRUPTED
    errors = [r for r in rows if r["error"]]
    for r in errors:
        where = f" (Ray's error files: {r['_path']})" if r.get("_path") else ""
        print(f"{PROG}: {r['trial']} failed: {r['_error_line']}{where}", file=sys.stderr)
    if errors:
        return fail(PROG, f"{len(errors)} of {len(rows)} trial(s) failed", EXIT_FAILED)
    return EXIT_OK
