"""The spot watcher against a fake IMDSv2 on 127.0.0.1, and its drain against a real Ray node.

Fast tests inject the drain action (a list that records notices); the slow one drains a
busy worker node of a local two-node cluster and reads the GCS's draining table.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import pytest

from orchestrator import ray_compat
from orchestrator.cluster import spot_watcher
from orchestrator.cluster.local import NodeSpec
from orchestrator.cluster.spot_watcher import (
    ImdsClient,
    RayDrainer,
    SpotNotice,
    parse_notice,
    watch,
)
from orchestrator.ray_compat import GcsNode
from tests.cluster.fake_imds import FakeImds

NOTICE_TIME = "2030-01-02T03:04:05Z"
NOTICE_MS = int(datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp() * 1000)
NOTICE = json.dumps({"action": "terminate", "time": NOTICE_TIME})


def _watch(imds: FakeImds, drained: list[SpotNotice], **kwargs) -> SpotNotice | None:
    kwargs.setdefault("max_polls", 5)
    return watch(ImdsClient(imds.endpoint), drained.append, poll_interval_s=0.01, **kwargs)


def test_no_notice_means_no_drain_and_the_loop_ends_by_itself():
    drained: list[SpotNotice] = []
    with FakeImds() as imds:
        assert _watch(imds, drained, max_polls=4) is None
    assert drained == []
    assert imds.state.action_gets() == 4
    assert all(code == 404 for _, _, code in imds.state.gets)


def test_a_notice_drains_exactly_once_with_the_notice_deadline():
    drained: list[SpotNotice] = []
    with FakeImds() as imds:
        imds.state.notice, imds.state.notice_after_gets = NOTICE, 2
        notice = _watch(imds, drained, max_polls=10)
    assert notice is not None and notice.action == "terminate"
    assert [n.deadline_ms for n in drained] == [NOTICE_MS]
    assert imds.state.action_gets() == 3  # two 404s, then the notice; then it stops polling


def test_token_is_put_with_a_ttl_reused_and_renewed_after_a_401():
    drained: list[SpotNotice] = []
    with FakeImds() as imds:
        client = ImdsClient(imds.endpoint)
        assert client.spot_notice() is None
        assert client.spot_notice() is None
        assert imds.state.puts == [str(spot_watcher.TOKEN_TTL_S)]  # one token for both GETs
        imds.state.revoke_tokens()  # token expired on the IMDS side
        imds.state.notice = NOTICE
        assert watch(client, drained.append, poll_interval_s=0.01, max_polls=1) is not None
    assert len(imds.state.puts) == 2
    codes = [code for _, _, code in imds.state.gets]
    assert codes == [404, 404, 401, 200]
    assert all(token for _, token, _ in imds.state.gets)  # every GET carried a token
    assert len(drained) == 1


def test_unreachable_imds_is_logged_and_polling_stays_bounded():
    with FakeImds() as imds:
        endpoint = imds.endpoint
    drained: list[SpotNotice] = []
    client = ImdsClient(endpoint, timeout_s=0.5)  # the server is gone: connection refused
    assert watch(client, drained.append, poll_interval_s=0.01, max_polls=3) is None
    assert drained == []


def test_a_failing_drain_is_retried_then_the_watcher_stops():
    calls: list[SpotNotice] = []

    def flaky(notice: SpotNotice) -> None:
        calls.append(notice)
        if len(calls) < 2:
            raise RuntimeError("GCS restarting")

    with FakeImds() as imds:
        imds.state.notice = NOTICE
        notice = watch(ImdsClient(imds.endpoint), flaky, poll_interval_s=0.01, max_polls=5)
    assert notice is not None and len(calls) == 2
    assert imds.state.action_gets() == 1


def test_stop_event_ends_an_unbounded_watch():
    stop = threading.Event()
    with FakeImds() as imds:
        timer = threading.Timer(0.3, stop.set)
        timer.start()
        assert watch(ImdsClient(imds.endpoint), [].append, poll_interval_s=0.05, stop=stop) is None
        timer.join()
    assert imds.state.action_gets() >= 2


def test_parse_notice_reads_the_time_and_falls_back_to_two_minutes():
    assert parse_notice(NOTICE).deadline_ms == NOTICE_MS
    stop = parse_notice(json.dumps({"action": "stop", "time": "2030-01-02T03:04:05+00:00"}))
    assert (stop.action, stop.deadline_ms) == ("stop", NOTICE_MS)
    now = 1_000_000
    assert parse_notice("{}", now_ms=now).deadline_ms == now + 120_000
    assert parse_notice("not json", now_ms=now).deadline_ms == now + 120_000


def test_cli_exits_at_once_on_on_demand_instances():
    with FakeImds() as imds:
        imds.state.lifecycle = "on-demand"
        assert spot_watcher.main(["--imds-endpoint", imds.endpoint, "--max-polls", "3"]) == 0
    assert imds.state.action_gets() == 0


def test_drainer_explains_an_ambiguous_node():
    alive = [GcsNode("a1", "10.0.0.1", "/tmp/a", True), GcsNode("b2", "10.0.0.1", "/tmp/b", True)]
    with pytest.raises(spot_watcher.DrainError, match="--node-id"):
        RayDrainer(node_ip="10.0.0.1").resolve_node_id(alive)
    assert RayDrainer(node_ip="10.0.0.1", temp_dir="/tmp/b").resolve_node_id(alive) == "b2"


@pytest.mark.slow
@pytest.mark.cluster
def test_notice_drains_a_real_ray_node_as_preemption(local_cluster):
    import ray

    cluster = local_cluster(NodeSpec(cpus=0), [NodeSpec(cpus=1, resources={"spot": 1})])
    worker = cluster.node("worker-1")
    ray.init(address=cluster.address)
    try:

        @ray.remote(num_cpus=0, resources={"spot": 1})
        class Busy:  # keeps the node busy, so it drains instead of exiting at once
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        busy = Busy.remote()
        assert ray.get(busy.node.remote()) == worker.node_id
        gcs = ray_compat.gcs_client(cluster.address)
        assert ray_compat.draining_nodes(gcs) == {}
        deadline = datetime.fromtimestamp(time.time() + 60, tz=UTC)
        body = json.dumps({"action": "terminate", "time": deadline.isoformat()})
        drainer = RayDrainer(cluster.address, temp_dir=worker.temp_dir)
        with FakeImds() as imds:
            imds.state.notice = body
            notice = watch(ImdsClient(imds.endpoint), drainer, poll_interval_s=0.01, max_polls=3)
        assert notice is not None and drainer.drained_node == worker.node_id
        draining = ray_compat.draining_nodes(gcs)
        assert draining == {worker.node_id: notice.deadline_ms}
    finally:
        ray.shutdown()
