"""Elastic recovery: seconds from losing a node to the next completed training step, and
where they go.

    .venv/bin/python benchmarks/elastic_recovery.py [--cases kill,preempt,return]
        [--steps 400] [--timeout-s N]

On a 3-node Ray cluster on this machine (``orchestrator.cluster.local``: a head with one
CPU and two worker nodes with one CPU and one ``trainer`` resource each), the tiny recipe
trains elastically on 1..2 workers (``tips train`` in a subprocess, as ``ray job submit``
would run it) and, once step ``--at-step`` is checkpointed, one of three things happens
to worker-2:

* ``kill``     the node dies without notice (``ray stop``-like SIGKILL of its processes);
* ``preempt``  a spot notice: the node is drained as PREEMPTION with a 30 s deadline; the
               workers write a checkpoint at once and, with ``train.preemption_restart=
               checkpoint`` (the default), the controller restarts the group at once on the
               node that stays (orchestrator/train/preemption.py); the drained node, idle,
               leaves before its deadline;
* ``preempt-deadline``  the same notice with ``train.preemption_restart=deadline`` (Ray's
               own behaviour): the workers train on, checkpoint again
               ``train.preemption_margin_s`` (5 s here) before the deadline, when the node's
               processes are killed, and Ray restarts the group once it is gone;
* ``return``   after a ``kill``, a new worker node joins later: seconds from the node's
               arrival to the first step trained on 2 workers again.

First table: seconds of notice, seconds from the node being gone (a kill) or from the
drain deadline (a preemption; negative: the resized group was training before the deadline)
to the first step completed by the resized group (rank 0's ``metrics.jsonl``), the same
from the notice, steps redone (trained by the old group and again by the new one), and
the world size before and after. Second table: those seconds by phase (``PHASES``), read
from the cluster's session logs: the GCS declaring the node dead (polled here), the Train
controller's restart decision and worker-group start-up (its JSON log on the head), the
worker's launch and restore (the workers' Train logs), the first block Ray Data handed out
(its log) and rank 0's first step. ``--timeout-s`` sets
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (else the driver sets it from
``scaling.worker_group_start_timeout_s``; ``--timeout-s 30`` on a checkout before the
recovery fixes gives the old numbers). Targets (issue 21, item 4): kill -> next step
<= 30 s, drain deadline -> next step <= 15 s. Not a test: it takes several minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from orchestrator import ray_compat  # noqa: E402
from orchestrator.cluster.local import LocalCluster, NodeSpec  # noqa: E402

WORKER = NodeSpec(cpus=1.0, resources={"trainer": 1.0})
DEADLINE_S = 30  # the drain deadline of the preempt case


def _history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# per case: the run's extra overrides, and the node's fate
CASES = {
    "kill": [],
    "preempt": ["train.preemption_restart=checkpoint"],
    "preempt-deadline": ["train.preemption_restart=deadline"],
    "return": [],
}


def _train_cmd(shards: Path, runs: Path, name: str, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "orchestrator", "train",
        "recipe=tiny_cpu",
        f"data.train_uri={shards}", f"run.storage_uri={runs}", f"run.name={name}",
        "augment.num_local_crops=2", "train.global_batch_size=8",
        "train.batch_size_per_worker=8", "train.log_every_steps=1",
        "train.eval_every_steps=0", f"train.total_steps={steps}",
        "train.checkpoint_every_steps=50", "train.preemption_check_every_steps=1",
        "train.preemption_margin_s=5",
        "run.num_checkpoints_to_keep=100", "run.max_failures=5", "run.tensorboard=false",
        "data.map_batch_size=8", "data.num_cpus_per_map_task=0.25",
        "scaling.min_workers=1", "scaling.max_workers=2",
        "scaling.resources_per_worker={CPU: 0.5, trainer: 1}",
        "scaling.resize_check_interval_s=10",
        *CASES[name],
    ]  # fmt: skip


def _json_log(paths: list[Path]) -> list[tuple[float, str]]:
    """(unix time, message) of every record in Ray Train's JSON session logs, in order."""
    out = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.append((rec["timestamp_ns"] / 1e9, rec["message"]))
    return sorted(out)


def _text_log(paths: list[Path], pattern: str) -> list[float]:
    """Unix times of the lines of Ray Data's text logs that contain ``pattern``."""
    out = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if pattern in line:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                out.append(stamp.replace(tzinfo=datetime.UTC).timestamp())
    return sorted(out)


def _first(log: list[tuple[float, str]], text: str, after: float) -> float | None:
    return next((t for t, m in log if t > after and text in m), None)


# Where a recovery's seconds go: (label, start mark, end mark); the marks come from
# ``_marks``. The phases run one after the other except ``GCS marks the node dead``, which
# runs beside the controller's own detection (a failed collective or health check).
PHASES = [
    ("GCS marks the node dead", "gone", "dead"),
    ("controller decides to restart", "gone", "restart"),
    ("old group down + tries at a size that does not fit", "restart", "attempt"),
    ("worker actors start", "attempt", "actors"),
    ("dataset factory + split", "actors", "datasets"),
    ("process group", "datasets", "context"),
    ("train function launched", "context", "launched"),
    ("model build + checkpoint restore", "launched", "restored"),
    ("first batch (Ray Data start-up)", "restored", "first_block"),
    ("first step", "first_block", "first_step"),
]


def _marks(root: Path, events: dict[str, float], first_after: dict, ws_after: int) -> dict:
    """Time stamps of one recovery, from the cluster's session logs (the controller's on
    the head, the workers' and Ray Data's) and rank 0's metrics."""
    logs = lambda pattern: sorted(root.glob(f"*/session_latest/logs/{pattern}"))  # noqa: E731
    ctl = _json_log(logs("train/ray-train-sys-controller-*.log"))
    wrk = _json_log(logs("train/ray-train-*-worker-*.log"))
    t0 = events["event"]
    marks = {"gone": events["gone"], "dead": events.get("dead")}
    marks["restart"] = _first(ctl, "[FailurePolicy] RETRY", t0)
    attempt = f"Attempting to start training worker group of size {ws_after} "
    end = first_after["time/first_step_unix"]
    tries = [t for t, m in ctl if t0 < t < end and "Attempting to start training" in m]
    marks["attempt"] = max((t for t, m in ctl if t0 < t < end and attempt in m), default=None)
    marks["tries"] = len(tries)
    after = marks["attempt"] or t0
    marks["actors"] = _first(ctl, "worker actors created in", after)
    marks["datasets"] = _first(ctl, "before_init_train_context callbacks completed", after)
    marks["context"] = _first(ctl, "Train context initialized on workers", after)
    marks["launched"] = _first(wrk, "Rank 0: Launching training function", after)
    marks["restored"] = _first(wrk, "resumed at step", after)
    # the block that completed the first batch: the last one handed out before the step
    blocks = _text_log(logs("ray-data/ray-data-train_*.log"), "returned block")
    marks["first_block"] = max((t for t in blocks if after < t < end), default=None)
    marks["first_step"] = end
    return marks


def _watch_death(address: str, node_id: str, events: dict[str, float]) -> None:
    """Record when the GCS first reports ``node_id`` dead (polled every 0.2 s)."""
    gcs = ray_compat.gcs_client(address)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            nodes = ray_compat.gcs_nodes(gcs, timeout_s=5)
        except Exception:  # noqa: BLE001 (a slow GCS answer: ask again)
            nodes = []
        if any(n.node_id == node_id and not n.alive for n in nodes):
            events["dead"] = time.time()
            return
        time.sleep(0.2)


def _wait_for(pred, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not pred():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def run_case(case: str, shards: Path, at_step: int, steps: int, timeout_s: int | None) -> dict:
    runs = Path(tempfile.mkdtemp(prefix=f"tips-elastic-{case}-"))
    run = runs / case
    name = f"bench-{case}"
    with LocalCluster(name, root=f"/tmp/tipsc-{name}").up(
        head=NodeSpec(cpus=1.0), workers=[WORKER, WORKER]
    ) as cluster:
        env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONUNBUFFERED="1")
        if timeout_s is not None:
            env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(timeout_s)
        events: dict[str, float] = {}

        def act() -> None:
            _wait_for(lambda: (run / f"checkpoint_{at_step:08d}").is_dir(), 600, "checkpoint")
            events["event"] = time.time()
            node_id = cluster.node("worker-2").node_id
            threading.Thread(
                target=_watch_death, args=(cluster.address, node_id, events), daemon=True
            ).start()
            if case.startswith("preempt"):
                events["deadline"] = events["event"] + DEADLINE_S
                cluster.preempt("worker-2", deadline_s=DEADLINE_S)  # returns once it is gone
            else:
                cluster.stop_node("worker-2", grace_s=0)
            events["gone"] = time.time()
            if case == "return":
                _wait_for(
                    lambda: any(
                        r["time/unix"] > events["event"] and r["train/world_size"] == 1
                        for r in _history(run)
                    ),
                    600,
                    "training on 1 worker",
                )
                time.sleep(5)
                events["return"] = time.time()
                cluster.add_worker(WORKER)

        thread = threading.Thread(target=act, daemon=True)
        thread.start()
        proc = subprocess.run(
            _train_cmd(shards, runs, case, steps),
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        thread.join(timeout=30)
    (runs / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}: training failed:\n{proc.stderr[-3000:]}")
    rows = _history(run)
    t_event = events["event"]
    ws_before = int([r for r in rows if r["time/unix"] <= t_event][-1]["train/world_size"])
    # the old group may finish a few steps after the event (a drain's deadline, a collective
    # that has not failed yet): recovery ends at the first step of the resized group
    old = [r for r in rows if int(r["train/world_size"]) == ws_before]
    resized = [
        r for r in rows if r["time/unix"] > t_event and int(r["train/world_size"]) != ws_before
    ]
    if not resized:
        raise RuntimeError(
            f"{case}: the run finished before a resized group trained (more --steps); "
            f"log: {runs / 'train.log'}"
        )
    first_after = resized[0]
    last_old = max(int(r["train/step"]) for r in old if r["time/unix"] < first_after["time/unix"])
    # a drain is timed from its deadline: the moment a spot node is taken away
    start = events.get("deadline", events["gone"])
    marks = _marks(Path(cluster.root), events, first_after, int(first_after["train/world_size"]))
    first_step = first_after["time/first_step_unix"]
    out = {
        "case": case,
        "marks": marks,
        # phases count from the node's loss, or from the notice when the restart began
        # before the node left (an early preemption restart)
        "start": start if (marks["restart"] or start) >= start else t_event,
        "seconds": first_step - start,
        "from_notice_s": first_step - t_event,
        "notice_s": start - t_event,
        "redone": last_old - int(first_after["train/step"]) + 1,
        "ws_before": ws_before,
        "ws_after": int(first_after["train/world_size"]),
        "finished": int(rows[-1]["train/step"]) == steps,
    }
    if case == "return":
        t_ret = events["return"]
        back = [r for r in rows if r["time/unix"] > t_ret and r["train/world_size"] == 2]
        out["seconds_back"] = back[0]["time/unix"] - t_ret if back else float("nan")
    return out


def _breakdown(results: list[dict]) -> None:
    """Seconds of each recovery phase (``PHASES``), one column per event."""
    cases = [r for r in results if r["marks"]]
    print("\n| phase (s) | " + " | ".join(r["case"] for r in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for label, a, b in PHASES:
        cells = []
        for r in cases:
            m = dict(r["marks"], gone=r["start"])
            cells.append(f"{m[b] - m[a]:.1f}" if m.get(a) and m.get(b) else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        "| worker-group start attempts | "
        + " | ".join(str(r["marks"]["tries"]) for r in cases)
        + " |"
    )
    total = [r["marks"]["first_step"] - r["start"] for r in cases]  # from where phases count
    print("| **total** | " + " | ".join(f"**{t:.1f}**" for t in total) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--at-step", type=int, default=50)
    ap.add_argument(
        "--timeout-s",
        type=int,
        default=None,
        help="sets RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (else the driver sets it)",
    )
    ap.add_argument("--cases", default="kill,preempt,preempt-deadline,return")
    args = ap.parse_args()

    from orchestrator.data.synthetic import write_synthetic

    data = Path(tempfile.mkdtemp(prefix="tips-elastic-data-"))
    write_synthetic(str(data), n=256, seed=5, image_size=48, shard_size=64, n_eval=8)
    t0, load0 = time.time(), os.getloadavg()[0]
    results = []
    for case in args.cases.split(","):
        try:
            r = run_case(case, data / "train", args.at_step, args.steps, args.timeout_s)
        except (RuntimeError, TimeoutError) as e:  # the other cases still run and print
            print(f"{case}: no result: {e}", file=sys.stderr)
            continue
        results.append(r)
        print(f"{case}: {r['seconds']:.1f} s (from the event {r['from_notice_s']:.1f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    print()
    print(
        f"tiny_cpu, 1..2 workers on a 3-node local cluster, checkpoint every 50 steps, event "
        f"after step {args.at_step}, worker-group start timeout "
        f"{args.timeout_s or 'scaling.worker_group_start_timeout_s'}; {os.cpu_count()} cores, "
        f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({time.time() - t0:.0f} s)"
    )
    print(
        "| event | notice (s) | node gone (kill) or drain deadline -> next step (s) "
        "| event -> next step (s) | steps redone | workers before -> after | finished |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['notice_s']:.1f} | {r['seconds']:.1f} | "
            f"{r['from_notice_s']:.1f} | {r['redone']} | "
            f"{r['ws_before']} -> {r['ws_after']} | {r['finished']} |"
        )
    _breakdown(results)
    for r in results:
        if "seconds_back" in r:
            print(
                f"\ncapacity returned: {r['seconds_back']:.1f} s from the new node's start to "
                "the first step on 2 workers"
            )


if __name__ == "__main__":
    main()
