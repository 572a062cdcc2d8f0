"""The local multi-node cluster: up/down through the CLI, preemption and returning capacity,
and the tiny recipe on it (data on the data node, a preempted worker node survived).

All tests here start real ``ray start`` nodes (slow, cluster) and stop only their own
processes. Where a task or actor ran is read from each node's own worker logs (Ray writes
``:task_name:`` / ``:actor_name:`` markers there), which needs no dashboard.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator import ray_compat
from orchestrator.cluster.local import LocalCluster, LocalNode, NodeSpec, _names_dir

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
TRAINER = NodeSpec(cpus=1, resources={"trainer_node": 1})


def _ran_on(node: LocalNode) -> collections.Counter:
    """Task and actor names that worker processes of ``node`` ran."""
    names: collections.Counter = collections.Counter()
    for log in Path(node.temp_dir).glob("session_*/logs/worker-*.out"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith((":task_name:", ":actor_name:")):
                names[line.split(":", 2)[2]] += 1
    return names


def _own_processes(root: Path) -> list[int]:
    """Processes whose command line names a directory under this cluster's root."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if _names_dir(_cmdline(pid), str(root))]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_cli_up_places_work_by_custom_resource_and_down_leaves_nothing():
    import ray

    name = f"cli{os.getpid()}"
    cli = [sys.executable, "-m", "orchestrator", "cluster", "local", "--name", name]
    worker = "cpus=1,data_node=1,label.tips.io/node-kind=data"
    try:
        up = subprocess.run(
            [*cli, "up", "--head", "cpus=0", "--worker", worker],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        address = re.search(r"RAY_ADDRESS=(\S+)", up.stdout).group(1)
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, check=True)
        rows = {r["name"]: r for r in map(json.loads, status.stdout.splitlines())}
        assert set(rows) == {"head", "worker-1"} and all(r["alive"] for r in rows.values())
        assert rows["worker-1"]["resources"] == {"data_node": 1.0}
        ray.init(address=address)
        try:

            @ray.remote(num_cpus=0.5, resources={"data_node": 0.01})
            def where() -> str:
                return ray.get_runtime_context().get_node_id()

            assert ray.get(where.remote()) == rows["worker-1"]["node_id"]
            labels = {n["NodeID"]: n["Labels"] for n in ray.nodes()}
            assert labels[rows["worker-1"]["node_id"]]["tips.io/node-kind"] == "data"
        finally:
            ray.shutdown()
        subprocess.run([*cli, "down"], check=True, timeout=120)
        root = Path(f"/tmp/tipsc-{name}")
        assert not (root / "state.json").exists()
        assert _own_processes(root) == []
    finally:
        LocalCluster(name).down()  # no-op when the CLI already took it down
        shutil.rmtree(f"/tmp/tipsc-{name}", ignore_errors=True)


def test_preempt_drains_then_removes_the_node_and_added_capacity_is_usable(local_cluster):
    import ray

    cluster = local_cluster(NodeSpec(cpus=0), [TRAINER])
    first = cluster.node("worker-1")
    ray.init(address=cluster.address)
    try:

        @ray.remote(num_cpus=0, resources={"trainer_node": 1})
        class Busy:  # a running actor: the node must drain, not vanish at once
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        busy = Busy.remote()
        assert ray.get(busy.node.remote()) == first.node_id
        seen: dict[str, int] = {}

        def watch_draining() -> None:
            gcs = ray_compat.gcs_client(cluster.address)
            while not seen and first.name in cluster.node_names():
                seen.update(ray_compat.draining_nodes(gcs))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch_draining)
        watcher.start()
        cluster.preempt("worker-1", deadline_s=6)
        watcher.join(timeout=30)
        assert list(seen) == [first.node_id]  # drained (as PREEMPTION, with a deadline) first
        dead = {n["NodeID"]: n for n in ray.nodes()}[first.node_id]
        assert not dead["Alive"]
        assert cluster.node_names() == ["head"]

        second = cluster.add_worker(TRAINER)
        again = Busy.remote()
        assert ray.get(again.node.remote(), timeout=120) == second.node_id
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------- the tiny recipe

needs_training = pytest.mark.skipif(
    importlib.util.find_spec("orchestrator.data.pipeline") is None,
    reason="needs the data pipeline (tips train on the tiny recipe)",
)


def _has_key(section: str, key: str) -> bool:
    from orchestrator import config

    cls = {"data": config.DataConfig, "scaling": config.ScalingSection}[section]
    return key in {f.name for f in dataclasses.fields(cls)}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    cmd = [sys.executable, "-m", "orchestrator", "data", "synth", "--out", str(out)]
    subprocess.run([*cmd, "--n", "256", "--seed", "0"], check=True, cwd=ROOT, timeout=300)
    return out / "train"


def _train(cluster: LocalCluster, log: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"  # re-decide quickly after a loss
    cmd = [sys.executable, "-m", "orchestrator", "train", "recipe=tiny_cpu"]
    return subprocess.Popen(
        [*cmd, *overrides], cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def _checkpoints(run: Path, by_time: bool = False) -> list[tuple[int, int]]:
    """(step, world size at save) of every checkpoint of a run, by step (or by write time)."""
    out = []
    for state in run.glob("checkpoint_*/train_state.json"):
        try:
            d, mtime = json.loads(state.read_text()), state.stat().st_mtime
        except (OSError, ValueError):  # being written
            continue
        out.append((mtime if by_time else d["step"], d["step"], d["world_size_at_save"]))
    return [(step, ws) for _, step, ws in sorted(out)]


def _wait_for(run: Path, proc: subprocess.Popen, log: Path, ok, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [c for c in _checkpoints(run) if ok(c)]
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(2)
    pytest.fail(f"no checkpoint with {what} within {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


@needs_training
@pytest.mark.skipif(
    not _has_key("data", "resources_per_map_task"),
    reason="needs the proposed config key data.resources_per_map_task",
)
def test_tiny_recipe_runs_data_on_the_data_node_and_training_on_the_trainer_node(
    local_cluster, synth, tmp_path
):
    # The trainer node has a spare CPU, so only the data resource keeps Ray Data off it.
    cluster = local_cluster(
        NodeSpec(cpus=0),
        [
            NodeSpec(cpus=2, resources={"trainer_node": 1}),
            NodeSpec(cpus=1, resources={"data_node": 1}),
        ],
    )
    log = tmp_path / "train.log"
    proc = _train(
        cluster,
        log,
        f"data.train_uri={synth}",
        f"run.storage_uri={tmp_path / 'runs'}",
        "train.total_steps=6",
        "train.checkpoint_every_steps=3",
        "scaling.resources_per_worker={CPU: 1, trainer_node: 1}",
        "data.resources_per_map_task={data_node: 0.01}",
    )
    assert proc.wait(timeout=600) == 0, _tail(log)
    trainer, data = _ran_on(cluster.node("worker-1")), _ran_on(cluster.node("worker-2"))
    data_tasks = {n for n in data if "MapBatches" in n or n.startswith("Read")}
    assert data_tasks, f"no Ray Data task ran on the data node: {data}"
    assert not {n for n in trainer if "MapBatches" in n or n.startswith("Read")}, trainer
    assert trainer["RayTrainWorker"] >= 1 and data["RayTrainWorker"] == 0
    assert _checkpoints(tmp_path / "runs" / "tiny_cpu")[-1] == (6, 1)


@needs_training
def test_preempted_worker_node_is_survived_and_returning_capacity_is_used(
    local_cluster, synth, tmp_path
):
    data = NodeSpec(cpus=1, resources={"data_node": 1})
    cluster = local_cluster(NodeSpec(cpus=0), [TRAINER, TRAINER, data], drain_timeout_s=5)
    log, run = tmp_path / "train.log", tmp_path / "runs" / "tiny_cpu"
    overrides = [
        f"data.train_uri={synth}",
        f"run.storage_uri={tmp_path / 'runs'}",
        "train.total_steps=100000",  # stopped by the test once capacity came back
        "train.checkpoint_every_steps=5",
        "train.log_every_steps=5",
        "train.preemption_check_every_steps=1",
        "run.num_checkpoints_to_keep=1000",
        "scaling.min_workers=1",
        "scaling.max_workers=2",
        "scaling.resources_per_worker={CPU: 1, trainer_node: 1}",
    ]
    if _has_key("scaling", "resize_check_interval_s"):
        overrides.append("scaling.resize_check_interval_s=5")
    proc = _train(cluster, log, *overrides)
    try:
        two = _wait_for(run, proc, log, lambda c: c[1] == 2, 600, "2 workers")
        cluster.preempt("worker-2", deadline_s=10)  # a spot notice, then the node is gone
        one = _wait_for(run, proc, log, lambda c: c[1] == 1 and c[0] > two[0], 600, "1 worker")
        cluster.add_worker(TRAINER)  # capacity returns
        _wait_for(run, proc, log, lambda c: c[1] == 2 and c[0] > one[0], 600, "2 workers again")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "node drain detected" in text  # the preemption path fired, not a plain failure
    steps = [s for s, _ in _checkpoints(run, by_time=True)]
    assert steps == sorted(steps)  # every restart resumed from its latest checkpoint
