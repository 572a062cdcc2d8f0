"""EC2 spot interruption notices -> a Ray node drain, so Ray Train checkpoints before the node goes.

    python -m orchestrator.cluster.spot_watcher --address $RAY_HEAD_IP:6379 &   # on each spot node

The AWS cluster launcher does not watch the two-minute spot warning, so without this Ray only
learns a node is gone when it dies and the run loses up to a checkpoint interval
(docs/ray.md, "Preemption"). The watcher polls the instance metadata service (IMDSv2:
``PUT /latest/api/token``, then ``GET /latest/meta-data/spot/instance-action`` with the
token; 404 = no notice). On a notice
(``{"action": "terminate", "time": "2026-11-23T08:22:00Z"}``) it asks the GCS to drain this
node with reason ``DRAIN_NODE_REASON_PREEMPTION`` and the notice's time as the deadline: the
same call as ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` (which only takes
seconds-from-now), but with the exact deadline. Ray Train's PreemptionWatcher then sees the
draining node, ``ray.train.get_preemption_info()`` fires in the loop (orchestrator/train/loop.py),
rank 0 checkpoints, and the controller restarts the group without this node.

Contract: ``watch(client, drain)`` polls until a notice, calls ``drain(notice)`` exactly once
and returns the notice, or returns None after ``max_polls`` polls or when ``stop`` is set.
The drain action is any callable; ``RayDrainer`` is the real one. On an on-demand instance the
CLI exits at once (IMDS ``instance-life-cycle``), so it is safe to start on every worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator import ray_compat
from orchestrator.ray_compat import GcsNode

logger = logging.getLogger(__name__)

# AWS: the instance metadata service; boto honours the same override variable.
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
LIFECYCLE_PATH = "/latest/meta-data/instance-life-cycle"
TOKEN_TTL_S = 21600  # AWS maximum (6 h)
DEFAULT_NOTICE_S = 120  # AWS: "a two-minute warning" before the interruption
POLL_INTERVAL_S = 5.0  # AWS recommends polling every 5 s


class ImdsError(RuntimeError):
    """The metadata service answered with something other than a notice or a 404."""


class DrainError(RuntimeError):
    """The node could not be found in the Ray cluster, or the GCS refused the drain."""


@dataclass(frozen=True)
class SpotNotice:
    action: str  # terminate | stop | hibernate
    deadline_ms: int  # epoch ms at which EC2 acts on the instance
    raw: str  # the body as IMDS sent it


def parse_notice(body: str, now_ms: int | None = None) -> SpotNotice:
    """An ``instance-action`` body -> SpotNotice; an unreadable time means now + 120 s."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    fallback = now_ms + DEFAULT_NOTICE_S * 1000
    try:
        doc: Any = json.loads(body)
    except ValueError:
        logger.warning("spot notice is not JSON (%r); assuming %d s left", body, DEFAULT_NOTICE_S)
        return SpotNotice(action="terminate", deadline_ms=fallback, raw=body)
    if not isinstance(doc, dict):
        doc = {}
    action = str(doc.get("action") or "terminate")
    try:
        deadline_ms = int(datetime.fromisoformat(str(doc["time"])).timestamp() * 1000)
    except (KeyError, ValueError):
        logger.warning(
            "spot notice without a readable time (%r); assuming %d s left", body, DEFAULT_NOTICE_S
        )
        deadline_ms = fallback
    return SpotNotice(action=action, deadline_ms=deadline_ms, raw=body)


class ImdsClient:
    """IMDSv2 reads with a cached session token (refreshed before expiry and after a 401)."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout_s: float = 2.0,
        token_ttl_s: int = TOKEN_TTL_S,
    ) -> None:
        self.endpoint = (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_IMDS_ENDPOINT).rstrip(
            "/"
        )
        self.timeout_s = timeout_s
        self.token_ttl_s = token_ttl_s
        self._token: str | None = None
        self._token_expires = 0.0
        # Never through an HTTP proxy: the metadata service is link-local.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None):
        req = urllib.request.Request(self.endpoint + path, method=method, headers=headers or {})
        return self._opener.open(req, timeout=self.timeout_s)

    def token(self, refresh: bool = False) -> str:
        if refresh or self._token is None or time.monotonic() >= self._token_expires:
            headers = {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)}
            with self._request(TOKEN_PATH, "PUT", headers) as resp:
                self._token = resp.read().decode().strip()
            # Renew a minute early so a poll never carries an expired token.
            self._token_expires = time.monotonic() + max(1, self.token_ttl_s - 60)
        return self._token

    def get(self, path: str) -> str | None:
        """The body at ``path``; None for a 404. A 401 renews the token once."""
        for attempt in range(2):
            headers = {"X-aws-ec2-metadata-token": self.token(refresh=attempt > 0)}
            try:
                with self._request(path, "GET", headers) as resp:
                    return resp.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code == 401 and attempt == 0:
                    logger.info("IMDS token rejected (401); requesting a new one")
                    continue
                raise ImdsError(f"{self.endpoint}{path}: HTTP {e.code}") from e
        raise AssertionError("unreachable")

    def spot_notice(self) -> SpotNotice | None:
        body = self.get(ACTION_PATH)
        return None if body is None else parse_notice(body)

    def instance_life_cycle(self) -> str | None:
        """``spot``, ``on-demand`` or ``scheduled``; None when IMDS does not say."""
        body = self.get(LIFECYCLE_PATH)
        return None if body is None else body.strip()


def watch(
    client: ImdsClient,
    drain: Callable[[SpotNotice], None],
    *,
    poll_interval_s: float = POLL_INTERVAL_S,
    max_polls: int | None = None,
    stop: threading.Event | None = None,
    drain_attempts: int = 3,
) -> SpotNotice | None:
    """Poll for a spot notice; on one, call ``drain(notice)`` once and return the notice.

    Metadata errors are logged and polling goes on. A drain that raises is retried up to
    ``drain_attempts`` times, 1 s apart (the GCS may be restarting); the notice is returned
    either way, since there is nothing left to watch for.
    """
    stop = stop or threading.Event()
    polls = 0
    while not stop.is_set() and (max_polls is None or polls < max_polls):
        polls += 1
        try:
            notice = client.spot_notice()
        except (OSError, ImdsError) as e:  # URLError and timeouts are OSErrors
            logger.warning("spot notice poll %d failed: %s", polls, e)
            notice = None
        if notice is not None:
            left_s = (notice.deadline_ms - time.time() * 1000) / 1000
            logger.warning(
                "EC2 spot notice: action=%s in %.0f s; draining this Ray node",
                notice.action,
                left_s,
            )
            for attempt in range(1, drain_attempts + 1):
                try:
                    drain(notice)
                    break
                except Exception:
                    logger.exception("drain attempt %d/%d failed", attempt, drain_attempts)
                    if attempt < drain_attempts:
                        stop.wait(1.0)
            return notice
        stop.wait(poll_interval_s)
    return None


class RayDrainer:
    """Drain this node through the GCS with reason PREEMPTION and the notice's deadline.

    The node is found lazily, at drain time (the watcher may start before ``ray start``):
    ``node_id`` if given, else the one alive node whose address is this machine's IP (and
    whose temp dir is ``temp_dir``, when several Ray nodes share a machine).
    """

    def __init__(
        self,
        address: str | None = None,
        node_id: str | None = None,
        temp_dir: str | None = None,
        node_ip: str | None = None,
    ) -> None:
        self.address = address
        self.node_id = node_id
        self.temp_dir = temp_dir
        self.node_ip = node_ip
        self.drained_node: str | None = None  # set once the GCS accepted the drain

    def resolve_node_id(self, alive: Iterable[GcsNode]) -> str:
        """``node_id`` if given, else the one node of ``alive`` at this machine's IP (and
        ``temp_dir``)."""
        if self.node_id:
            return self.node_id
        import ray.util

        ip = self.node_ip or ray.util.get_node_ip_address()
        found = [
            n
            for n in alive
            if n.ip == ip and (self.temp_dir is None or n.temp_dir == self.temp_dir)
        ]
        if len(found) != 1:
            where = f"ip={ip}" + (f", temp_dir={self.temp_dir}" if self.temp_dir else "")
            raise DrainError(
                f"expected one alive Ray node at {where}, found {len(found)}; "
                "pass --node-id (or --temp-dir when several nodes share a machine)"
            )
        return found[0].node_id

    def __call__(self, notice: SpotNotice) -> None:
        gcs = ray_compat.gcs_client(ray_compat.gcs_address(self.address, self.temp_dir))
        node_id = self.node_id or self.resolve_node_id(ray_compat.gcs_nodes(gcs, alive_only=True))
        accepted, why = ray_compat.drain_node_for_preemption(
            gcs,
            node_id,
            f"EC2 spot interruption notice: {notice.action} at {notice.raw}",
            notice.deadline_ms,
        )
        if not accepted:
            raise DrainError(f"GCS refused to drain node {node_id}: {why}")
        self.drained_node = node_id
        logger.info("node %s draining (PREEMPTION, deadline %d ms)", node_id, notice.deadline_ms)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.cluster.spot_watcher", description=__doc__.splitlines()[0]
    )
    p.add_argument("--address", help="GCS address HOST:PORT (default: RAY_ADDRESS / local)")
    p.add_argument("--node-id", help="hex id of the node to drain (default: this machine's)")
    p.add_argument("--temp-dir", help="the node's ray --temp-dir, to pick it among local nodes")
    p.add_argument("--imds-endpoint", help=f"default ${ENDPOINT_ENV} or {DEFAULT_IMDS_ENDPOINT}")
    p.add_argument("--poll-interval-s", type=float, default=POLL_INTERVAL_S)
    p.add_argument("--max-polls", type=int, default=0, help="stop after N polls (0 = never)")
    p.add_argument(
        "--any-lifecycle",
        action="store_true",
        help="keep watching on on-demand instances too (default: exit there)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s spot_watcher: %(message)s")

    client = ImdsClient(args.imds_endpoint)
    if not args.any_lifecycle:
        try:
            lifecycle = client.instance_life_cycle()
        except (OSError, ImdsError) as e:
            logger.warning("cannot read instance-life-cycle (%s); watching anyway", e)
            lifecycle = None
        if lifecycle in ("on-demand", "scheduled"):
            logger.info("instance-life-cycle=%s: no spot notices will come; exiting", lifecycle)
            return 0
    drainer = RayDrainer(args.address, args.node_id, args.temp_dir)
    logger.info("watching %s%s every %.1f s", client.endpoint, ACTION_PATH, args.poll_interval_s)
    notice = watch(
        client,
        drainer,
        poll_interval_s=args.poll_interval_s,
        max_polls=args.max_polls or None,
    )
    return 0 if notice is None or drainer.drained_node else 1


if __name__ == "__main__":
    sys.exit(main())
