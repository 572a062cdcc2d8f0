"""The driver: build the TorchTrainer for a validated config and run it.

    result = fit(cfg)            # what `tips train recipe=...` calls after config.load

* ``ScalingConfig(num_workers=(min, max))`` makes the run elastic: any worker or node loss,
  or capacity coming back, restarts the worker group from the latest checkpoint with as
  many workers as fit (docs/ray.md, "Elasticity and failures"). ``min_workers =
  max_workers = 0`` is Ray Train's local mode (the loop runs in this process; handy for tests
  and debugging).
* ``RunConfig(name, storage_path)`` with a stable name: rerunning the same command resumes
  from the run's latest checkpoint (docs/ray.md, "Run persistence and auto-resume").
* The train dataset is handed to Train as a *factory*, which Ray calls again at every
  worker-group (re)start; the factory reads the data position of the latest checkpoint
  of this run, so the new stream starts where the checkpoint left off
  (docs/design.md, "Checkpoints").
* Paths are made absolute before they cross into workers (workers chdir into a run dir).
* Recovery from a lost node (docs/ray.md, "Recovery time"): an elastic run's worker-group
  start timeout is ``scaling.worker_group_start_timeout_s`` (``train_env``), and Ray's
  autoscaling coordinator re-reads the nodes as soon as one dies or joins (``NodeWatch``)
  and right before the controller acts on a failure (``_recovery_callbacks``), so the
  restart is sized from the nodes that are there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator import config as config_lib
from orchestrator import ray_compat
from orchestrator.train import preemption
from orchestrator.train import state as ckpt

logger = logging.getLogger(__name__)


def _abs_uri(uri: str | None) -> str | None:
    if uri is None or "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def absolutize(cfg: config_lib.TipsConfig) -> Any:
    """Local paths in the config made absolute (Ray workers run in another directory)."""
    overrides: dict[str, Any] = {
        "data.train_uri": _abs_uri(cfg.data.train_uri),
        "run.storage_uri": _abs_uri(cfg.run.storage_uri),
    }
    if cfg.data.eval_uri:
        overrides["data.eval_uri"] = _abs_uri(cfg.data.eval_uri)
    if cfg.run.resume_from:
        overrides["run.resume_from"] = _abs_uri(cfg.run.resume_from)
    if cfg.model.tokenizer_path:
        overrides["model.tokenizer_path"] = _abs_uri(cfg.model.tokenizer_path)
    return config_lib.with_overrides(cfg, overrides)


def run_uri(cfg: config_lib.TipsConfig, name: str | None = None) -> str:
    return f"{cfg.run.storage_uri.rstrip('/')}/{name or cfg.run.name}"


def metrics_path(cfg: config_lib.TipsConfig, name: str | None = None) -> str | None:
    """Rank 0's ``metrics.jsonl`` (local storage only; S3 runs use TensorBoard/Ray metrics)."""
    if "://" in cfg.run.storage_uri:
        return None
    return str(Path(cfg.run.storage_uri) / (name or cfg.run.name) / "metrics.jsonl")


def required_keys(cfg: config_lib.TipsConfig) -> set[str]:
    """Batch keys the configured objective reads (built on the meta device: no memory)."""
    import torch

    from tips_model.objectives import build_objective
    from tips_model.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.tokenizer_path, cfg.model.max_text_len)
    with torch.device("meta"):
        return build_objective(cfg.objective, cfg.model, tok.vocab_size).required_batch_keys()


class TrainDatasetFactory:
    """Called by Ray Train at every worker-group (re)start: a stream from the data position
    of the latest checkpoint of this run (or of ``run.resume_from``) to the end of training."""

    def __init__(self, cfg: config_lib.TipsConfig, run_uri: str) -> None:
        self.cfg_dict = config_lib.to_dict(cfg)
        self.run_uri = run_uri

    def __call__(self) -> ray.data.Dataset:
        from orchestrator.data.pipeline import build_train_stream
        from orchestrator.train.state import latest_train_state

        cfg = config_lib.from_dict(self.cfg_dict)
        # Runs in the train controller: the DataContext is captured when the dataset is built.
        ray.data.DataContext.get_current().enable_progress_bars = False
        state = latest_train_state(self.run_uri, cfg.storage)
        if state is None and cfg.run.resume_from:
            state = latest_train_state(cfg.run.resume_from, cfg.storage, is_checkpoint=True)
        start = state.data_position if state is not None else 0
        done = state.samples_seen if state is not None else 0
        total = cfg.train.total_steps * cfg.train.global_batch_size
        logger.info(
            "train stream from input position %d (%d of %d samples done)", start, done, total
        )
        return build_train_stream(
            cfg,
            patch_size=config_lib.patch_size(cfg.model),
            start_sample=start,
            # bad records are skipped: read enough positions to deliver the batches anyway
            num_samples=math.ceil(max(total - done, 0) / (1 - cfg.data.max_skipped_fraction)),
            required_keys=required_keys(cfg),
            preserve_order=True,  # exact resume needs the seeded order (DESIGN: Checkpoints)
        )


def train_env(cfg: config_lib.TipsConfig) -> dict[str, str]:
    """Ray Train settings that have no ``ScalingConfig`` field, as the environment variables
    Ray reads (the trainer passes them from the driver to the controller and the workers).

    Every run: Ray Train's PreemptionWatcher polls for draining nodes every
    ``train.preemption_poll_interval_s``. Elastic runs also get
    ``scaling.worker_group_start_timeout_s`` as the worker-group start timeout; fixed-size
    runs keep Ray's 60 s: their restart can only wait for a replacement node, and a shorter
    timeout would just start the same wait again."""
    s = cfg.scaling
    env = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": f"{cfg.train.preemption_poll_interval_s:g}"}
    if s.min_workers < s.max_workers:
        env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{s.worker_group_start_timeout_s:g}"
    return env


def _recovery_callbacks(cfg: config_lib.TipsConfig) -> list[Any]:
    """Elastic runs: the controller refreshes Ray's view of the nodes before each restart,
    sizes restarts without draining nodes, and restarts at once when the workers' preemption
    checkpoint is written (``ray_compat.recovery_callback``; orchestrator/train/preemption.py)."""
    if cfg.scaling.min_workers == cfg.scaling.max_workers:
        return []
    return [ray_compat.recovery_callback(cfg.scaling.min_workers, preemption.RESTART_KEY)]


class NodeWatch:
    """While an elastic run trains: polls the GCS's node table (``ray.nodes()``) every
    ``interval_s`` and, when a node dies or joins, makes Ray's autoscaling coordinator
    re-read the nodes at once (``ray_compat.refresh_autoscaling_coordinator``). The
    coordinator otherwise refreshes every 20 s, and Ray Train sizes each restart from it:
    a restart in that window asked for the lost node's workers too and waited out the
    worker-group start timeout before it started with the workers that fit."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.refreshes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tips-node-watch", daemon=True)

    @staticmethod
    def alive_nodes() -> frozenset[str]:
        return frozenset(n["NodeID"] for n in ray.nodes() if n["Alive"])

    def _run(self) -> None:
        seen = self.alive_nodes()
        while not self._stop.wait(self.interval_s):
            try:
                now = self.alive_nodes()
                if now != seen and ray_compat.refresh_autoscaling_coordinator():
                    self.refreshes += 1
                    logger.info("nodes changed (%d -> %d alive)", len(seen), len(now))
                seen = now
            except Exception as e:  # noqa: BLE001 (a slow GCS or actor: try again next time)
                logger.debug("node watch: %s", e)

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def backend_config(cfg: config_lib.TipsConfig) -> TorchConfig:
    """The Ray Train backend for ``scaling.accelerator``: torch_xla's (orchestrator/train/
    xla.py) for tpu, torch's default (gloo on CPU, NCCL on GPU) for cpu and gpu."""
    if config_lib.accelerator(cfg.scaling) == "tpu":
        from orchestrator.train.xla import TorchXLAConfig

        return TorchXLAConfig(pjrt_device=cfg.scaling.pjrt_device)
    return TorchConfig()


def describe_backend(cfg: config_lib.TipsConfig) -> str:
    """One line for ``tips train --dry-run``: the accelerator and the backend it selects."""
    backend = backend_config(cfg)
    kind = config_lib.accelerator(cfg.scaling)
    if kind == "tpu":
        return f"accelerator: tpu (TorchXLAConfig, PJRT_DEVICE={cfg.scaling.pjrt_device})"
    return f"accelerator: {kind} ({type(backend).__name__}, {'nccl' if kind == 'gpu' else 'gloo'})"


def build_trainer(
    cfg: config_lib.TipsConfig,
    *,
    name: str | None = None,
    callbacks: list[Any] | None = None,
    extra_loop_config: dict[str, Any] | None = None,
    train_dataset: Any = None,
) -> TorchTrainer:
    """A TorchTrainer for ``cfg`` (already validated and absolutized).

    ``train_dataset`` replaces the shard pipeline (a Ray Dataset, or a callable returning
    one at every worker-group start) for users with their own Ray Data stream; its rows must
    follow the batch contract plus an int64 ``sample_index`` column (the data position).
    """
    from ray.data import DataContext
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )

    from orchestrator.storage import train_storage
    from orchestrator.train import loggers as loggers_lib
    from orchestrator.train.loop import train_loop_per_worker

    s, r = cfg.scaling, cfg.run
    name = name or r.name
    num_workers: int | tuple[int, int] = (
        s.max_workers if s.min_workers == s.max_workers else (s.min_workers, s.max_workers)
    )
    scaling = ScalingConfig(
        num_workers=num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker=dict(s.resources_per_worker),
        accelerator_type=s.accelerator_type,
        placement_strategy=s.placement_strategy,
        elastic_resize_monitor_interval_s=s.resize_check_interval_s,
    )
    storage_path, storage_fs = train_storage(r.storage_uri, cfg.storage)
    run_config = RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=FailureConfig(
            max_failures=r.max_failures, max_preemption_failures=r.max_preemption_failures
        ),
        checkpoint_config=CheckpointConfig(num_to_keep=r.num_checkpoints_to_keep),
        callbacks=[*(callbacks or []), *_recovery_callbacks(cfg)],
        # Ray Train filters its own console records (ray.train.*) at this level; the
        # session's log files keep everything (docs/ray.md, "Quiet console")
        logging_config=LoggingConfig(log_level=r.ray_log_level.upper()),
        worker_runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": r.ray_log_level.upper()}},
    )
    try:  # TensorBoard, MLflow, W&B: resolved here, where the command's environment is
        logger_settings = loggers_lib.loop_settings(cfg, name, run_uri(cfg, name))
    except ValueError as e:
        raise PreflightError(str(e)) from None
    DataContext.get_current().enable_progress_bars = False
    for key, value in train_env(cfg).items():
        os.environ.setdefault(key, value)  # read when fit() starts the controller
    execution = ray.data.ExecutionOptions(preserve_order=True)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config_lib.to_dict(cfg),
            "metrics_path": metrics_path(cfg, name),
            "run_uri": run_uri(cfg, name),
            # Ray Train local mode (no worker processes) keeps reported checkpoints in
            # memory only: the loop then writes them to the run directory itself.
            "local_mode": s.max_workers == 0,
            "loggers": logger_settings,
            **(extra_loop_config or {}),
        },
        scaling_config=scaling,
        run_config=run_config,
        torch_config=backend_config(cfg),
        datasets={"train": train_dataset or TrainDatasetFactory(cfg, run_uri(cfg, name))},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=execution),
    )


class PreflightError(ValueError):
    """A run that would fail the same way on every attempt, found before Ray starts."""


def _check_caption_kinds(cfg: config_lib.TipsConfig, sample: int = 256) -> None:
    """Every kind in ``data.caption_ratios`` must occur among the first records, when the
    objective reads synthetic captions (a typo would silently train on alt-text)."""
    from orchestrator.data.local import caption_kinds_sample

    if "syn_ids" not in required_keys(cfg):
        return
    kinds, read = caption_kinds_sample(cfg, sample)
    missing = sorted(k for k in cfg.data.caption_ratios if kinds.get(k, 0) == 0)
    if read and missing:
        have = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
        raise PreflightError(
            f"data.caption_ratios names caption kind(s) {missing} that none of the first "
            f"{read} records of {cfg.data.train_uri} has (records per kind: {have}); "
            "name the kinds the shards hold (tips data inspect shows them)"
        )


def preflight(cfg: config_lib.TipsConfig, name: str | None = None) -> str | None:
    """Checks on the driver, before any worker starts; returns the checkpoint to resume.

    * ``data.train_uri`` must list shards with the right schema (its ``plan_stream``: the URI,
      the S3 endpoint and bucket, every shard's columns) and hold at least one usable
      record (``scan_for_usable_record``); every kind in ``data.caption_ratios`` must occur
      in its first records when the objective reads synthetic captions;
    * ``run.resume_from``, when this run has no checkpoint yet, must be a complete,
      loadable checkpoint (``state.checkpoint_problem``);
    * the checkpoint a (re)run would resume from must hold tensors of the shapes the
      configured objective has (its ``config.yaml`` rebuilt on the meta device: settings
      that keep the shapes, such as loss weights or the learning rate, may change).

    Raises:
        PreflightError: one line naming the URI and what is wrong.
    """
    from orchestrator import storage as st
    from orchestrator.data.local import scan_for_usable_record
    from orchestrator.data.shards import ShardError

    try:  # lists every shard and checks its schema (a bad URI, bucket or endpoint fails
        # here), then reads until the first usable record
        found, counts = scan_for_usable_record(
            cfg, config_lib.patch_size(cfg.model), required_keys(cfg)
        )
    except (ShardError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PreflightError(f"data.train_uri={cfg.data.train_uri}: {first}") from None
    if not found:
        raise PreflightError(
            f"data.train_uri={cfg.data.train_uri}: no usable record (skipped: "
            + ", ".join(f"{k.removeprefix('skipped_')} {v}" for k, v in sorted(counts.items()))
            + ")"
        )
    _check_caption_kinds(cfg)
    check_loggers(cfg, name)
    run = run_uri(cfg, name)
    fatal_error(cfg, name)  # a marker left by an earlier attempt says nothing about this one
    source = ckpt.newest_checkpoint(run, cfg.storage)
    if source is None and cfg.run.resume_from:
        source = cfg.run.resume_from
        if not st.exists(st.join_uri(source, "train_state.json"), cfg.storage) and not (
            ckpt.list_checkpoints(source, cfg.storage)
        ):
            raise PreflightError(f"run.resume_from={source}: no checkpoint there")
        problem = ckpt.checkpoint_problem(source, cfg.storage)
        if problem is not None:
            raise PreflightError(f"run.resume_from={source}: {problem}")
    if source is None:
        return None
    saved = config_lib.parse_yaml_dict(
        st.read_text(st.join_uri(source, "config.yaml"), cfg.storage)
    )
    try:
        saved_cfg = config_lib.from_dict(saved)
    except config_lib.ConfigError:
        return source  # an older schema: the workers' strict load still names any mismatch
    want, have = _state_shapes(cfg), _state_shapes(saved_cfg)
    if want != have:
        now = config_lib.to_dict(cfg)
        differ = sorted(
            f"{section}.{k}"
            for section in ("model", "objective")
            for k in saved.get(section, {})
            if k in now[section] and saved[section][k] != now[section][k]
        )
        shown = ", ".join(f"{k} {_dotted(saved, k)!r} -> {_dotted(now, k)!r}" for k in differ[:4])
        tensor = next(
            (f"{k} {have.get(k)} -> {want.get(k)}" for k in sorted(set(want) | set(have))
             if want.get(k) != have.get(k)),
            "",
        )  # fmt: skip
        raise PreflightError(
            f"{source} was saved for another model ({shown or tensor}); its weights do not "
            f"fit ({tensor}): start a new run.name (now {cfg.run.name!r}) or restore those "
            "settings"
        )
    return source


def check_loggers(cfg: config_lib.TipsConfig, name: str | None = None) -> None:
    """``run.loggers``: each backend installed, the MLflow tracking store reachable (its
    experiment is made here, once, before the workers race to make it).

    Raises:
        PreflightError: one line naming the key and the fix.
    """
    from orchestrator.train import loggers as loggers_lib

    missing = loggers_lib.missing_extra(list(cfg.run.loggers))
    if missing:
        raise PreflightError(f"run.loggers={list(cfg.run.loggers)}: {missing}")
    try:
        settings = loggers_lib.loop_settings(cfg, name or cfg.run.name, run_uri(cfg, name))
    except ValueError as e:
        raise PreflightError(str(e)) from None
    if "mlflow" in settings["backends"]:
        try:
            loggers_lib.check_mlflow(settings)
        except Exception as e:  # noqa: BLE001 (MlflowException, connection errors)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PreflightError(
                f"run.mlflow_tracking_uri={settings['mlflow_tracking_uri']}: {first}"
            ) from None


def _state_shapes(cfg: config_lib.TipsConfig) -> dict[str, list[int]]:
    """Parameter and buffer shapes of the configured objective (built on the meta device)."""
    import torch

    from tips_model.objectives import build_objective
    from tips_model.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.tokenizer_path, cfg.model.max_text_len)
    with torch.device("meta"):
        objective = build_objective(cfg.objective, cfg.model, tok.vocab_size)
    return {k: list(v.shape) for k, v in objective.state_dict().items()}


def _dotted(d: dict[str, Any], key: str) -> Any:
    section, field = key.split(".", 1)
    return d.get(section, {}).get(field)


def fit(cfg: config_lib.TipsConfig, *, name: str | None = None) -> ray.train.Result:
    """Validate paths, check what would be resumed, start or attach to Ray, train.

    Raises:
        PreflightError: before Ray starts (see ``preflight``).
    """
    cfg = absolutize(cfg)
    preflight(cfg, name)
    init_ray(cfg.run.ray_log_level)
    trainer = build_trainer(cfg, name=name)
    elastic = cfg.scaling.min_workers < cfg.scaling.max_workers
    with NodeWatch() if elastic else contextlib.nullcontext():
        return trainer.fit()


def init_ray(ray_log_level: str = "warning", **kwargs: Any) -> None:
    """Start or attach to Ray (``RAY_ADDRESS``) unless it is up. Ray Data's console lines
    (execution plans, each dataset's start and finish) follow ``ray_log_level``: Ray Data
    reads ``RAY_DATA_LOG_LEVEL`` in each process that runs a dataset, and processes of a
    Ray this driver starts inherit its environment (the train workers get it through
    ``RunConfig.worker_runtime_env`` on any cluster)."""
    if ray.is_initialized():
        return
    os.environ["RAY_DATA_LOG_LEVEL"] = ray_log_level.upper()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(**kwargs)


def fatal_error(cfg: config_lib.TipsConfig, name: str | None = None) -> str | None:
    """The error the workers stopped at without retrying (``train.DETERMINISTIC_FAILURES``),
    read once: the marker is removed so that a rerun after the fix starts clean."""
    from orchestrator import storage as st

    uri = st.join_uri(run_uri(cfg, name), ckpt.FATAL_FILE)
    if not st.exists(uri, cfg.storage):
        return None
    text = st.read_text(uri, cfg.storage).strip()
    fs, path = st.filesystem(uri, cfg.storage)
    fs.delete_file(path)
    return text


def root_cause(error: BaseException) -> BaseException:
    """The exception that started a failed run: a worker's (the lowest rank that failed) or
    the controller's, unwrapped from Ray's task-error wrapper and ``raise ... from``."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        if failures:
            error = failures[min(failures)]
            continue
        inner = getattr(error, "controller_failure", None) or getattr(error, "cause", None)
        if isinstance(inner, BaseException):
            error = inner
            continue
        if error.__cause__ is not None:
            error = error.__cause__
            continue
        break
    return error


def failure_line(error: BaseException) -> str:
    """One line for the console: the root cause's type and the first line of its message."""
    cause = root_cause(error)
    lines = [x.strip() for x in str(cause).splitlines() if x.strip()]
    text = lines[0] if lines else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def write_failure_log(
    cfg: config_lib.TipsConfig, error: BaseException, name: str | None = None
) -> str:
    """The full error (Ray's text, with every worker's traceback) in a file; its path.

    Local runs: ``<run dir>/errors/<UTC time>.log``; S3 runs: a local temporary file (the
    console line says where)."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    text += "\n" + str(error) + "\n"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if "://" in cfg.run.storage_uri:
        fd, path = tempfile.mkstemp(prefix=f"tips-{cfg.run.name}-{stamp}-", suffix=".log")
        os.close(fd)
    else:
        folder = Path(cfg.run.storage_uri) / (name or cfg.run.name) / "errors"
        folder.mkdir(parents=True, exist_ok=True)
        path = str(folder / f"{stamp}.log")
    Path(path).write_text(text)
    return path
