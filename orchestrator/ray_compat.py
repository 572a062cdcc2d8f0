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
  the Train controller right before it acts on a failure (``recovery_callback``), so a
  restart does not size itself from a node that is already gone. No public API reaches it.
* ``ray.train.v2._internal.execution.callback.ControllerCallback`` and ``ReportCallback``
  (DeveloperAPIs; a callback in ``RunConfig.callbacks`` that is not a
  ``ray.train.UserCallback`` reaches the controller as is): ``recovery_callback`` uses
  ``before_controller_execute_failure_decision`` (between a failure and the restart's
  sizing), ``before_controller_execute_resize_decision`` (the decision object is used after
  the hook: its ``num_workers`` can be lowered), ``after_controller_start`` (the
  controller's own ``RunConfig``), ``after_controller_state_update`` and ``after_report``;
  and the fact that the controller reads ``failure_config.preemption_grace_s`` on every poll
  of its preempting state (``TrainController._handle_preempting_state``). ``UserCallback``
  has none of these hooks; the preempting state has no public way to end early.
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
CONTROLLER_MODULE = "ray.train.v2._internal.execution.controller.controller"

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
    (CALLBACK_MODULE, "ControllerCallback.before_controller_execute_resize_decision"),
    (CALLBACK_MODULE, "ControllerCallback.after_controller_start"),
    (CALLBACK_MODULE, "ControllerCallback.after_controller_state_update"),
    (CALLBACK_MODULE, "ReportCallback.after_report"),
    (CONTROLLER_MODULE, "TrainController._handle_preempting_state"),
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


def schedulable_workers(resources_per_worker: dict[str, float], timeout_s: float = 5) -> int | None:
    """How many workers of this shape fit on the nodes that are alive and not being drained
    (from a process connected to Ray); None when no node is draining (nothing to correct).

    Node totals, not what is free: the caller takes the smaller of this and its own count.
    Ray's node table (``ray.nodes()``) shows a draining node as alive, with nothing to say it
    is draining [measured], and the autoscaling coordinator counts it."""
    import ray

    draining = draining_nodes(
        gcs_client(ray.get_runtime_context().gcs_address), timeout_s=timeout_s
    )
    need = {name: amount for name, amount in resources_per_worker.items() if amount > 0}
    if not draining or not need:
        return None
    fit = 0
    for node in ray.nodes():
        if node["Alive"] and node["NodeID"] not in draining:
            have = node["Resources"]
            fit += int(min(have.get(name, 0.0) // amount for name, amount in need.items()))
    return fit


def recovery_callback(min_workers: int, restart_key: str) -> Any:
    """The Ray Train controller callback of an elastic run (docs/ray.md, "Recovery time"):

    * right before the controller acts on a failure it refreshes the autoscaling
      coordinator, so the restart is sized from the nodes the GCS knows by then (a node
      whose death failed the workers is already declared dead);
    * a restart's size leaves out nodes that are being drained: the coordinator counts them,
      and a group asked of them waits out the worker-group start timeout and is retried;
    * when a report carries ``restart_key`` (the workers' preemption checkpoint is written:
      orchestrator/train/preemption.py) while a drain is on, the controller restarts the
      group at once instead of at the drain deadline. Ray Train decides that moment in its
      preempting state from the run's ``FailureConfig.preemption_grace_s``, read on every
      poll from the object ``after_controller_start`` hands us (the controller's own
      ``RunConfig``): the callback makes it minus a day for that one drain and puts it back
      when the controller leaves the preempting state. No hook can end the preempting state
      otherwise: a worker that returns ends the run, one that raises is charged to
      ``max_failures``; this way the restart is a preemption, on its own budget."""
    from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback

    log = logging.getLogger(__name__)

    class Recovery(ControllerCallback, ReportCallback):
        def __init__(self) -> None:
            self._failure_config: Any = None
            self._grace_s = 0.0

        def after_controller_start(self, train_run_context: Any) -> None:
            self._failure_config = train_run_context.run_config.failure_config
            self._grace_s = self._failure_config.preemption_grace_s

        def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
            asked = any(m.get(restart_key) for m in metrics if m)
            if asked and training_report.checkpoint is not None and self._failure_config:
                log.info("preemption checkpoint written: restarting without the drained node")
                self._failure_config.preemption_grace_s = -86400.0

        def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
            preempting = "PreemptingState"
            left = type(previous_state).__name__ == preempting != type(current_state).__name__
            if left and self._failure_config is not None:
                self._failure_config.preemption_grace_s = self._grace_s

        def before_controller_execute_failure_decision(self, failure_decision: Any) -> None:
            try:
                refresh_autoscaling_coordinator(timeout_s=5)
            except Exception as e:  # noqa: BLE001 (the restart still works from the old view)
                log.warning("autoscaling coordinator not refreshed: %s", e)

        def before_controller_execute_resize_decision(self, resize_decision: Any) -> None:
            try:
                fit = schedulable_workers(resize_decision.resources_per_worker)
            except Exception as e:  # noqa: BLE001 (then Ray's own count stands)
                log.warning("draining nodes not read: %s", e)
                return
            if fit is not None and max(1, min_workers) <= fit < resize_decision.num_workers:
                log.info(
                    "%d workers fit on nodes that are not draining (asked %d)",
                    fit, resize_decision.num_workers,
                )  # fmt: skip
                resize_decision.num_workers = fit

    return Recovery()


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
