"""The one place that touches Ray's private APIs (checked against Ray 2.60.0).

Everything else in ``orchestrator/`` and ``tests/`` uses public Ray (``ray.data.Datasource``,
``ray.util.get_node_ip_address``, ``ray.nodes()``, ``ray.autoscaler.sdk``) or this module.
``tests/test_ray_compat.py`` imports every private symbol below and checks the attributes and
parameters used here, without starting Ray, so a Ray upgrade that moves one fails there, with
the API's name, instead of deep inside a cluster test or on a spot node.

Private APIs used, and why there is no public one (Ray 2.60.0):

* ``ray._raylet.GcsClient`` (methods ``get_all_node_info``, ``drain_node``,
  ``get_draining_nodes``; they live on ``ray._raylet.InnerGcsClient``, which ``GcsClient``
  wraps). A client of the GCS from a process that is not a Ray driver: the spot watcher
  (orchestrator/cluster/spot_watcher.py) runs beside ``ray start`` and the local cluster
  (orchestrator/cluster/local.py) runs from the ``tips cluster local`` command, neither of
  which may ``ray.init`` (that would register a job in the cluster). ``ray.nodes()`` needs
  ``ray.init``; ``ray.util.state.list_nodes`` needs the dashboard (off on the local cluster)
  and does not report temp dirs or drain deadlines. Draining a node with reason PREEMPTION
  and an exact deadline has no public API at all: ``ray drain-node`` (the CLI) calls this
  same ``GcsClient.drain_node`` but only takes seconds-from-now.
* ``ray._private.services.canonicalize_bootstrap_address_or_die``: turns None / ``auto`` /
  ``RAY_ADDRESS`` / the node's ``--temp-dir`` into the GCS address, as ``ray start`` and
  ``ray.init`` do; public code only resolves addresses inside ``ray.init``.
* ``ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator``: the
  ``AutoscalingCoordinator`` actor (name and namespace ``AutoscalingCoordinator``), whose
  view of the cluster's nodes Ray Train's elastic scaling policy sizes every (re)start from,
  refreshes that view only every ``_AutoscalingCoordinatorActor.TICK_INTERVAL_S`` (20 s);
  ``get_reserved_resources(requester_id, recompute=True)`` refreshes it at once. The train
  driver calls it when a node dies or joins (orchestrator/train/driver.py ``NodeWatch``), and
  the Train controller right before it acts on a failure (``coordinator_refresh_callback``),
  so a restart does not size itself from a node that is already gone. No public API
  reaches it.
* ``ray.train.v2._internal.execution.callback.ControllerCallback`` (a DeveloperAPI; a
  callback in ``RunConfig.callbacks`` that is not a ``ray.train.UserCallback`` reaches the
  controller as is): its ``before_controller_execute_failure_decision`` hook runs in the
  controller between a failure and the restart's sizing; ``UserCallback`` has no such hook.
* ``ray.core.generated.gcs_pb2.GcsNodeInfo`` (``GcsNodeState.ALIVE`` / ``DEAD``, fields
  ``node_id``, ``node_manager_address``, ``temp_dir``, ``state``, ``labels``) and
  ``ray.core.generated.autoscaler_pb2.DrainNodeReason`` (``DRAIN_NODE_REASON_PREEMPTION``):
  the generated protobufs that ``GcsClient`` takes and returns.

And one of torch's (2.14):

* ``torch.distributed.checkpoint.state_dict_loader._load_state_dict(..., no_dist=True)`` with
  ``default_planner._EmptyStateDictLoadPlanner``: a whole sharded (DCP) checkpoint into one
  process, every tensor as saved, without knowing its keys or shapes first (``tips export``,
  ``tips eval`` of a sharded checkpoint: orchestrator/train/checkpoint.py
  ``read_full_state``). The public ``format_utils.dcp_to_torch_save`` does the same but only
  from a local directory to a file; our checkpoints may be on S3 (a custom storage reader).

Each private import happens inside the function that needs it, so importing this module
does not import Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

RAY_VERSION_CHECKED = "2.60.0"
PREEMPTION_REASON = "DRAIN_NODE_REASON_PREEMPTION"

COORDINATOR_MODULE = "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator"
COORDINATOR_ACTOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")  # name, namespace
CALLBACK_MODULE = "ray.train.v2._internal.execution.callback"

# (module, attribute path) of every private symbol used below; tests/test_ray_compat.py
# imports each and checks what this module calls on it.
PRIVATE_APIS: tuple[tuple[str, str], ...] = (
    ("ray._raylet", "GcsClient"),
    ("ray._raylet", "InnerGcsClient.get_all_node_info"),
    ("ray._raylet", "InnerGcsClient.drain_node"),
    ("ray._raylet", "InnerGcsClient.get_draining_nodes"),
    ("ray._private.services", "canonicalize_bootstrap_address_or_die"),
    ("ray.core.generated.gcs_pb2", "GcsNodeInfo.GcsNodeState"),
    ("ray.core.generated.autoscaler_pb2", "DrainNodeReason"),
    (COORDINATOR_MODULE, "_AutoscalingCoordinatorActor.get_reserved_resources"),
    (COORDINATOR_MODULE, "get_or_create_autoscaling_coordinator"),
    (CALLBACK_MODULE, "ControllerCallback.before_controller_execute_failure_decision"),
    ("torch.distributed.checkpoint.state_dict_loader", "_load_state_dict"),
    ("torch.distributed.checkpoint.default_planner", "_EmptyStateDictLoadPlanner"),
)


@dataclass(frozen=True)
class GcsNode:
    """What the cluster code reads of a GCS node record (``gcs_pb2.GcsNodeInfo``)."""

    node_id: str  # hex
    ip: str  # node_manager_address
    temp_dir: str
    alive: bool
    labels: dict[str, str] = field(default_factory=dict)


def gcs_address(address: str | None = None, temp_dir: str | None = None) -> str:
    """The GCS ``HOST:PORT`` for ``address`` (None / "auto" = ``RAY_ADDRESS`` or the local
    cluster, found through ``temp_dir`` when given), as ``ray start`` resolves it."""
    from ray._private import services

    return services.canonicalize_bootstrap_address_or_die(address, temp_dir=temp_dir)


def gcs_client(address: str) -> Any:
    """A GCS client for ``HOST:PORT`` that does not connect this process as a Ray driver.

    Raises ``ray.exceptions.RpcError`` when the GCS does not answer (after ~30 s)."""
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def gcs_nodes(gcs: Any, *, alive_only: bool = False, timeout_s: float = 10) -> list[GcsNode]:
    """Every node the GCS knows (dead ones too unless ``alive_only``), in the GCS's order."""
    from ray.core.generated import gcs_pb2

    states = gcs_pb2.GcsNodeInfo.GcsNodeState
    kwargs: dict[str, Any] = {"timeout": timeout_s}
    if alive_only:
        kwargs["state_filter"] = states.ALIVE
    return [
        GcsNode(
            node_id=info.node_id.hex(),
            ip=info.node_manager_address,
            temp_dir=info.temp_dir,
            alive=info.state == states.ALIVE,
            labels=dict(info.labels),
        )
        for info in gcs.get_all_node_info(**kwargs).values()
    ]


def drain_node_for_preemption(
    gcs: Any, node_id: str, message: str, deadline_ms: int
) -> tuple[bool, str]:
    """Ask the GCS to drain ``node_id`` (hex) with reason PREEMPTION and an epoch-ms deadline,
    as ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` does.

    Returns ``(accepted, rejection_message)``; Ray Train's PreemptionWatcher then sees the node
    draining and ``ray.train.get_preemption_info()`` fires on its workers."""
    from ray.core.generated import autoscaler_pb2

    reason = autoscaler_pb2.DrainNodeReason.Value(PREEMPTION_REASON)
    accepted, why = gcs.drain_node(node_id, reason, message, deadline_ms)
    return bool(accepted), str(why)


def draining_nodes(gcs: Any, *, timeout_s: float = 10) -> dict[str, int]:
    """Hex id -> drain deadline (epoch ms, 0 = none) of every node being drained."""
    return dict(gcs.get_draining_nodes(timeout=timeout_s))


def refresh_autoscaling_coordinator(timeout_s: float = 10) -> bool:
    """Make Ray's ``AutoscalingCoordinator`` re-read the cluster's nodes and reservations now
    (from a process connected to Ray). False when this process is not connected or the actor
    does not exist yet (it reads the nodes when it starts)."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        actor = ray.get_actor(COORDINATOR_ACTOR[0], namespace=COORDINATOR_ACTOR[1])
    except ValueError:
        return False
    # any requester id: the refresh happens before the id is looked up
    ray.get(
        actor.get_reserved_resources.remote("tips-node-watch", recompute=True), timeout=timeout_s
    )
    return True


def coordinator_refresh_callback() -> Any:
    """A Ray Train controller callback that refreshes the autoscaling coordinator right before
    the controller acts on a failure: the restart that follows is sized from the nodes the
    GCS knows by then (a node whose death failed the workers is already declared dead)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class RefreshBeforeRestart(ControllerCallback):
        def before_controller_execute_failure_decision(self, failure_decision: Any) -> None:
            try:
                refresh_autoscaling_coordinator(timeout_s=5)
            except Exception as e:  # noqa: BLE001 (the restart still works from the old view)
                logging.getLogger(__name__).warning("autoscaling coordinator not refreshed: %s", e)

    return RefreshBeforeRestart()


def dcp_load_whole(storage_reader: Any) -> dict[str, Any]:
    """Every tensor and object of a DCP checkpoint, loaded in this process as saved (no
    process group, no target state dict: the module doc says why this is private torch)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    out: dict[str, Any] = {}
    _load_state_dict(
        out, storage_reader=storage_reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    return out
