"""A plain (non-editable) install runs: the wheel carries the recipes, and `tips` run from the
installed package, in a folder without the source tree, finds them by name and trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel, built and installed into a folder of its own (its dependencies
    come from this environment)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out / "dist"), str(ROOT)],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (out / "dist").glob("tips_orchestrator-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "orchestrator/recipes/tiny_cpu.yaml" in names
    assert "orchestrator/recipes/sweeps/loss_weights.yaml" in names
    target = out / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    return target


def _tips(site: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_the_installed_package_finds_its_recipes_and_trains(installed, tmp_path, synth_data):
    where = _tips(installed, tmp_path, "recipes", "--paths")
    assert where.returncode == 0, where.stderr
    assert str(installed / "orchestrator" / "recipes" / "tiny_cpu.yaml") in where.stdout
    assert str(ROOT) not in where.stdout  # not the source tree's copies
    train = [
        "train",
        "recipe=tiny_cpu",
        f"data.train_uri={synth_data / 'train'}",
        f"run.storage_uri={tmp_path / 'runs'}",
        "run.name=wheel",
        "train.total_steps=4",
        "train.log_every_steps=2",
        "train.checkpoint_every_steps=4",
        "train.eval_every_steps=0",
        "scaling.min_workers=0",  # Ray Train local mode: the loop runs in this process
        "scaling.max_workers=0",
    ]
    dry = _tips(installed, tmp_path, *train, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "total_steps: 4" in dry.stdout
    run = _tips(installed, tmp_path, *train)
    assert run.returncode == 0, run.stderr[-3000:]
    final = tmp_path / "runs/wheel/checkpoint_00000004"
    assert f"tips train: final checkpoint: {final}" in run.stdout  # the kept copy
    rows = [json.loads(x) for x in (tmp_path / "runs/wheel/metrics.jsonl").read_text().splitlines()]
    assert [r["train/step"] for r in rows] == [2, 4]
    assert (tmp_path / "runs/wheel/checkpoint_00000004/model.pt").is_file()
