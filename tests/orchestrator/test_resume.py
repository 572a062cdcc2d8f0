"""Resume picks the newest complete and loadable checkpoint on storage, falls back past a
corrupt one naming the file, keeps one metrics row per step, and refuses a resume that
cannot work before Ray starts (issue 17). Real files, the moto S3 server; no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator import config as config_lib
from orchestrator import storage as st
from orchestrator.recipes import RECIPES_DIR
from orchestrator.train import state as ckpt
from orchestrator.train.driver import PreflightError, preflight, required_keys
from orchestrator.train.metrics import MetricsHistory, read_history
from orchestrator.train.state import (
    CheckpointError,
    TrainState,
    persist_checkpoint,
    restore_checkpoint_dir,
    write_checkpoint_dir,
)
from tips_model.objectives import build_objective
from tips_model.tokenizer import build_tokenizer

TINY = RECIPES_DIR / "tiny_cpu.yaml"


def _cfg(tmp_path: Path, *overrides: str):
    return config_lib.load(
        TINY,
        [
            "data.train_uri=/unused",
            f"run.storage_uri={tmp_path / 'runs'}",
            "run.name=r",
            *overrides,
        ],
    )


def _objective(cfg):
    tok = build_tokenizer(cfg.model.tokenizer, max_len=cfg.model.max_text_len)
    torch.manual_seed(0)
    return build_objective(cfg.objective, cfg.model, tok.vocab_size)


def _write_run(cfg, run_uri: str, steps: tuple[int, ...]) -> None:
    """Complete checkpoints of a (random-init) tiny objective at ``steps``."""
    objective = _objective(cfg)
    optim = torch.optim.AdamW(objective.parameters())
    for step in steps:
        state = TrainState(step=step, samples_seen=32 * step, data_position=32 * step)
        d = write_checkpoint_dir(
            objective.state_dict(), optim.state_dict(), state, config_lib.to_yaml(cfg)
        )
        persist_checkpoint(d, run_uri)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_newest_loadable_checkpoint_without_any_ray_snapshot(where, tmp_path, s3_bucket):
    cfg = _cfg(tmp_path)
    run = str(tmp_path / "run") if where == "local" else f"{s3_bucket}/runs/run"
    assert ckpt.newest_checkpoint(run) is None and ckpt.latest_train_state(run) is None
    _write_run(cfg, run, (20, 40, 60))
    assert ckpt.newest_checkpoint(run).endswith("checkpoint_00000060")
    assert ckpt.latest_train_state(run).samples_seen == 60 * 32
    direct = ckpt.latest_train_state(st.join_uri(run, "checkpoint_00000020"), is_checkpoint=True)
    assert direct.step == 20


@pytest.mark.parametrize(
    "damage, named",
    [
        ("truncate model.pt", "model.pt: not a whole torch file"),
        ("truncate optim.pt", "optim.pt: not a whole torch file"),
        ("bad train_state.json", "train_state.json: not a valid train state"),
        ("remove config.yaml", "config.yaml: missing"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(damage, named, tmp_path, caplog):
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    _write_run(cfg, str(run), (20, 40))
    newest = run / "checkpoint_00000040"
    verb, name = damage.split(" ")[0], damage.split(" ")[-1]
    if verb == "truncate":
        _truncate(newest / name)
    elif verb == "bad":
        (newest / name).write_text('{"step": 40, "samples_seen" 1}')
    else:
        (newest / name).unlink()
    with caplog.at_level("WARNING", logger="orchestrator.storage"):
        chosen = ckpt.newest_checkpoint(str(run))
    assert chosen.endswith("checkpoint_00000020")
    assert any(named in r.getMessage() and "checkpoint_00000040" in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip
    # the worker's restore of the chosen one works
    restore_checkpoint_dir(chosen, _objective(cfg), None)


def test_preflight_refuses_a_resume_that_cannot_work(tmp_path, synth_data):
    data = f"data.train_uri={synth_data / 'train'}"
    cfg = _cfg(tmp_path, data, f"run.resume_from={tmp_path / 'nowhere'}")
    with pytest.raises(PreflightError, match=r"run.resume_from=.*nowhere: no checkpoint there"):
        preflight(cfg)
    # a changed model under the same run.name: one line naming the setting and a tensor
    cfg = _cfg(tmp_path, data)
    _write_run(cfg, f"{tmp_path}/runs/r", (10,))
    other = _cfg(tmp_path, data, "objective.head_out_dim=128")
    with pytest.raises(PreflightError) as info:
        preflight(other)
    msg = str(info.value)
    assert "objective.head_out_dim 256 -> 128" in msg and "new run.name" in msg
    assert "\n" not in msg
    # settings that keep the shapes may change between attempts
    assert preflight(_cfg(tmp_path, data, "optim.lr=0.01", "objective.alpha=2.0")).endswith(
        "checkpoint_00000010"
    )


def test_preflight_refuses_caption_kinds_the_shards_do_not_have(tmp_path, synth_data):
    data = f"data.train_uri={synth_data / 'train'}"
    cfg = _cfg(tmp_path, data, "data.caption_ratios={short: 0.5, shrot: 0.5}")
    with pytest.raises(PreflightError) as info:
        preflight(cfg)
    msg = str(info.value)
    assert "caption kind(s) ['shrot']" in msg and "(records per kind: long 96, short 96)" in msg
    assert "\n" not in msg
    assert preflight(_cfg(tmp_path, data, "data.caption_ratios={long: 1.0}")) is None
    # an objective that reads no synthetic caption (MUG on alt-text) is not held to it
    mug = config_lib.load(
        RECIPES_DIR / "mug_tiny.yaml",
        [data, f"run.storage_uri={tmp_path}/runs", "data.caption_ratios={shrot: 1.0}"],
    )
    assert "syn_ids" not in required_keys(mug) and preflight(mug) is None


def test_restore_into_another_model_names_the_mismatch_in_one_line(tmp_path):
    cfg = _cfg(tmp_path)
    _write_run(cfg, str(tmp_path / "run"), (10,))
    other = _objective(_cfg(tmp_path, "objective.head_out_dim=128"))
    with pytest.raises(CheckpointError) as info:
        restore_checkpoint_dir(tmp_path / "run" / "checkpoint_00000010", other, None)
    msg = str(info.value)
    assert "tensors of another shape" in msg and "[256" in msg and "\n" not in msg


def test_metrics_history_keeps_one_row_per_step_across_a_resume(tmp_path):
    h = MetricsHistory(str(tmp_path / "metrics.jsonl"))
    for step in (10, 20, 30):
        h.write({"train/step": step, "loss/total": float(step)})
    h.drop_after(20)  # resumed from the checkpoint at step 20
    h.write({"train/step": 30, "loss/total": 3.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["train/step"] for x in lines] == [10, 20, 30]
    assert read_history(tmp_path / "metrics.jsonl")[-1]["loss/total"] == 3.0


def _tips_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", f"recipe={TINY}", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr  # a run error, found before Ray starts
    lines = [x for x in proc.stderr.splitlines() if x.startswith("tips train:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "raylet" not in proc.stderr.lower()
    return lines[0]


def test_tips_train_refuses_a_missing_resume_from_in_one_line(tmp_path, synth_data):
    proc = _tips_train(
        f"data.train_uri={synth_data / 'train'}",
        f"run.storage_uri={tmp_path / 'runs'}",
        f"run.resume_from={tmp_path / 'nowhere'}",
    )
    assert "no checkpoint there" in _one_line(proc)


@pytest.mark.parametrize("data", ["empty", "missing", "not shards"])
def test_tips_train_refuses_data_it_cannot_list_in_one_line(data, tmp_path):
    uri = tmp_path / "data"
    if data == "empty":
        uri.mkdir()
    elif data == "not shards":
        uri.mkdir()
        (uri / "part-0.parquet").write_bytes(b"not parquet at all")
    line = _one_line(_tips_train(f"data.train_uri={uri}", f"run.storage_uri={tmp_path}"))
    assert line.startswith(f"tips train: failed: data.train_uri={uri}"), line


def test_tips_train_refuses_a_missing_bucket_in_one_line(tmp_path, s3_bucket):
    line = _one_line(
        _tips_train(f"data.train_uri={s3_bucket}-gone/shards", f"run.storage_uri={tmp_path}")
    )
    assert f"{s3_bucket}-gone" in line


def test_checkpoint_from_uri_points_at_the_directory(tmp_path):
    cfg = _cfg(tmp_path)
    _write_run(cfg, str(tmp_path / "run"), (20,))
    ckpt = st.checkpoint_from_uri(st.join_uri(str(tmp_path / "run"), "checkpoint_00000020"))
    assert ckpt.path.endswith("checkpoint_00000020")


def test_printed_checkpoint_uris_can_be_pasted_into_tips_eval(tmp_path):
    from orchestrator.cli.train import pasteable_uri

    s3 = _cfg(tmp_path, "run.storage_uri=s3://bucket/runs")
    assert pasteable_uri("bucket/runs/r/checkpoint_00000010", s3) == (
        "s3://bucket/runs/r/checkpoint_00000010"
    )
    local = _cfg(tmp_path)
    assert pasteable_uri("/abs/runs/r/checkpoint_00000010", local).startswith("/abs/")


@pytest.mark.slow
def test_ctrl_c_keeps_the_checkpoints_and_the_same_command_resumes(tmp_path, synth_data):
    """SIGINT to `tips train`: exit 130 with one line naming the newest checkpoint; running
    the same command again resumes from it (not from Ray's snapshot, not from step 0)."""
    import signal
    import time

    args = [
        sys.executable, "-m", "orchestrator", "train", f"recipe={TINY}",
        f"data.train_uri={synth_data / 'train'}", f"run.storage_uri={tmp_path / 'runs'}",
        "run.name=ctrlc", "train.checkpoint_every_steps=10", "train.eval_every_steps=0",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    first = subprocess.Popen(
        [*args, "train.total_steps=2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    run = tmp_path / "runs" / "ctrlc"
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoint_00000020").exists():
        time.sleep(0.2)
    assert (run / "checkpoint_00000020").exists(), "no checkpoint within 240 s"
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("tips train:")]
    assert len(line) == 1 and "interrupted (newest checkpoint" in line[0], err[-2000:]
    newest = ckpt.newest_checkpoint(str(run))
    assert newest in line[0]
    step = int(newest.rsplit("_", 1)[1])
    again = subprocess.run(
        [*args, f"train.total_steps={step + 10}"], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed at step {step}" in again.stdout + again.stderr
    steps = [json.loads(x)["train/step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == step + 10
