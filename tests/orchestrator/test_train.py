"""The training loop end to end on a real local Ray: exact resume, recovery, bad input.

Local-mode runs (``scaling.min_workers=max_workers=0``) execute the real loop, the real
Ray Data pipeline and real checkpoints in this process; the ``slow`` ones start real Ray
Train worker actors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator import config as config_lib
from orchestrator.train.driver import absolutize, fit, metrics_path
from orchestrator.train.metrics import read_history
from tests.orchestrator.conftest import ray_runtime

ROOT = Path(__file__).resolve().parents[2]

BASE = [
    "train.global_batch_size=8",
    "train.batch_size_per_worker=8",
    "train.log_every_steps=1",
    "train.checkpoint_every_steps=3",
    "train.total_steps=6",
    "optim.warmup_steps=2",
    "teacher.temp_warmup_steps=2",
]
LOCAL = ["scaling.min_workers=0", "scaling.max_workers=0"]


@pytest.fixture(scope="module")
def ray_train_runtime(s3_endpoint: str):
    yield from ray_runtime()


def _cfg(data_cfg, synth_data, tmp_path, *overrides):
    return data_cfg(
        str(synth_data / "train"), *BASE, f"run.storage_uri={tmp_path / 'runs'}", *overrides
    )


def _losses(cfg) -> dict[int, float]:
    return {int(r["train/step"]): r["loss/total"] for r in read_history(metrics_path(cfg))}


def test_local_mode_trains_and_checkpoints(ray_train_runtime, data_cfg, synth_data, tmp_path):
    cfg = absolutize(_cfg(data_cfg, synth_data, tmp_path, *LOCAL, "run.name=plain"))
    result = fit(cfg)
    assert result.error is None
    run = tmp_path / "runs" / "plain"
    for step in (3, 6):
        files = {p.name for p in (run / f"checkpoint_{step:08d}").iterdir()}
        assert files == {"model.pt", "optim.pt", "train_state.json", "config.yaml"}
    losses = _losses(cfg)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(v == v and v > 0 for v in losses.values())  # finite, positive
    rows = read_history(metrics_path(cfg))
    assert rows[-1]["data/samples_seen"] == 6 * 8
    assert rows[-1]["data/position"] == 6 * 8  # no bad records in the synthetic set
    assert rows[-1]["data/skipped_corrupt"] == 0
    assert rows[-1]["weight/alpha"] == 1.0 and rows[-1]["weight/beta"] == 2.0


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(
    ray_train_runtime, data_cfg, synth_data, tmp_path
):
    full = absolutize(_cfg(data_cfg, synth_data, tmp_path, *LOCAL, "run.name=full"))
    assert fit(full).error is None
    ckpt = tmp_path / "runs" / "full" / "checkpoint_00000003"
    resumed = absolutize(
        _cfg(data_cfg, synth_data, tmp_path, *LOCAL, "run.name=resumed", f"run.resume_from={ckpt}")
    )
    assert fit(resumed).error is None
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [4, 5, 6]  # it started at the checkpoint's step
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a, b)


def test_checkpoints_and_resume_through_s3(
    ray_train_runtime, data_cfg, synth_data, tmp_path, s3_bucket
):
    cfg = absolutize(
        data_cfg(
            str(synth_data / "train"),
            *BASE,
            *LOCAL,
            "train.total_steps=3",
            f"run.storage_uri={s3_bucket}/runs",
            "run.name=s3run",
        )
    )
    assert fit(cfg).error is None
    from orchestrator import storage
    from orchestrator.train.state import latest_train_state

    uri = f"{s3_bucket}/runs/s3run/checkpoint_00000003"
    assert storage.exists(f"{uri}/model.pt") and storage.exists(f"{uri}/train_state.json")
    state = latest_train_state(uri, is_checkpoint=True)
    assert state.step == 3 and state.data_position == 24
    again = config_lib.with_overrides(
        cfg, {"run.resume_from": uri, "run.name": "s3run2", "train.total_steps": 4}
    )
    assert fit(again).error is None
    assert storage.exists(f"{s3_bucket}/runs/s3run2/checkpoint_00000004/model.pt")


def test_bad_recipe_is_refused_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  total_stepz: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", f"recipe={bad}", "data.train_uri=/x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bad.yaml: key 'train.total_stepz'" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_dry_run_prints_the_resolved_config():
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "recipe=tiny_cpu",
         "data.train_uri=/data/x", "objective.beta=0.5", "--dry-run"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "beta: 0.5" in proc.stdout and "train_uri: /data/x" in proc.stdout


def _kill_worker_after(run_dir: Path, step: int, killed: list[int]) -> None:
    """Kill the Ray Train worker process once checkpoint ``step`` is in storage."""
    import psutil

    deadline = time.time() + 240
    target = run_dir / f"checkpoint_{step:08d}"
    while time.time() < deadline and not target.exists():
        time.sleep(0.2)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd and proc.info["pid"] != os.getpid():
            os.kill(proc.info["pid"], signal.SIGKILL)
            killed.append(proc.info["pid"])
            return


@pytest.mark.slow
def test_worker_killed_mid_run_restarts_from_last_checkpoint(
    ray_train_runtime, data_cfg, synth_data, tmp_path
):
    cfg = absolutize(
        _cfg(
            data_cfg, synth_data, tmp_path,
            "run.name=killed", "train.total_steps=12", "train.checkpoint_every_steps=3",
            "scaling.min_workers=1", "scaling.max_workers=1", "run.max_failures=2",
        )
    )  # fmt: skip
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_worker_after, args=(tmp_path / "runs" / "killed", 3, killed), daemon=True
    )
    killer.start()
    result = fit(cfg)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert result.error is None
    assert result.metrics["train/step"] == 12
    assert (tmp_path / "runs" / "killed" / "checkpoint_00000012" / "model.pt").is_file()
    # Every step was reported, and the final samples count is exactly steps x global batch.
    assert sorted(_losses(cfg)) == list(range(1, 13))
    assert result.metrics["data/samples_seen"] == 12 * 8


@pytest.mark.slow
def test_rerun_with_same_name_resumes_automatically(
    ray_train_runtime, data_cfg, synth_data, tmp_path
):
    common = ["run.name=auto", "scaling.min_workers=1", "scaling.max_workers=1"]
    first = absolutize(_cfg(data_cfg, synth_data, tmp_path, *common, "train.total_steps=3"))
    assert fit(first).error is None
    second = absolutize(_cfg(data_cfg, synth_data, tmp_path, *common, "train.total_steps=5"))
    result = fit(second)
    assert result.error is None and result.metrics["train/step"] == 5
    # The second run resumed at step 3: its data stream started at position 24.
    assert result.metrics["data/position"] == 5 * 8
    raw = Path(metrics_path(second)).read_text().splitlines()
    assert len(raw) == 5  # steps 1-3 from the first run, 4-5 from the second: none repeated


@pytest.mark.slow
def test_two_cpu_workers_with_ddp(ray_train_runtime, data_cfg, synth_data, tmp_path):
    cfg = absolutize(
        _cfg(
            data_cfg, synth_data, tmp_path,
            "run.name=ddp", "scaling.min_workers=2", "scaling.max_workers=2",
            "scaling.resources_per_worker.CPU=0.5", "data.num_cpus_per_map_task=0.5",
        )
    )  # fmt: skip
    result = fit(cfg)
    assert result.error is None
    assert result.metrics["train/world_size"] == 2
    assert result.metrics["data/samples_seen"] == 6 * 8


@pytest.mark.slow
def test_fsdp_on_two_workers_checkpoint_resumes_on_one(
    ray_train_runtime, data_cfg, synth_data, tmp_path
):
    import torch

    from tips_model.checkpoints import load_state_dict

    two = absolutize(
        _cfg(
            data_cfg, synth_data, tmp_path,
            "run.name=fsdp", "scaling.strategy=fsdp", "optim.name=adafactor",
            "scaling.min_workers=2", "scaling.max_workers=2",
            "scaling.resources_per_worker={CPU: 0.5}", "data.num_cpus_per_map_task=0.5",
        )
    )  # fmt: skip
    result = fit(two)
    assert result.error is None
    assert result.metrics["train/world_size"] == 2 and result.metrics["train/step"] == 6
    # the periodic evaluation at the last step ran, on both ranks, with sharded towers
    assert any(k.startswith("eval/") for k in result.metrics)
    ckpt = tmp_path / "runs" / "fsdp" / "checkpoint_00000003"
    plan = json.loads((ckpt / "train_state.json").read_text())["plan"]
    assert plan["strategy"] == "fsdp" and plan["world_size"] == 2
    saved = load_state_dict(ckpt / "model.pt")
    # 1. the checkpoint is unsharded: the keys and shapes of a fresh objective's state_dict
    from tips_model.objectives import build_objective
    from tips_model.tokenizer import build_tokenizer

    tok = build_tokenizer(two.model.tokenizer, max_len=two.model.max_text_len)
    fresh = build_objective(two.objective, two.model, tok.vocab_size).state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in fresh.items()}
    # 2. one worker resumes it: lr 1e-30 (0 is refused) and EMA momentum 1 keep the loaded
    # weights through a step (a real step at lr 1e-3 moves them by ~1e-3)
    one = absolutize(
        _cfg(
            data_cfg, synth_data, tmp_path,
            "run.name=fsdp_resumed", "scaling.strategy=fsdp", "optim.name=adafactor",
            "scaling.min_workers=1", "scaling.max_workers=1", f"run.resume_from={ckpt}",
            "train.total_steps=4", "optim.lr=1e-30", "optim.final_lr=0",
            "teacher.momentum_start=1.0", "teacher.momentum_end=1.0",
        )
    )  # fmt: skip
    result = fit(one)
    assert result.error is None
    assert sorted(_losses(one)) == [4]  # it continued at the checkpoint's step
    assert result.metrics["train/world_size"] == 1
    after = tmp_path / "runs" / "fsdp_resumed" / "checkpoint_00000004"
    weights = load_state_dict(after / "model.pt")
    params = [k for k in saved if k.startswith(("student.", "teacher."))]
    assert params
    for k in params:
        torch.testing.assert_close(weights[k], saved[k], rtol=0, atol=1e-25, msg=k)
    # the optimizer state came along: every step counter went on from 3, not from 0
    steps = {float(s["step"]) for s in load_state_dict(after / "optim.pt")["state"].values()}
    assert steps == {4.0}
    plan = json.loads((after / "train_state.json").read_text())["plan"]
    assert plan["strategy"] == "none" and plan["world_size"] == 1  # FSDP over 1 worker: no-op


@pytest.mark.slow
def test_nan_limit_stops_once_without_retries_and_names_the_cause(
    ray_train_runtime, data_cfg, synth_data, tmp_path
):
    """A temperature that underflows makes every loss non-finite: the limit is reached on
    every attempt alike, so the workers stop without raising (run.max_failures untouched)
    and the driver reads why, once."""
    from orchestrator.train.driver import fatal_error

    cfg = absolutize(
        _cfg(
            data_cfg, synth_data, tmp_path, *LOCAL, "run.name=nan", "run.max_failures=3",
            "model.temperature_init=1e-45", "train.max_nonfinite_steps=2",
        )
    )  # fmt: skip
    result = fit(cfg)
    assert result.error is None  # Ray saw no failure, so it retried nothing
    message = fatal_error(cfg)
    assert message.startswith("NonFiniteLossError: 2 steps in a row had a non-finite loss")
    assert "train.max_nonfinite_steps=2" in message and "\n" not in message
    assert fatal_error(cfg) is None  # read once: a rerun after the fix starts clean


def _half_bad_set(root: Path, n: int, bad_every: int) -> str:
    """``n`` synthetic records; of every ``bad_every`` in a row, one has a corrupt image and
    one no text (bad_every=4: 25 % + 25 %, as in issue 17; 1: all bad)."""
    from orchestrator.data.shards import ShardWriter
    from orchestrator.data.synthetic import make_record

    uri = str(root / "half_bad")
    with ShardWriter(uri, shard_size=64) as w:
        for i in range(n):
            r = make_record(5, "train", i, image_size=48)
            if i % bad_every == 0:
                r["image"] = r["image"][:100]  # truncated
            if bad_every == 1 or i % bad_every == 1:
                r.update(alt_text="", captions=[])
            w.write(r)
    return uri


@pytest.mark.slow
def test_half_the_records_bad_still_trains_every_step(
    ray_train_runtime, data_cfg, tmp_path, capsys
):
    uri = _half_bad_set(tmp_path, 128, bad_every=4)
    cfg = absolutize(
        data_cfg(
            uri, *BASE, *LOCAL, f"run.storage_uri={tmp_path / 'runs'}", "run.name=bad",
            "train.total_steps=20", "train.checkpoint_every_steps=20",
        )
    )  # fmt: skip
    result = fit(cfg)
    assert result.error is None
    rows = read_history(metrics_path(cfg))
    assert rows[-1]["train/step"] == 20  # 20 x 8 = 160 samples from 64 usable records
    assert rows[-1]["data/skipped_corrupt"] > 0 and rows[-1]["data/skipped_no_caption"] > 0


def test_no_usable_record_is_refused_before_ray_starts_with_the_counts(data_cfg, tmp_path):
    from orchestrator.train.driver import PreflightError, preflight

    uri = _half_bad_set(tmp_path, 32, bad_every=1)
    cfg = absolutize(data_cfg(uri, *BASE, f"run.storage_uri={tmp_path / 'runs'}"))
    with pytest.raises(PreflightError) as info:
        preflight(cfg)
    assert str(info.value) == (
        f"data.train_uri={uri}: no usable record (skipped: no_caption 32)"
    )  # no record has text, so no image is decoded
