"""An interrupted `tips tune` sweep resumes and finishes without rerunning finished trials.

Runs the real command in subprocesses (each starts its own local Ray with the dashboard):
the first is interrupted with SIGINT (Ctrl-C) once a trial has finished, the second
continues it with ``resume=true``. Kept apart from test_tune.py so that no in-process Ray
competes with the subprocesses for the two cores.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.tune.driver import INCARNATIONS_FILE
from tests.orchestrator.test_tune import sweep_file

ROOT = Path(__file__).resolve().parents[2]
STEPS = "train.total_steps=20"


def _finished_trials(sweep_dir: Path) -> list[str]:
    """Trials that Tune's saved experiment state marks TERMINATED (what a resume reads)."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):  # caught mid-write
        return []
    done = []
    for entry in trials:
        trial = json.loads(entry[0])
        if trial.get("status") == "TERMINATED":
            done.append(f"trial-{trial['trial_id']}")
    return done


def _tune(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "tune", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(synth_data, tmp_path):
    sweep = sweep_file(
        tmp_path,
        synth_data,
        """
name: resume
metric: loss/total
mode: min
space:
  optim.lr: {grid: [1.0e-3, 2.0e-3, 3.0e-3]}
scheduler: {name: fifo}
max_concurrent_trials: 1
""",
    )
    storage = tmp_path / "sweeps"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TIPS_TUNE_VERBOSE": "0"}
    env.pop("RAY_ADDRESS", None)
    sweep_dir = storage / "resume"

    # 1. start the sweep; interrupt it (Ctrl-C) once the first trial has finished
    first = _tune([f"sweep={sweep}", STEPS], env)
    deadline = time.monotonic() + 400
    while not _finished_trials(sweep_dir) and first.poll() is None:
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(1.0)
    finished = _finished_trials(sweep_dir)
    assert finished and first.poll() is None, first.communicate()[0][-3000:]
    os.killpg(first.pid, signal.SIGINT)
    try:
        out, _ = first.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        out, _ = first.communicate()
        pytest.fail(f"the interrupted sweep did not stop: {out[-3000:]}")
    assert first.returncode == 130, out[-3000:]  # interrupted: partial tables, a hint
    assert "resume=true" in out and "unfinished" in out

    # 2. the same command again is refused: it would start the sweep over
    again = _tune([f"sweep={sweep}", STEPS], env)
    out_again, _ = again.communicate(timeout=300)
    assert again.returncode == 2 and "resume=true" in out_again, out_again[-2000:]

    # 3. resume=true finishes the rest
    resumed = _tune([f"sweep={sweep}", STEPS, "resume=true"], env)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["optim.lr"] for r in rows} == {"0.001", "0.002", "0.003"}
    assert all(int(r["steps"]) == 20 for r in rows), rows
    starts = {
        p.parent.name: len(p.read_text().splitlines())
        for p in sweep_dir.glob(f"trial-*/{INCARNATIONS_FILE}")
    }
    assert len(starts) == 3
    for name in finished:
        assert starts[name] == 1, f"{name} finished before the interruption but ran again"
