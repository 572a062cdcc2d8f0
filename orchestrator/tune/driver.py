"""The Tune trial: a driver function that runs one full elastic training run.

PBT works through a relay (docs/ray.md, "PBT relay").

Each trial is ``tips train`` with the trial's overrides: the same ``build_trainer`` and
train loop, started from a Tune function trainable (``Tuner(trainable)``, not the
deprecated ``Tuner(trainer)``). The relay:

1. ``RelayCallback`` (a ``ray.train.UserCallback``, runs in the Train controller) puts rank
   0's metrics and the reported Train checkpoint's URI on a ``ray.util.queue.Queue``.
2. The driver runs ``trainer.fit()`` in a thread; its main thread drains the queue and calls
   ``ray.tune.report(metrics, checkpoint=...)`` where the Tune checkpoint is a tiny directory
   holding ``pointer.json`` (the Train checkpoint URI). That is what lets PBT exploit: Tune
   sees a checkpoint per report and hands the donor's to the exploiting trial.
3. At every (re)start the driver reads ``ray.tune.get_checkpoint()``; a pointer becomes
   ``run.resume_from`` of a Train run whose name is unique per incarnation
   (``trial-<id>-<n>``), so Train does not auto-resume the trial's own older run instead of
   the donor's checkpoint. The hyperparameters (loss weights, EMA schedule...) always come
   from the trial's config, never from the checkpoint.

A trial whose workers stopped at an error that would repeat (``train.DETERMINISTIC_FAILURES``:
the non-finite-loss limit, a damaged checkpoint, exhausted data) leaves the error in
``<sweep>/fatal/<trial id>.txt``; Tune's retry (``trial.max_failures``, Tune has no
per-exception choice) then fails at once with the same message instead of training again
from the trial's last checkpoint into the same error. Resuming the sweep clears the folder
(orchestrator/tune/tuner.py): after a fix, those trials run again.

Reports are held back until the sweep metric exists (Tune checks strictly); evaluation
metrics (``eval/...``, reported every ``train.eval_every_steps``) are carried forward to
later reports so that every report has the metric the scheduler compares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue as queue_lib
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune

from orchestrator import config as config_lib

FATAL_DIR = "fatal"  # <sweep>/fatal/<trial id>.txt: the repeating error a trial stopped at
logger = logging.getLogger(__name__)

POINTER_FILE = "pointer.json"
INCARNATIONS_FILE = "incarnations.jsonl"
_DONE = "__fit_done__"


class RelayCallback(ray.train.UserCallback):
    """Forwards rank 0's report and the checkpoint URI to the trial driver."""

    def __init__(self, relay: Any, scheme: str) -> None:
        self.relay = relay
        self.scheme = scheme  # "s3://" when the Train storage is S3, else ""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        path = None
        if checkpoint is not None:
            path = checkpoint.path if "://" in checkpoint.path else self.scheme + checkpoint.path
        self.relay.put((dict(metrics[0]), path))


def plain(value: Any) -> Any:
    """Numpy scalars from Tune's samplers -> Python values the config schema accepts."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def trial_config(base: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The trial's TipsConfig: the sweep's base recipe with the sampled values applied."""
    cfg = config_lib.from_dict(base)
    return config_lib.with_overrides(cfg, {k: plain(v) for k, v in overrides.items()})


def incarnation_name(trial_id: str, resume_from: str | None) -> str:
    """Train run name: stable for a fresh start, unique per donor checkpoint afterwards."""
    if not resume_from:
        return f"trial-{trial_id}"
    digest = hashlib.sha1(resume_from.encode()).hexdigest()[:8]
    return f"trial-{trial_id}-{digest}"


def _pointer_checkpoint(train_uri: str, step: int) -> ray.tune.Checkpoint:
    directory = Path(tempfile.mkdtemp(prefix="tips-tune-ptr-"))
    (directory / POINTER_FILE).write_text(json.dumps({"train_checkpoint": train_uri, "step": step}))
    return ray.tune.Checkpoint.from_directory(str(directory))


def _read_pointer(checkpoint: Any) -> str | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        p = Path(d) / POINTER_FILE
        return json.loads(p.read_text())["train_checkpoint"] if p.is_file() else None


def _log_incarnation(record: dict[str, Any]) -> None:
    """Append to the trial directory's incarnations.jsonl: every start, with its source."""
    try:
        trial_dir = Path(ray.tune.get_context().get_trial_dir())
        trial_dir.mkdir(parents=True, exist_ok=True)
        with open(trial_dir / INCARNATIONS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # bookkeeping only: never fail the trial for it
        logger.warning("could not record the trial start: %s", e)


def trial_loggers(
    cfg: config_lib.TipsConfig,
    trial_id: str,
    name: str,
    overrides: dict[str, Any],
    sweep_uri: str,
) -> dict[str, Any]:
    """The trial's tracker settings (``orchestrator/train/loggers.py``): one MLflow / W&B
    run per trial, named ``trial-<id>`` and kept in the first incarnation's run directory
    (a PBT exploit continues it), in the experiment named after the sweep unless
    ``run.experiment`` is set; the sweep, trial id and swept values as tags."""
    from orchestrator.storage import join_uri
    from orchestrator.train.driver import run_uri
    from orchestrator.train.loggers import STATE_FILE, loop_settings

    sweep = sweep_uri.rstrip("/").rsplit("/", 1)[-1]
    settings = loop_settings(cfg, name, run_uri(cfg, name), default_experiment=sweep)
    first = incarnation_name(trial_id, None)
    settings["run_name"] = first
    settings["state_uri"] = join_uri(run_uri(cfg, first), STATE_FILE)
    settings["tags"] = {"sweep": sweep, "trial_id": trial_id, **overrides}
    return settings


def trial_driver(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    metric: str,
    sweep_uri: str,
    keep_all_checkpoints: bool,
) -> None:
    """Tune function trainable: one elastic Train run with ``config["overrides"]`` applied."""
    from ray.util.queue import Queue

    from orchestrator.storage import exists, is_s3, join_uri, read_text, write_text
    from orchestrator.train.driver import absolutize, build_trainer, fatal_error

    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    overrides = {k: plain(v) for k, v in config.get("overrides", {}).items()}
    donor = _read_pointer(ray.tune.get_checkpoint())
    extra: dict[str, Any] = {"run.storage_uri": join_uri(sweep_uri, "train")}
    if donor:
        extra["run.resume_from"] = donor
    name = incarnation_name(trial_id, donor)
    extra["run.name"] = name
    cfg = trial_config(base, overrides)
    if keep_all_checkpoints:  # PBT may exploit any reported checkpoint
        # (docs/ray.md, "PBT relay", step 5)
        t = cfg.train
        extra["run.num_checkpoints_to_keep"] = t.total_steps // t.checkpoint_every_steps + 2
    cfg = absolutize(config_lib.with_overrides(cfg, extra))
    fatal_uri = join_uri(sweep_uri, FATAL_DIR, f"{trial_id}.txt")
    if exists(fatal_uri, cfg.storage):  # a retry of a trial that stopped at a repeating error
        raise RuntimeError(
            f"trial {trial_id}: training failed: {read_text(fatal_uri, cfg.storage)} "
            "(not trained again: the error repeats; resume the sweep to retry after a fix)"
        )
    _log_incarnation(
        {"time": time.time(), "train_run": name, "resume_from": donor, "overrides": overrides}
    )
    logger.info("trial %s: train run %s (resume_from=%s) %s", trial_id, name, donor, overrides)

    relay = Queue(actor_options={"num_cpus": 0})
    scheme = "s3://" if is_s3(cfg.run.storage_uri) else ""
    callbacks = [RelayCallback(relay, scheme)]
    tracking = {"loggers": trial_loggers(cfg, trial_id, name, overrides, sweep_uri)}
    trainer = build_trainer(cfg, name=name, callbacks=callbacks, extra_loop_config=tracking)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the Tune thread below
            outcome["error"] = e
        finally:
            relay.put((_DONE, None))

    thread = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    thread.start()
    _relay_to_tune(relay, metric)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome.get("result")
    if result is not None and result.error is not None:
        raise RuntimeError(f"trial {trial_id}: training failed: {result.error}")
    fatal = fatal_error(cfg, name)  # the workers stopped at an error that would repeat
    if fatal:
        write_text(fatal_uri, fatal, cfg.storage)
        raise RuntimeError(f"trial {trial_id}: training failed: {fatal}")


def _relay_to_tune(relay: Any, metric: str) -> None:
    """Forward the Train run's reports to Tune until the run ends: eval metrics carried
    forward, a report held back until the sweep's metric exists (strict checking), and each
    checkpoint handed over as a pointer that Tune copies to the sweep's storage."""
    carried: dict[str, float] = {}
    pending_checkpoint: str | None = None
    while True:
        try:
            metrics, path = relay.get(timeout=1.0)
        except queue_lib.Empty:
            continue
        except Exception:  # ray.util.queue.Empty subclasses queue.Empty; be lenient
            continue
        if metrics == _DONE:
            return
        carried.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
        merged = {**carried, **metrics}
        if path:
            pending_checkpoint = path
        if metric not in merged:
            continue
        step = int(merged.get("train/step", 0))
        checkpoint = _pointer_checkpoint(pending_checkpoint, step) if pending_checkpoint else None
        pending_checkpoint = None
        ray.tune.report(merged, checkpoint=checkpoint)
        if checkpoint is not None:  # Tune copied it to the sweep's storage
            shutil.rmtree(checkpoint.path, ignore_errors=True)
