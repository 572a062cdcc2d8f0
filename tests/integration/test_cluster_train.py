"""Training on a real multi-node Ray cluster on this machine (``ray start`` processes).

* ``ray job submit`` of the tiny recipe succeeds;
* losing a worker node mid-run: the run restarts with fewer workers from the last
  checkpoint and finishes with the global batch unchanged;
* draining a node (a spot notice): the workers checkpoint before the node goes, so at most
  the steps since the drain notice are lost, not a checkpoint interval.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.cluster.local import LocalCluster, NodeSpec
from orchestrator.train.metrics import read_history

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from orchestrator.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("cluster_synth")
    write_synthetic(str(root), n=64, seed=5, image_size=48, shard_size=32, n_eval=8)
    return root / "train"


def _train_args(shards: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "recipe=tiny_cpu",
        f"data.train_uri={shards}",
        f"run.storage_uri={runs}",
        f"run.name={name}",
        "augment.global_crop_size=32",
        "augment.local_crop_size=16",
        "augment.num_local_crops=2",
        "train.global_batch_size=8",
        "train.batch_size_per_worker=8",
        "train.log_every_steps=1",
        "train.eval_every_steps=0",
        "data.map_batch_size=8",
        "data.num_cpus_per_map_task=0.5",
        *extra,
    ]


def _env(cluster: LocalCluster) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ADDRESS=cluster.address, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _when_checkpoint(run: Path, step: int, action, done: list[str]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not (run / f"checkpoint_{step:08d}").is_dir():
        time.sleep(0.2)
    action()
    done.append("ok")


def _elastic_cluster(name: str) -> LocalCluster:
    worker = NodeSpec(cpus=1.0, resources={"trainer": 1.0})
    return LocalCluster(name, root=f"/tmp/tipsc-{name}").up(
        head=NodeSpec(cpus=1.0), workers=[worker, worker]
    )


ELASTIC = [
    "scaling.min_workers=1",
    "scaling.max_workers=2",
    "scaling.resources_per_worker={CPU: 0.5, trainer: 1}",
    "run.max_failures=3",
]


def test_node_loss_continues_with_fewer_workers(shards, tmp_path):
    runs = tmp_path / "runs"
    with _elastic_cluster("it-loss") as cluster:
        done: list[str] = []
        kill = threading.Thread(
            target=_when_checkpoint,
            args=(runs / "loss", 8, lambda: cluster.stop_node("worker-2", grace_s=0), done),
            daemon=True,
        )
        kill.start()
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "train",
             *_train_args(shards, runs, "loss", *ELASTIC, "train.total_steps=30",
                          "train.checkpoint_every_steps=4")],
            cwd=ROOT, env=_env(cluster), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        kill.join(timeout=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert done, "worker-2 was never stopped"
    rows = read_history(runs / "loss" / "metrics.jsonl")
    sizes = {int(r["train/step"]): int(r["train/world_size"]) for r in rows}
    assert sizes[1] == 2 and sizes[30] == 1, sizes  # started on 2 workers, finished on 1
    assert sorted(sizes) == list(range(1, 31))  # no step lost from the history
    assert rows[-1]["data/samples_seen"] == 30 * 8  # global batch unchanged across the resize


@pytest.mark.parametrize("restart", ["checkpoint", "deadline"])
def test_drain_makes_workers_checkpoint_before_the_node_goes(shards, tmp_path, restart):
    runs = tmp_path / "runs"
    notice: list[float] = []
    # checkpoint: long enough a notice for a restart on these 2 cores (~20 s measured)
    deadline_s = 45 if restart == "checkpoint" else 15

    def preempt() -> None:
        notice.append(time.time())
        cluster.preempt("worker-2", deadline_s=deadline_s)

    with _elastic_cluster("it-drain") as cluster:
        done: list[str] = []
        drain = threading.Thread(
            target=_when_checkpoint, args=(runs / "drain", 4, preempt, done), daemon=True
        )
        drain.start()
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "train",
             *_train_args(shards, runs, "drain", *ELASTIC, "train.total_steps=60",
                          "train.checkpoint_every_steps=4",
                          "train.preemption_check_every_steps=1",
                          f"train.preemption_restart={restart}",
                          "run.num_checkpoints_to_keep=100")],
            cwd=ROOT, env=_env(cluster), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        drain.join(timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert done
    out = proc.stdout + proc.stderr
    steps = sorted(int(p.name.split("_")[1]) for p in (runs / "drain").glob("checkpoint_0*"))
    # A checkpoint off the every-4 cadence exists: the just-in-time one on the drain notice.
    assert any(s % 4 for s in steps), steps
    assert "node drain detected" in out
    rows = read_history(runs / "drain" / "metrics.jsonl")
    assert rows[-1]["train/step"] == 60 and rows[-1]["data/samples_seen"] == 60 * 8
    resized = [r for r in rows if r["train/world_size"] == 1]
    assert resized, "the run never went on with one worker"
    if restart == "checkpoint":
        # the group restarted on the node that stays as soon as that checkpoint was written:
        # its first step came before the drained node's deadline, no second checkpoint
        assert "restarting without it" in out
        assert resized[0]["time/first_step_unix"] < notice[0] + deadline_s, (resized[0], notice)
        assert "drain deadline near" not in out
    else:
        # Ray's default: trained on, and checkpointed again within train.preemption_margin_s
        # (15 s) of the 15 s deadline (at once here); restarted once the node was gone
        assert "drain deadline near" in out
        assert resized[0]["time/first_step_unix"] > notice[0] + 15, (resized[0], notice)


def test_ray_job_submit_of_the_tiny_recipe(shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    runs = tmp_path / "runs"
    cluster = LocalCluster("it-job", root="/tmp/tipsc-it-job").up(
        head=NodeSpec(cpus=2.0), dashboard=True
    )
    with cluster:
        client = JobSubmissionClient(cluster.dashboard_url)
        args = " ".join(_train_args(shards, runs, "job", "train.total_steps=4",
                                    "train.checkpoint_every_steps=2"))  # fmt: skip
        job = client.submit_job(
            # the cluster's own interpreter (this venv), as an activated environment would give
            entrypoint=f"{sys.executable} -m orchestrator train {args}",
            runtime_env={
                "working_dir": str(ROOT),
                "excludes": ["demo_data", "runs", ".venv", ".git"],
                "env_vars": {"RAY_AUTH_MODE": "disabled"},
            },
        )
        deadline = time.time() + 400
        status = client.get_job_status(job)
        while time.time() < deadline and not status.is_terminal():
            time.sleep(2)
            status = client.get_job_status(job)
        logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert (runs / "job" / "checkpoint_00000004" / "model.pt").is_file()
    assert "final checkpoint" in logs
