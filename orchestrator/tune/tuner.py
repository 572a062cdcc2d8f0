"""Build and run a Tuner for a validated sweep; resume an interrupted one.

    sweep = load_sweep("orchestrator/recipes/sweeps/loss_weights.yaml")
    grid = run_sweep(sweep)                  # ResultGrid; outputs written by report.write
    grid = run_sweep(sweep, resume=True)     # continue an interrupted sweep of that name

Schedulers count time in optimizer steps (``train/step``). ASHA stops trials early; it
relies on Train's placement-group cleanup, which needs the dashboard / State API
(docs/ray.md, "Early stopping needs the dashboard"): ``run_sweep`` starts a local Ray with
the dashboard on when no cluster is given. PBT exploits checkpoints through the relay in
``driver.py``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
import ray.tune

from orchestrator import config as config_lib
from orchestrator.tune.driver import FATAL_DIR, trial_driver
from orchestrator.tune.spec import TIME_ATTR, Sweep, SweepError, max_concurrent

logger = logging.getLogger(__name__)


def trial_name(trial: Any) -> str:
    """Trial names and directories derive from the trial id (stable across resumes)."""
    return f"trial-{trial.trial_id}"


def build_scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    sc = sweep.spec.scheduler
    if sc.name == "asha":
        return ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=sweep.max_t(),
            grace_period=sc.grace_period,
            reduction_factor=sc.reduction_factor,
        )
    if sc.name == "pbt":
        return PopulationBasedTraining(
            time_attr=TIME_ATTR,
            perturbation_interval=sc.perturbation_interval,
            hyperparam_mutations=sweep.mutations(),
            quantile_fraction=sc.quantile_fraction,
            resample_probability=sc.resample_probability,
            perturbation_factors=tuple(sc.perturbation_factors),
        )
    return FIFOScheduler()


def _storage(sweep: Sweep) -> tuple[str, Any]:
    from orchestrator.storage import train_storage

    return train_storage(sweep.spec.storage_uri, sweep.base.storage)


def sweep_exists(sweep: Sweep) -> bool:
    path, fs = _storage(sweep)
    uri = sweep.uri if fs is not None else os.path.join(path, sweep.spec.name)
    return bool(ray.tune.Tuner.can_restore(uri, storage_filesystem=fs))


def _trainable(sweep: Sweep) -> Any:
    from orchestrator.train.driver import absolutize

    base = absolutize(sweep.base)
    uri = sweep.uri if "://" in sweep.uri else os.path.abspath(sweep.uri)
    fn = ray.tune.with_parameters(
        trial_driver,
        base=config_lib.to_dict(base),
        metric=sweep.spec.metric,
        sweep_uri=uri,
        keep_all_checkpoints=sweep.spec.scheduler.name == "pbt",
    )
    return ray.tune.with_resources(fn, dict(sweep.spec.trial.driver_resources))


def check_resumable(sweep: Sweep, resume: bool) -> None:
    """A new sweep must not overwrite one of the same name; a resumed one must exist.

    Runs before Ray starts (it only reads the sweep directory).
    """
    s = sweep.spec
    exists = sweep_exists(sweep)
    if resume and not exists:
        raise SweepError(
            f"{sweep.source}: resume=true but there is no sweep {s.name!r} under "
            f"{s.storage_uri} to resume"
        )
    if not resume and exists:
        raise SweepError(
            f"{sweep.source}: a sweep named {s.name!r} already exists under {s.storage_uri}; "
            "pass resume=true to continue it, or name=<new name> for a new sweep"
        )


def clear_fatal(sweep: Sweep) -> list[str]:
    """Forget the repeating errors trials stopped at (orchestrator/tune/driver.py): a resume
    comes after a fix, so the errored trials it resumes train again. Their trial ids."""
    import pyarrow.fs as pafs

    from orchestrator.storage import filesystem, join_uri

    fs, path = filesystem(join_uri(sweep.uri, FATAL_DIR), sweep.base.storage)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    ids = [i.base_name.removesuffix(".txt") for i in fs.get_file_info(pafs.FileSelector(path))]
    fs.delete_dir(path)
    if ids:
        logger.info("retrying %d trial(s) that stopped at an error: %s", len(ids), ", ".join(ids))
    return sorted(ids)


def build_tuner(sweep: Sweep, *, resume: bool = False) -> ray.tune.Tuner:
    """The Tuner (Ray must be up: concurrency is derived from the cluster's resources)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = sweep.spec
    path, fs = _storage(sweep)
    trainable = _trainable(sweep)
    check_resumable(sweep, resume)
    if resume:
        clear_fatal(sweep)
        uri = sweep.uri if fs is not None else os.path.join(path, s.name)
        logger.info("resuming sweep %s", uri)
        return ray.tune.Tuner.restore(
            uri,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=sweep.param_space(),
            storage_filesystem=fs,
        )
    concurrent = max_concurrent(sweep, ray.cluster_resources())
    logger.info("sweep %s: %d trials, up to %d at once", s.name, expected_trials(sweep), concurrent)
    tune_config = ray.tune.TuneConfig(
        metric=s.metric,
        mode=s.mode,
        scheduler=build_scheduler(sweep),
        # Tune ignores max_concurrent_trials for a SearchGenerator (it warns and runs every
        # trial at once); the basic generator takes the limit itself.
        search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrent),
        num_samples=s.num_samples,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
    )
    run_config = ray.tune.RunConfig(
        name=s.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.tune.FailureConfig(max_failures=s.trial.max_failures),
        # PBT may exploit any reported checkpoint: keep them all
        # (docs/ray.md, "PBT relay", step 5).
        checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=None),
        verbose=int(os.environ.get("TIPS_TUNE_VERBOSE", "1")),
    )
    return ray.tune.Tuner(
        trainable, param_space=sweep.param_space(), tune_config=tune_config, run_config=run_config
    )


def ensure_ray() -> None:
    """Attach to RAY_ADDRESS, or start a local Ray with the dashboard (ASHA cleanup needs it)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=True)


def run_sweep(sweep: Sweep, *, resume: bool = False) -> Any:
    """Run (or resume) the sweep; returns the ResultGrid."""
    from ray.data import DataContext

    check_resumable(sweep, resume)
    ensure_ray()
    DataContext.get_current().enable_progress_bars = False
    tuner = build_tuner(sweep, resume=resume)
    return tuner.fit()


def expected_trials(sweep: Sweep) -> int:
    """Trials the sweep runs in full: num_samples x the product of its grid sizes."""
    n = sweep.spec.num_samples
    for sampler in sweep.space.values():
        if sampler.kind == "grid":
            n *= len(sampler.args)
    return n


def unfinished_trials(grid: Any, sweep: Sweep) -> int:
    """How many trials an interrupted sweep (Ctrl-C, a killed driver) still owes.

    ``Tuner.fit`` returns normally after SIGINT; what tells is the trials' status: finished
    ones are TERMINATED (stopped early or done) or ERROR, and not-yet-created ones are
    missing from the grid.
    """
    trials = grid._experiment_analysis.trials
    open_ = sum(t.status not in ("TERMINATED", "ERROR") for t in trials)
    return open_ + max(0, expected_trials(sweep) - len(trials))


def load_results(sweep: Sweep) -> Any:
    """The ResultGrid of an existing sweep, read from its directory; no trial runs."""
    from ray.tune import ResultGrid
    from ray.tune.analysis import ExperimentAnalysis

    check_resumable(sweep, resume=True)
    path, fs = _storage(sweep)
    uri = f"{path.rstrip('/')}/{sweep.spec.name}"
    analysis = ExperimentAnalysis(
        uri, storage_filesystem=fs, default_metric=sweep.spec.metric, default_mode=sweep.spec.mode
    )
    return ResultGrid(analysis)
