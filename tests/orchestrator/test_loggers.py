"""Experiment trackers (orchestrator/train/loggers.py) against the real backends, offline.

* MLflow: a real ``mlflow server`` on 127.0.0.1 at a free port with a temporary SQLite
  backend store (module fixture: started as a subprocess, waited for, stopped); what
  arrived is read back through ``MlflowClient``.
* W&B: ``wandb_mode=offline`` with ``WANDB_DIR`` in a temporary directory; the offline run
  directory and its ``.wandb`` file (a LevelDB-style log of protobuf records) are read back.
* TensorBoard: the event files.

The fan-out is driven directly (fast); one slow test runs a real ``fit``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import config as config_lib
from orchestrator.train.loggers import STATE_FILE, loop_settings, missing_extra, open_loggers
from tests.orchestrator.conftest import _free_port, ray_runtime

ROWS = [
    {"train/step": 1, "loss/total": 3.0, "sched/lr": 1e-4, "eval/retrieval/i2t@1": 0.25},
    {"train/step": 2, "loss/total": 2.5, "sched/lr": 2e-4, "warning": "collapse: ..."},
    {"train/step": 3, "loss/total": 2.0, "sched/lr": 3e-4},
]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` with a temporary SQLite store; its URL."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--default-artifact-root", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _cfg(data_cfg, synth_data, tmp_path, *overrides: str) -> Any:
    return data_cfg(str(synth_data / "train"), f"run.storage_uri={tmp_path / 'runs'}", *overrides)


def _settings(cfg: Any) -> dict[str, Any]:
    return loop_settings(cfg, cfg.run.name, f"{cfg.run.storage_uri}/{cfg.run.name}")


def _write_rows(cfg: Any, rows: list[dict[str, Any]]) -> None:
    loggers = open_loggers(_settings(cfg), config_lib.to_dict(cfg))
    for row in rows:
        loggers.write(row, int(row["train/step"]))
    loggers.close()


# --------------------------------------------------------------------------- config


def test_loggers_setting_defaults_and_validation(data_cfg, synth_data, tmp_path):
    cfg = _cfg(data_cfg, synth_data, tmp_path)
    assert cfg.run.loggers == ["tensorboard"] and cfg.run.wandb_mode == "online"
    assert _settings(cfg)["backends"] == ["tensorboard"]
    assert (
        _settings(_cfg(data_cfg, synth_data, tmp_path, "run.tensorboard=false"))["backends"] == []
    )
    with pytest.raises(config_lib.ConfigError, match=r"overrides: run.loggers=\['comet'\]"):
        _cfg(data_cfg, synth_data, tmp_path, "run.loggers=[comet]")
    with pytest.raises(config_lib.ConfigError, match="run.loggers=.*a name repeats"):
        _cfg(data_cfg, synth_data, tmp_path, "run.loggers=[mlflow,mlflow]")
    with pytest.raises(config_lib.ConfigError, match="run.wandb_mode='cloud'"):
        _cfg(data_cfg, synth_data, tmp_path, "run.wandb_mode=cloud")


def test_backend_not_installed_is_refused_with_the_pip_line(
    data_cfg, synth_data, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module unimportable
    assert missing_extra(["tensorboard", "mlflow"]) is None
    with pytest.raises(config_lib.ConfigError) as e:
        _cfg(data_cfg, synth_data, tmp_path, "run.loggers=[tensorboard,wandb]")
    assert str(e.value) == (
        "overrides: run.loggers=['tensorboard', 'wandb']: wandb not installed: "
        "pip install tips-orchestrator[wandb]"
    )


def test_default_mlflow_store_is_sqlite_next_to_the_runs(
    data_cfg, synth_data, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(data_cfg, synth_data, tmp_path, "run.loggers=[mlflow]", "run.name=local")
    settings = _settings(cfg)
    assert settings["mlflow_tracking_uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert settings["experiment"] == "tips"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert _settings(cfg)["mlflow_tracking_uri"] == "http://127.0.0.1:1"
    s3 = _cfg(data_cfg, synth_data, tmp_path, "run.loggers=[mlflow]", "run.storage_uri=s3://b/r")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="set run.mlflow_tracking_uri"):
        _settings(s3)


# --------------------------------------------------------------------------- MLflow


def test_mlflow_gets_params_metrics_per_step_and_resumes_the_same_run(
    mlflow_server, data_cfg, synth_data, tmp_path
):
    from mlflow.tracking import MlflowClient

    common = [
        "run.loggers=[tensorboard,mlflow]", f"run.mlflow_tracking_uri={mlflow_server}",
        "run.experiment=fanout", "run.name=fan",
    ]  # fmt: skip
    cfg = _cfg(data_cfg, synth_data, tmp_path, *common)
    _write_rows(cfg, ROWS)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("fanout")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "fan" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == repr(cfg.optim.lr) and params["run.name"] == "fan"
    assert params["run.loggers"] == '["tensorboard", "mlflow"]'
    assert params["model.vision"] == cfg.model.vision
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    renamed = client.get_metric_history(run.info.run_id, "eval/retrieval/i2t_1")  # '@' -> '_'
    assert [(m.step, m.value) for m in renamed] == [(1, 0.25)]
    assert "warning" not in run.data.metrics
    state = json.loads((tmp_path / "runs" / "fan" / STATE_FILE).read_text())
    assert state["mlflow"]["run_id"] == run.info.run_id
    assert list((tmp_path / "runs" / "fan" / "tensorboard").glob("events.out.tfevents.*"))

    # a resume with a changed lr: the same run continues; the new lr is a tag (params are
    # immutable in MLflow)
    again = _cfg(data_cfg, synth_data, tmp_path, *common, "optim.lr=0.01")
    _write_rows(again, [{"train/step": 3, "loss/total": 1.9}, {"train/step": 4, "loss/total": 1.5}])
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert sorted((m.step, m.value) for m in history) == [
        (1, 3.0), (2, 2.5), (3, 1.9), (3, 2.0), (4, 1.5)
    ]  # fmt: skip
    assert runs[0].data.params["optim.lr"] == repr(cfg.optim.lr)
    assert runs[0].data.tags["optim.lr"] == "0.01"
    assert runs[0].info.status == "FINISHED"


def test_a_failed_run_is_marked_failed_and_a_dead_backend_is_dropped(
    data_cfg, synth_data, tmp_path, caplog
):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(data_cfg, synth_data, tmp_path, "run.loggers=[tensorboard,mlflow]", "run.name=f")
    settings = _settings(cfg)  # the default store: sqlite:///<tmp>/runs/mlflow.db
    loggers = open_loggers(settings, config_lib.to_dict(cfg))
    loggers.write({"train/step": 1, "loss/total": 1.0}, 1)
    loggers.close(failed=True)  # what the loop does when a step raises
    client = MlflowClient(tracking_uri=settings["mlflow_tracking_uri"])
    run_id = json.loads((tmp_path / "runs" / "f" / STATE_FILE).read_text())["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"

    loggers = open_loggers(settings, config_lib.to_dict(cfg))  # the restart: the same run
    assert client.get_run(run_id).info.status == "RUNNING"
    client.delete_run(run_id)  # MLflow now refuses writes to it
    loggers.write({"train/step": 2, "loss/total": 0.5}, 2)  # warned, not raised
    assert loggers.names == ["tensorboard"]
    assert "mlflow: writing metrics failed" in caplog.text
    loggers.write({"train/step": 3, "loss/total": 0.4}, 3)
    loggers.close()


def test_unreachable_tracking_server_fails_the_preflight(
    data_cfg, synth_data, tmp_path, monkeypatch
):
    from orchestrator.train.driver import PreflightError, check_loggers

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cfg = _cfg(data_cfg, synth_data, tmp_path, "run.loggers=[mlflow]",
               f"run.mlflow_tracking_uri={uri}")  # fmt: skip
    with pytest.raises(PreflightError, match=f"^run.mlflow_tracking_uri={uri}: "):
        check_loggers(cfg)


# --------------------------------------------------------------------------- W&B


def _wandb_dirs(tmp_path: Path, run_id: str) -> list[Path]:
    """A run's offline directories: ``offline-run-<time>-<id>``, and ``-<id>-1`` when a resume
    starts within the same second (W&B keeps both)."""
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?")
    found = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    return sorted(d for d in found if pattern.fullmatch(d.name))


def _finished_records(path: Path, timeout_s: float = 20.0) -> list[Any]:
    """The records once the ``exit`` record is on disk: W&B's core process writes the file
    itself and may still be flushing it when ``finish()`` has returned [seen once in CI]."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(path) if path.is_file() else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            return records  # the assertions below say what is missing
        time.sleep(0.2)


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of
    chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                         for i in r.history.item})  # fmt: skip
    return rows


def test_wandb_offline_writes_config_and_rows_and_resumes_the_same_id(
    data_cfg, synth_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ["run.loggers=[wandb]", "run.wandb_mode=offline", "run.name=wb",
              "run.wandb_project=tips-test"]  # fmt: skip
    cfg = _cfg(data_cfg, synth_data, tmp_path, *common)
    _write_rows(cfg, ROWS)

    state = json.loads((tmp_path / "runs" / "wb" / STATE_FILE).read_text())
    run_id = state["wandb"]["id"]
    (offline,) = _wandb_dirs(tmp_path, run_id)
    records = _finished_records(offline / f"run-{run_id}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "wb" and run.project == "tips-test" and run.run_group == "tips"
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert config["optim.lr"] == cfg.optim.lr and config["run.name"] == "wb"
    rows = _history(records)
    assert [(row["train/step"], row["loss/total"]) for row in rows] == [(1, 3.0), (2, 2.5),
                                                                        (3, 2.0)]  # fmt: skip
    assert rows[0]["eval/retrieval/i2t@1"] == 0.25
    assert not any("warning" in row for row in rows)
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished

    _write_rows(cfg, [{"train/step": 4, "loss/total": 1.5}])  # a resume: the same W&B run
    dirs = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and dirs == _wandb_dirs(tmp_path, run_id)
    assert json.loads((tmp_path / "runs" / "wb" / STATE_FILE).read_text()) == state


# --------------------------------------------------------------------------- tune


def test_a_tune_trial_is_one_tracker_run_under_the_sweep(data_cfg, synth_data, tmp_path):
    from orchestrator.tune.driver import trial_loggers

    overrides = ["run.loggers=[mlflow,wandb]", "run.mlflow_tracking_uri=http://127.0.0.1:1"]
    cfg = _cfg(data_cfg, synth_data, tmp_path, *overrides)
    trial, incarnation = "abc_00001", "trial-abc_00001-1234abcd"  # a PBT exploit's run
    swept = {"objective.alpha": 0.5}
    settings = trial_loggers(cfg, trial, incarnation, swept, str(tmp_path / "sweeps" / "sw1"))
    assert settings["run_name"] == "trial-abc_00001"  # every incarnation continues it
    assert settings["state_uri"] == f"{tmp_path / 'runs'}/trial-abc_00001/{STATE_FILE}"
    assert settings["experiment"] == "sw1" and settings["wandb_project"] == "sw1"
    assert settings["tags"] == {"sweep": "sw1", "trial_id": trial, "objective.alpha": 0.5}
    named = _cfg(data_cfg, synth_data, tmp_path, *overrides, "run.experiment=mine")
    assert trial_loggers(named, trial, incarnation, swept, "s3://b/sw1")["experiment"] == "mine"


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def ray_train_runtime(s3_endpoint: str):
    yield from ray_runtime()


@pytest.mark.slow
def test_fit_logs_to_tensorboard_and_mlflow(
    mlflow_server, ray_train_runtime, data_cfg, synth_data, tmp_path
):
    from mlflow.tracking import MlflowClient

    from orchestrator.train.driver import absolutize, fit

    cfg = absolutize(_cfg(
        data_cfg, synth_data, tmp_path,
        "train.global_batch_size=8", "train.batch_size_per_worker=8", "train.log_every_steps=1",
        "train.checkpoint_every_steps=3", "train.total_steps=4", "optim.warmup_steps=2",
        "teacher.temp_warmup_steps=2", "scaling.min_workers=0", "scaling.max_workers=0",
        "run.loggers=[tensorboard,mlflow]", f"run.mlflow_tracking_uri={mlflow_server}",
        "run.experiment=fit-test", "run.name=fitted",
    ))  # fmt: skip
    assert fit(cfg).error is None

    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("fit-test").experiment_id])
    assert run.info.run_name == "fitted" and run.info.status == "FINISHED"
    assert run.data.params["train.total_steps"] == "4"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert steps == [1, 2, 3, 4]
    assert run.data.metrics["data/samples_seen"] == 4 * 8
    run_dir = tmp_path / "runs" / "fitted"
    assert json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"] == run.info.run_id
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
