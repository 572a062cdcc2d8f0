"""Experiment trackers: one fan-out that rank 0 writes every metrics row to.

    loggers = open_loggers(loop_config["loggers"], config_dict, storage)   # loop._setup
    loggers.write(metrics, step)      # every logged step (loop._log_metrics)
    loggers.close()                   # end of the loop; close(failed=True) on an error

Backends (``run.loggers``): ``tensorboard`` (event files in ``<run>/tensorboard``),
``mlflow`` (one MLflow run per training run, in the experiment ``run.experiment``) and
``wandb`` (one W&B run, project ``run.wandb_project`` or the experiment). MLflow and W&B
are imported only when configured; ``missing_extra`` names the ``pip install`` line when
they are not installed (``config.validate`` refuses the config before Ray starts).

Only scalar values are written (strings such as ``warning`` are skipped). The resolved
config is logged once at start as parameters with flattened dotted keys
(``optim.lr``, ``run.name``, ...). The backend run ids are kept in ``<run>/loggers.json``:
a resumed run (the same ``run.name``: an elastic restart, a rerun, a Tune trial's next
incarnation) continues the same MLflow / W&B run instead of starting a new one.

``loop_settings`` is computed on the driver (``orchestrator/train/driver.py``
``build_trainer``), so environment variables (``MLFLOW_TRACKING_URI``, ``WANDB_DIR``) are
read where the command runs, not on the worker nodes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import TipsConfig

logger = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "mlflow", "wandb")
# backend -> (module to import, extra of this package that installs it)
_PACKAGES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
STATE_FILE = "loggers.json"
DEFAULT_EXPERIMENT = "tips"
_PARAM_MAX_CHARS = 500  # MLflow's limit is 6000; longer values (lists) are cut with "..."
_MLFLOW_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")  # MLflow's allowed metric/param names


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return False


def missing_extra(names: list[str] | tuple[str, ...]) -> str | None:
    """One line naming the ``pip install`` for configured backends that are not installed."""
    missing = [n for n in names if n in _PACKAGES and not _installed(_PACKAGES[n][0])]
    if not missing:
        return None
    extras = ",".join(_PACKAGES[n][1] for n in missing)
    return f"{' and '.join(missing)} not installed: pip install tips-orchestrator[{extras}]"


def active_backends(cfg: TipsConfig) -> list[str]:
    """``run.loggers`` less ``tensorboard`` when ``run.tensorboard`` is false or the run
    directory is not local (event files are written locally only)."""
    r = cfg.run
    out = []
    for name in r.loggers:
        if name == "tensorboard" and (not r.tensorboard or "://" in r.storage_uri):
            continue
        out.append(name)
    return out


def mlflow_tracking_uri(cfg: TipsConfig) -> str:
    """``run.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store
    ``<run.storage_uri>/mlflow.db`` (MLflow 3 refuses plain ``./mlruns`` directories).

    Raises:
        ValueError: storage on S3 and no tracking URI set (there is no S3 tracking store).
    """
    uri = cfg.run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "://" in cfg.run.storage_uri:
        raise ValueError(
            f"run.loggers includes mlflow and run.storage_uri={cfg.run.storage_uri} is not "
            "local: set run.mlflow_tracking_uri (or MLFLOW_TRACKING_URI) to a tracking server"
        )
    return f"sqlite:///{Path(cfg.run.storage_uri).resolve() / 'mlflow.db'}"


def loop_settings(
    cfg: TipsConfig, run_name: str, run_uri: str, default_experiment: str = DEFAULT_EXPERIMENT
) -> dict[str, Any]:
    """What the loop needs to open the loggers (plain values: it crosses into Ray); the
    experiment is ``run.experiment``, else ``default_experiment`` (tips tune: the sweep)."""
    r = cfg.run
    names = active_backends(cfg)
    local = "://" not in run_uri
    out: dict[str, Any] = {
        "backends": names,
        "run_name": run_name,
        "state_uri": f"{run_uri.rstrip('/')}/{STATE_FILE}",
        "experiment": r.experiment or default_experiment,
        "tensorboard_dir": str(Path(run_uri) / "tensorboard") if local else None,
        "tags": {},  # extra tags (tips tune: sweep, trial id, swept values)
    }
    if "mlflow" in names:
        out["mlflow_tracking_uri"] = mlflow_tracking_uri(cfg)
        if out["mlflow_tracking_uri"].startswith("sqlite:"):  # no artifacts land in the cwd
            db = Path(out["mlflow_tracking_uri"].removeprefix("sqlite:///"))
            out["mlflow_artifact_location"] = str(db.parent / "mlartifacts")
    if "wandb" in names:
        out["wandb_project"] = r.wandb_project or out["experiment"]
        out["wandb_mode"] = r.wandb_mode
        out["wandb_dir"] = os.environ.get("WANDB_DIR") or (run_uri if local else None)
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row (bools and strings skipped)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


# --------------------------------------------------------------------------- backends


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, settings: dict[str, Any], params: dict[str, Any]) -> None:
        from orchestrator.train.metrics import TensorBoardWriter

        self.writer = TensorBoardWriter(settings.get("tensorboard_dir"))

    def write(self, row: dict[str, float], step: int) -> None:
        self.writer.write(row, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class MlflowSink:
    """One MLflow run through ``MlflowClient`` (no global active run): params once, metrics
    per step with ``log_batch``; a resumed run reopens the stored run id."""

    name = "mlflow"

    def __init__(self, settings: dict[str, Any], params: dict[str, Any], state: dict) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = settings["mlflow_tracking_uri"]
        with _store_lock(uri):  # concurrent Tune trials creating one SQLite store
            self.client = MlflowClient(tracking_uri=uri)
            experiment_id = experiment_id_for(
                self.client, settings["experiment"], settings.get("mlflow_artifact_location")
            )
        tags = {"tips.run_name": settings["run_name"], **settings.get("tags", {})}
        tags = {k: _param_value(v) for k, v in tags.items()}
        previous = state.get("mlflow", {})
        run = None
        if previous.get("tracking_uri") == uri and previous.get("run_id"):
            with contextlib.suppress(Exception):  # deleted or another server: a new run
                run = self.client.get_run(previous["run_id"])
                if run.info.lifecycle_stage != "active":
                    run = None
        if run is None:
            run = self.client.create_run(experiment_id, run_name=settings["run_name"], tags=tags)
            logged: dict[str, str] = {}
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            logged = dict(run.data.params)
            logger.info("MLflow: continuing run %s", run.info.run_id)
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        self.tracking_uri = uri
        values = {_mlflow_name(k): _param_value(v) for k, v in params.items()}
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        # params are immutable in MLflow: a value changed since the first start (PBT, a
        # rerun with another lr) is kept as a tag of the same key instead
        changed = {k: v for k, v in values.items() if k in logged and logged[k] != v}
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=new[i : i + 100])
        run_tags = [RunTag(k, v) for k, v in {**tags, **changed}.items()]
        for i in range(0, len(run_tags), 100):
            self.client.log_batch(self.run_id, tags=run_tags[i : i + 100])
        logger.info(
            "MLflow: run %s in experiment %r at %s", self.run_id, settings["experiment"], uri
        )

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id,
                "tracking_uri": self.tracking_uri}  # fmt: skip

    def write(self, row: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(k), v, now, step) for k, v in row.items()]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def experiment_id_for(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of the MLflow experiment ``name``, created when missing (a concurrent creator
    wins the race: its id is returned)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 (RESOURCE_ALREADY_EXISTS from another process)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class WandbSink:
    """One W&B run: the config once (``config.update``), rows logged with ``train/step`` as
    their step metric (``define_metric``) rather than W&B's own ``_step`` counter."""

    name = "wandb"

    def __init__(self, settings: dict[str, Any], params: dict[str, Any], state: dict) -> None:
        import wandb

        previous = state.get("wandb", {})
        same = previous.get("project") == settings["wandb_project"]
        run_id = previous.get("id") if same and previous.get("id") else uuid.uuid4().hex[:12]
        directory = settings.get("wandb_dir")
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        tags = settings.get("tags", {})
        self.run = wandb.init(
            project=settings["wandb_project"],
            group=settings["experiment"],
            name=settings["run_name"],
            id=run_id,
            resume="allow",
            dir=directory,
            mode=settings.get("wandb_mode", "online"),
            tags=[f"{k}={_param_value(v)}"[:64] for k, v in tags.items()] or None,
            settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True),
            reinit="create_new",
        )
        self.run.config.update({**params, **tags}, allow_val_change=True)
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        self.project = settings["wandb_project"]
        logger.info("W&B: run %s (%s) in %s", run_id, self.run.settings.mode, self.run.dir)

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.project}

    def write(self, row: dict[str, float], step: int) -> None:
        self.run.log({**row, "train/step": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# --------------------------------------------------------------------------- the fan-out


class Loggers:
    """Every configured backend; a backend that fails to write is warned about once and
    dropped (a tracking server outage does not stop training)."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = list(sinks)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sinks]

    def write(self, metrics: dict[str, Any], step: int) -> None:
        row = scalars(metrics)
        for sink in list(self.sinks):
            try:
                sink.write(row, step)
            except Exception as e:  # noqa: BLE001 (any backend error: keep training)
                logger.warning("%s: writing metrics failed, no more rows go there: %s",
                               sink.name, e)  # fmt: skip
                self.sinks.remove(sink)

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            try:
                sink.close(failed)
            except Exception as e:  # noqa: BLE001
                logger.warning("%s: closing failed: %s", sink.name, e)
        self.sinks = []


def open_loggers(
    settings: dict[str, Any] | None,
    config: dict[str, Any] | None = None,
    storage: Any = None,
) -> Loggers:
    """The backends of ``settings`` (``loop_settings``), each started (or resumed from
    ``<run>/loggers.json``), with ``config`` (``config.to_dict``) logged as parameters."""
    from orchestrator import storage as st

    if not settings or not settings.get("backends"):
        return Loggers([])
    params = flatten(config or {})
    uri = settings["state_uri"]
    state: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # absent or unreadable: fresh runs
        if st.exists(uri, storage):
            state = json.loads(st.read_text(uri, storage))
    sinks: list[Any] = []
    try:
        for name in settings["backends"]:
            if name == "tensorboard":
                sinks.append(TensorBoardSink(settings, params))
            elif name == "mlflow":
                sinks.append(MlflowSink(settings, params, state))
            elif name == "wandb":
                sinks.append(WandbSink(settings, params, state))
    except BaseException:
        Loggers(sinks).close(failed=True)
        raise
    new_state = {s.name: s.state() for s in sinks if hasattr(s, "state")}
    if new_state and new_state != {k: state.get(k) for k in new_state}:
        st.write_text(uri, json.dumps({**state, **new_state}, indent=1, sort_keys=True), storage)
    return Loggers(sinks)


def check_mlflow(settings: dict[str, Any]) -> None:
    """Reach the tracking store and make the experiment (the driver's preflight), so a wrong
    URI fails before any worker starts."""
    from mlflow.tracking import MlflowClient

    uri = settings["mlflow_tracking_uri"]
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        experiment_id_for(client, settings["experiment"], settings.get("mlflow_artifact_location"))


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive file lock next to a local SQLite store (its first creation runs schema
    migrations that must not run twice at once); nothing for other stores."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mlflow_name(key: str) -> str:
    return _MLFLOW_NAME_BAD.sub("_", key)


def _param_value(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v):
        text = repr(v)
    else:
        text = json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v)
    return text if len(text) <= _PARAM_MAX_CHARS else text[: _PARAM_MAX_CHARS - 3] + "..."
