"""`tips cluster local up|add|preempt|stop|status|down`: a multi-node Ray cluster on this
machine (orchestrator/cluster/local.py), for tests and for trying elasticity and spot
preemption by hand.
"""

from __future__ import annotations

import argparse
import json

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, setup_logging
from orchestrator.cluster.local import ClusterError, LocalCluster, parse_node_spec

PROG = "tips cluster"
SUMMARY = "a multi-node Ray cluster on this machine: a head and workers with chosen resources"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} local", description=SUMMARY)
    p.add_argument("--name", default="tips-local", help="cluster name (state in /tmp/tipsc-NAME)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a head and workers")
    up.add_argument("--head", default="cpus=1", help="head node spec (default cpus=1)")
    up.add_argument("--worker", action="append", default=[], help="worker spec (repeatable)")
    up.add_argument("--dashboard", action="store_true", help="dashboard + job server on the head")
    up.add_argument("--drain-timeout-s", type=float, default=5.0, help="SIGTERM drain per node")
    add = sub.add_parser("add", help="add worker node(s)")
    add.add_argument("--worker", required=True, help="worker spec")
    pre = sub.add_parser("preempt", help="drain a worker as PREEMPTION, then remove it")
    pre.add_argument("node")
    pre.add_argument("--deadline-s", type=float, default=20.0)
    stop = sub.add_parser("stop", help="stop one node now (SIGTERM, then SIGKILL)")
    stop.add_argument("node")
    sub.add_parser("status", help="list the nodes")
    sub.add_parser("down", help="stop every node of this cluster")
    return p


def _main_local(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    setup_logging()
    cluster = LocalCluster(args.name)
    try:
        if args.cmd == "up":
            workers = []
            for text in args.worker:
                spec, count = parse_node_spec(text)
                workers += [spec] * count
            head, _ = parse_node_spec(args.head)
            cluster.up(
                head, workers, dashboard=args.dashboard, drain_timeout_s=args.drain_timeout_s
            )
            print(f"RAY_ADDRESS={cluster.address}")
            if args.dashboard:
                print(f"dashboard / job server: {cluster.dashboard_url}")
        elif args.cmd == "add":
            spec, count = parse_node_spec(args.worker)
            for _ in range(count):
                print(cluster.add_worker(spec).name)
        elif args.cmd == "preempt":
            cluster.preempt(args.node, args.deadline_s)
        elif args.cmd == "stop":
            cluster.stop_node(args.node)
        elif args.cmd == "status":
            for row in cluster.status():
                print(json.dumps(row))
        elif args.cmd == "down":
            cluster.down()
    except ClusterError as e:
        return fail(f"{PROG} local", str(e), EXIT_FAILED)
    return EXIT_OK


def main(argv: list[str]) -> int:
    """``tips cluster local ...``: the only cluster kind so far (cloud clusters are
    ``ray up cluster/<file>.yaml``, docs/clusters.md)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} local {{up,add,preempt,stop,status,down}} ... [-h]\n\n{SUMMARY}.")
        print("Cloud clusters: ray up cluster/aws-spot.yaml (docs/clusters.md).")
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] != "local":
        return fail(PROG, f"unknown cluster kind {argv[0]!r}; only 'local'", EXIT_USAGE)
    return _main_local(argv[1:])
