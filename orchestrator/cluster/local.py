"""A multi-node Ray cluster on one machine: a head and N worker nodes with chosen CPUs, custom
resources and labels, for tests and for trying elasticity and spot preemption by hand.

    tips cluster local up --head cpus=0 --worker cpus=1,data_node=1 \\
        --worker cpus=1,trainer_node=1,count=2          # prints RAY_ADDRESS=...
    tips cluster local preempt worker-2 --deadline-s 20   # a spot notice
    tips cluster local add --worker cpus=1,trainer_node=1  # capacity returns
    tips cluster local status | down

Every node is one ``ray start --block`` process in its own session, with its own
``--temp-dir`` under ``/tmp/tipsc-<name>/`` and its own block of free ports, so several
clusters (and other people's Ray) coexist on one machine. ``down`` and ``stop`` end only the
processes of this cluster, found by their recorded ids and their temp dir; never
``ray stop`` (it kills every Ray process on the machine).

``preempt`` does what an EC2 spot interruption does with the spot watcher on the node: drain
the node with reason PREEMPTION and a deadline, wait for the deadline (or for the node to
finish draining), then take the node away (its processes killed, as the cloud takes the
machine: no second, graceful drain) and return once the GCS has declared it dead.

A node spec is ``key=value`` pairs joined by commas: ``cpus`` (default 1), ``gpus`` (logical,
default 0), ``object_store_mb`` (default 128), ``count`` (copies, default 1),
``label.KEY=VALUE`` for node labels, and any other ``NAME=NUMBER`` is a custom resource.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import ray_compat

logger = logging.getLogger(__name__)

PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range (32768+)
NODE_PORTS = ("node_manager", "object_manager", "metrics_export", "agent_listen", "agent_grpc")
NODE_PORTS += ("runtime_env_agent",)
HEAD_PORTS = ("gcs", "dashboard", "client_server")
WORKER_PORTS_PER_NODE = 64
START_TIMEOUT_S = 90.0
START_ATTEMPTS = 2
# How fast the GCS declares a node dead, set on the head (the GCS reads ``RAY_<name>`` from
# its environment; a value already in the environment wins). Ray 2.60's defaults
# (src/ray/common/ray_config_def.h): a health check of every raylet each 3000 ms, 10000 ms
# timeout, dead after 5 failures in a row, so a killed node stays alive in the GCS for ~15 s
# and an elastic restart in that window still counts its resources
# (docs/ray.md, "Recovery time"). With these a crashed raylet (its port refuses) is dead
# after ~3 s, a vanished host after 3 x (5 + 1) s, and a live raylet only after three 5 s
# checks in a row went unanswered. The cluster files under cluster/ set the same values.
HEALTH_CHECK_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "3",
}
# Every node keeps an idle Python worker (its imports done: torch, the pipeline) for 60 s
# instead of Ray's 1000 ms (``idle_worker_killing_time_threshold_ms``; idle workers beyond
# ``num_workers_soft_limit``, the node's CPUs, are killed after it). These nodes have 1-2 CPUs
# and run 0.25-CPU data tasks, so after a restart the new stream's tasks all started in new
# processes, each paying ``import torch`` before its first block
# (docs/ray.md, "Recovery time"); a node of a real cluster keeps as many idle workers as
# it has CPUs anyway.
NODE_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


class ClusterError(RuntimeError):
    """A node did not start or register, a spec is malformed, or the cluster is unknown."""


@dataclass
class NodeSpec:
    cpus: float = 1
    gpus: int = 0
    object_store_mb: int = 128
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def parse_node_spec(text: str) -> tuple[NodeSpec, int]:
    """``cpus=1,data_node=1,label.kind=data,count=2`` -> (NodeSpec, count)."""
    spec, count = NodeSpec(), 1
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClusterError(f"node spec {text!r}: {item!r} is not key=value")
        try:
            if key.startswith("label."):
                spec.labels[key[len("label.") :]] = value
            elif key in ("cpus", "gpus", "object_store_mb", "count"):
                number = float(value) if key == "cpus" else int(value)
                if key == "count":
                    count = int(number)
                else:
                    setattr(spec, key, number)
            else:
                spec.resources[key] = float(value)
        except ValueError:
            raise ClusterError(f"node spec {text!r}: {key}={value!r} is not a number") from None
    return spec, count


@dataclass
class LocalNode:
    name: str  # head, worker-1, worker-2, ...
    spec: NodeSpec
    temp_dir: str
    ports: dict[str, int]
    pid: int = 0
    node_id: str = ""

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LocalNode:
        return LocalNode(**{**d, "spec": NodeSpec(**d["spec"])})


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running and not a zombie (a reaped-later child must not count as alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _names_dir(cmdline: str, directory: str) -> bool:
    """Whether a command line names ``directory`` or a path inside it (not a sibling)."""
    return any(
        tok == directory or tok.endswith("=" + directory) or f"{directory}/" in tok
        for tok in cmdline.split()
    )


def _pids_under(temp_dir: str, pgid: int) -> list[int]:
    """Processes of one node: its process group, or a command line naming its temp dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            same_group = pgid > 0 and os.getpgid(pid) == pgid
        except OSError:
            continue
        if same_group or _names_dir(_proc_cmdline(pid), temp_dir):
            found.append(pid)
    return found


class LocalCluster:
    """Start, grow, preempt and stop a local multi-node Ray cluster; state in ``root``."""

    def __init__(self, name: str = "tips-local", root: str | Path | None = None) -> None:
        self.name = name
        # Short: Ray's unix socket paths under the temp dir must stay below 108 bytes.
        self.root = Path(root or f"/tmp/tipsc-{name}")
        self.nodes: list[LocalNode] = []
        self.drain_timeout_s = 5.0
        self._procs: dict[int, subprocess.Popen] = {}
        if self.state_file.is_file():
            state = json.loads(self.state_file.read_text())
            self.nodes = [LocalNode.from_dict(n) for n in state["nodes"]]
            self.drain_timeout_s = state.get("drain_timeout_s", self.drain_timeout_s)

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def _save(self) -> None:
        state = {
            "name": self.name,
            "address": self.address if self.nodes else None,
            "drain_timeout_s": self.drain_timeout_s,
            "nodes": [asdict(n) for n in self.nodes],
        }
        self.state_file.write_text(json.dumps(state, indent=2))

    @property
    def head(self) -> LocalNode:
        if not self.nodes or self.nodes[0].name != "head":
            raise ClusterError(f"cluster {self.name!r} has no head (state: {self.state_file})")
        return self.nodes[0]

    @property
    def address(self) -> str:
        """GCS address for ``ray.init(address=...)`` / ``RAY_ADDRESS``."""
        from ray.util import get_node_ip_address

        return f"{get_node_ip_address()}:{self.head.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.head.ports['dashboard']}"

    def node(self, name: str) -> LocalNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterError(f"cluster {self.name!r} has no node {name!r}: {self.node_names()}")

    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    # ------------------------------------------------------------------ start
    def _ports(self, names: tuple[str, ...]) -> dict[str, int]:
        taken = {p for n in self.nodes for p in n.ports.values()}
        size = len(names) + WORKER_PORTS_PER_NODE
        rng = random.Random()
        for _ in range(200):
            base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - size)
            block = range(base, base + size)
            if not taken.intersection(block) and all(_port_free(p) for p in block):
                ports = dict(zip(names, block, strict=False))
                ports["min_worker"], ports["max_worker"] = base + len(names), base + size - 1
                return ports
        raise ClusterError(f"no block of {size} free ports in {PORT_RANGE}")

    def _command(self, node: LocalNode, dashboard: bool) -> list[str]:
        ray_bin = Path(sys.executable).with_name("ray")
        s, p = node.spec, node.ports
        cmd = [str(ray_bin if ray_bin.exists() else "ray"), "start", "--block"]
        cmd += ["--disable-usage-stats", "--temp-dir", node.temp_dir]
        cmd += ["--num-cpus", str(int(s.cpus)), "--num-gpus", str(s.gpus)]
        cmd += ["--object-store-memory", str(s.object_store_mb * 1024 * 1024)]
        if s.resources:
            cmd += ["--resources", json.dumps(s.resources)]
        if s.labels:
            cmd += ["--labels", ",".join(f"{k}={v}" for k, v in s.labels.items())]
        cmd += ["--node-manager-port", str(p["node_manager"])]
        cmd += ["--object-manager-port", str(p["object_manager"])]
        cmd += ["--metrics-export-port", str(p["metrics_export"])]
        cmd += ["--dashboard-agent-listen-port", str(p["agent_listen"])]
        cmd += ["--dashboard-agent-grpc-port", str(p["agent_grpc"])]
        cmd += ["--runtime-env-agent-port", str(p["runtime_env_agent"])]
        cmd += [
            "--min-worker-port",
            str(p["min_worker"]),
            "--max-worker-port",
            str(p["max_worker"]),
        ]
        if node.name == "head":
            cmd += ["--head", "--port", str(p["gcs"]), "--dashboard-port", str(p["dashboard"])]
            cmd += ["--ray-client-server-port", str(p["client_server"])]
            cmd += ["--include-dashboard", "true" if dashboard else "false"]
            cmd += ["--dashboard-host", "127.0.0.1"]
        else:
            cmd += ["--address", self.address]
        return cmd

    def _start(self, name: str, spec: NodeSpec, dashboard: bool = False) -> LocalNode:
        """Start one node; a start that fails (Ray gives a raylet 30 s to register, which a
        loaded machine can miss) is cleaned up and tried again on fresh ports."""
        if spec.cpus != int(spec.cpus):
            raise ClusterError(f"node {name}: cpus={spec.cpus} must be a whole number")
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return self._start_once(name, spec, dashboard)
            except ClusterError as e:
                if attempt == START_ATTEMPTS or name not in self.node_names():
                    raise
                logger.warning("node %s failed to start (attempt %d): %s", name, attempt, e)
                self.stop_node(name, grace_s=5)
        raise AssertionError("unreachable")

    def _start_once(self, name: str, spec: NodeSpec, dashboard: bool) -> LocalNode:
        ports = self._ports(HEAD_PORTS + NODE_PORTS if name == "head" else NODE_PORTS)
        node = LocalNode(name, spec, str(self.root / name), ports)
        Path(node.temp_dir).mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = str(self.drain_timeout_s)
        env = NODE_ENV | (HEALTH_CHECK_ENV if name == "head" else {}) | env
        log = open(self.root / f"{name}.log", "ab")  # the child keeps its own descriptor
        proc = subprocess.Popen(
            self._command(node, dashboard),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: stopped as one, by its id
        )
        log.close()
        node.pid = proc.pid
        self._procs[proc.pid] = proc
        self.nodes.append(node)
        self._save()
        node.node_id = self._wait_registered(node)
        self._save()
        logger.info("node %s up: %s (pid %d)", name, node.node_id[:12], node.pid)
        return node

    def _wait_registered(self, node: LocalNode, timeout_s: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(node.pid):
                tail = (self.root / f"{node.name}.log").read_text(errors="replace")[-2000:]
                raise ClusterError(f"node {node.name} exited while starting:\n{tail}")
            try:
                gcs = ray_compat.gcs_client(self.address)
                alive = ray_compat.gcs_nodes(gcs, alive_only=True, timeout_s=5)
            except Exception:  # GCS not up yet
                alive = []
            for info in alive:
                if info.temp_dir == node.temp_dir:
                    return info.node_id
            time.sleep(0.5)
        raise ClusterError(f"node {node.name} did not register within {timeout_s:.0f} s")

    def up(
        self,
        head: NodeSpec | None = None,
        workers: list[NodeSpec] | None = None,
        *,
        dashboard: bool = False,
        drain_timeout_s: float = 5.0,
    ) -> LocalCluster:
        """Start the head, then the workers (named worker-1, worker-2, ... in order)."""
        if any(_alive(n.pid) for n in self.nodes):
            raise ClusterError(f"cluster {self.name!r} is already up ({self.state_file})")
        self.nodes = []
        self.root.mkdir(parents=True, exist_ok=True)
        self.drain_timeout_s = drain_timeout_s
        try:
            self._start("head", head or NodeSpec(), dashboard)
            for spec in workers or []:
                self.add_worker(spec)
        except BaseException:
            self.down()
            raise
        return self

    def add_worker(self, spec: NodeSpec) -> LocalNode:
        taken = {n.name for n in self.nodes}
        index = next(i for i in range(1, len(self.nodes) + 2) if f"worker-{i}" not in taken)
        return self._start(f"worker-{index}", spec)

    # ------------------------------------------------------------------ stop
    def stop_node(self, name: str, grace_s: float | None = None) -> None:
        """SIGTERM the node's ``ray start --block`` (Ray drains it for ``drain_timeout_s``),
        then SIGKILL whatever of that node is left after ``grace_s``."""
        node = self.node(name)
        grace_s = self.drain_timeout_s + 10 if grace_s is None else grace_s
        if _alive(node.pid) and _names_dir(_proc_cmdline(node.pid), node.temp_dir):
            os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(node.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _pids_under(node.temp_dir, node.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if node.pid in self._procs:
            self._procs.pop(node.pid).wait(timeout=10)
        self.nodes.remove(node)
        self._save()
        logger.info("node %s stopped", name)

    def preempt(self, name: str, deadline_s: float = 20.0) -> None:
        """Drain ``name`` as PREEMPTION with a deadline, wait for it, then remove the node."""
        from orchestrator.cluster.spot_watcher import RayDrainer, SpotNotice

        node = self.node(name)
        if name == "head":
            raise ClusterError("the head cannot be preempted: it holds the GCS and the driver")
        deadline_ms = int((time.time() + deadline_s) * 1000)
        RayDrainer(self.address, node_id=node.node_id)(
            SpotNotice(action="terminate", deadline_ms=deadline_ms, raw=f"local preempt {name}")
        )
        logger.info("node %s draining; removed in %.0f s", name, deadline_s)
        raylet_gone = time.monotonic() + deadline_s
        while time.monotonic() < raylet_gone and not self._node_dead(node):
            time.sleep(0.5)
        self.stop_node(name, grace_s=0)
        declared = time.monotonic() + 60
        while not self._node_dead(node) and time.monotonic() < declared:
            time.sleep(0.2)

    def _node_dead(self, node: LocalNode) -> bool:
        nodes = ray_compat.gcs_nodes(ray_compat.gcs_client(self.address), timeout_s=5)
        return any(n.node_id == node.node_id and not n.alive for n in nodes)

    def down(self) -> None:
        """Stop the workers (all SIGTERMed at once), then the head; forget the state."""
        workers = [n for n in self.nodes if n.name != "head"]
        for n in workers:
            if _alive(n.pid) and _names_dir(_proc_cmdline(n.pid), n.temp_dir):
                os.kill(n.pid, signal.SIGTERM)
        for n in workers + [n for n in self.nodes if n.name == "head"]:
            self.stop_node(n.name)
        if self.state_file.exists():
            self.state_file.unlink()

    def status(self) -> list[dict[str, Any]]:
        return [
            {"name": n.name, "alive": _alive(n.pid), "node_id": n.node_id, "pid": n.pid}
            | {"cpus": n.spec.cpus, "resources": n.spec.resources, "labels": n.spec.labels}
            for n in self.nodes
        ]

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
