"""orchestrator/ray_compat.py: every private Ray API it uses still exists with the parameters
and fields it relies on, and no other file imports a private Ray or torch API.

Fast and without starting Ray: a Ray upgrade that moves one of them fails here, naming the
API, instead of in a multi-node cluster test or on a spot node. The public replacements of
former private APIs (the pipeline's unit-id read, the XLA rendezvous address, Adafactor's
step dtype) are checked against what they replaced.
"""

from __future__ import annotations

import importlib
import inspect
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import ray_compat

ROOT = Path(__file__).resolve().parents[1]
CHECKED = f"(checked against Ray {ray_compat.RAY_VERSION_CHECKED})"


def _resolve(module: str, attr: str) -> object:
    try:
        obj: object = importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"private Ray module {module} is gone {CHECKED}: {e}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            pytest.fail(f"private Ray API {module}.{attr} is gone {CHECKED}")
        obj = getattr(obj, part)
    return obj


def _params(module: str, attr: str) -> list[str]:
    fn = _resolve(module, attr)
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as e:
        pytest.fail(f"cannot read the signature of {module}.{attr} {CHECKED}: {e}")


@pytest.mark.parametrize("module,attr", ray_compat.PRIVATE_APIS, ids=".".join)
def test_each_private_api_still_exists(module, attr):
    _resolve(module, attr)


@pytest.mark.parametrize(
    "module,attr,expected",
    [
        # GcsClient wraps InnerGcsClient; ray_compat calls these with these names and order.
        ("ray._raylet", "InnerGcsClient.get_all_node_info", ["self", "timeout", "state_filter"]),
        (
            "ray._raylet",
            "InnerGcsClient.drain_node",
            ["self", "node_id", "reason", "reason_message", "deadline_timestamp_ms"],
        ),
        ("ray._raylet", "InnerGcsClient.get_draining_nodes", ["self", "timeout"]),
        ("ray._private.services", "canonicalize_bootstrap_address_or_die", ["addr", "temp_dir"]),
        (
            ray_compat.COORDINATOR_MODULE,
            "_AutoscalingCoordinatorActor.get_reserved_resources",
            ["self", "requester_id", "recompute"],
        ),
        (
            ray_compat.CALLBACK_MODULE,
            "ControllerCallback.before_controller_execute_failure_decision",
            ["self", "failure_decision"],
        ),
        (
            ray_compat.CALLBACK_MODULE,
            "ControllerCallback.before_controller_execute_resize_decision",
            ["self", "resize_decision"],
        ),
        (
            ray_compat.CALLBACK_MODULE,
            "ControllerCallback.after_controller_start",
            ["self", "train_run_context"],
        ),
        (
            ray_compat.CALLBACK_MODULE,
            "ControllerCallback.after_controller_state_update",
            ["self", "previous_state", "current_state"],
        ),
        (
            ray_compat.CALLBACK_MODULE,
            "ReportCallback.after_report",
            ["self", "training_report", "metrics"],
        ),
        (
            "torch.distributed.checkpoint.state_dict_loader",
            "_load_state_dict",
            ["state_dict", "storage_reader", "no_dist", "planner"],
        ),
    ],
)
def test_private_functions_take_the_parameters_ray_compat_passes(module, attr, expected):
    params = _params(module, attr)
    missing = [p for p in expected if p not in params]
    assert not missing, f"{module}.{attr} lost parameters {missing} {CHECKED}; has {params}"
    positional = [p for p in params if p in expected]
    assert positional == expected, f"{module}.{attr} reordered its parameters {CHECKED}"


def test_autoscaling_coordinator_actor_has_the_name_ray_compat_looks_up():
    source = inspect.getsource(
        _resolve(ray_compat.COORDINATOR_MODULE, "get_or_create_autoscaling_coordinator")
    )
    name, namespace = ray_compat.COORDINATOR_ACTOR
    assert f'name="{name}"' in source and f'namespace="{namespace}"' in source, CHECKED


def test_controller_reads_the_preemption_grace_recovery_callback_changes():
    """recovery_callback ends a drain's preempting state early by lowering the
    ``preemption_grace_s`` of the controller's own RunConfig: the controller must keep that
    object (not a copy) and read the field on every poll of the preempting state, and the
    field must stay writable."""
    import dataclasses

    from ray.train import FailureConfig

    controller = _resolve(ray_compat.CONTROLLER_MODULE, "TrainController")
    init = inspect.getsource(controller.__init__)
    assert "self._run_config = self._train_run_context.run_config" in init, CHECKED
    handle = inspect.getsource(controller._handle_preempting_state)
    assert "self._run_config.failure_config.preemption_grace_s" in handle, CHECKED
    resize = inspect.getsource(controller._execute_resize_decision)
    hook = resize.index('"before_controller_execute_resize_decision"')
    assert resize.index("num_workers=decision.num_workers") > hook, CHECKED
    config = FailureConfig()
    assert "preemption_grace_s" in {f.name for f in dataclasses.fields(config)}, CHECKED
    config.preemption_grace_s = -1.0  # not frozen
    assert config.preemption_grace_s == -1.0


def test_recovery_callback_restarts_only_for_a_checkpointed_drain_report():
    from ray.train import Checkpoint, FailureConfig, RunConfig

    callback = ray_compat.recovery_callback(min_workers=1, restart_key="restart")
    run_config = RunConfig(failure_config=FailureConfig(preemption_grace_s=3.0))

    class Context:  # the one attribute the hook reads of a TrainRunContext
        pass

    ctx = Context()
    ctx.run_config = run_config
    callback.after_controller_start(ctx)

    class Report:
        def __init__(self, checkpoint):
            self.checkpoint = checkpoint

    ckpt = Checkpoint("/tmp/none")
    callback.after_report(Report(ckpt), [{"loss": 1.0}])
    assert run_config.failure_config.preemption_grace_s == 3.0
    callback.after_report(Report(None), [{"restart": 1.0}])  # no checkpoint in it
    assert run_config.failure_config.preemption_grace_s == 3.0
    callback.after_report(Report(ckpt), [{"restart": 1.0}, {"restart": 1.0}])
    assert run_config.failure_config.preemption_grace_s < -3600

    class PreemptingState:
        pass

    class RestartingState:
        pass

    callback.after_controller_state_update(RestartingState(), PreemptingState())
    assert run_config.failure_config.preemption_grace_s < -3600  # still this drain
    callback.after_controller_state_update(PreemptingState(), RestartingState())
    assert run_config.failure_config.preemption_grace_s == 3.0  # the next drain waits again


def test_gcs_client_wraps_the_inner_client():
    from ray._raylet import GcsClient, InnerGcsClient

    assert inspect.isclass(GcsClient) and inspect.isclass(InnerGcsClient), CHECKED
    doc = GcsClient.__doc__ or ""
    assert "InnerGcsClient" in doc or hasattr(GcsClient, "drain_node"), (
        f"ray._raylet.GcsClient no longer forwards to InnerGcsClient {CHECKED}"
    )


def test_node_info_and_drain_reason_protobufs():
    from ray.core.generated import autoscaler_pb2, gcs_pb2

    fields = {f.name for f in gcs_pb2.GcsNodeInfo.DESCRIPTOR.fields}
    used = {"node_id", "node_manager_address", "temp_dir", "state", "labels"}
    assert used <= fields, f"gcs_pb2.GcsNodeInfo lost fields {used - fields} {CHECKED}"
    states = gcs_pb2.GcsNodeInfo.GcsNodeState
    assert {"ALIVE", "DEAD"} <= set(states.keys()), f"GcsNodeState changed {CHECKED}"
    reasons = autoscaler_pb2.DrainNodeReason
    assert ray_compat.PREEMPTION_REASON in reasons.keys(), f"DrainNodeReason changed {CHECKED}"


class _FakeGcs:
    """Answers like ``ray._raylet.GcsClient``, with real ``gcs_pb2.GcsNodeInfo`` records."""

    def __init__(self) -> None:
        from ray.core.generated import gcs_pb2

        state = gcs_pb2.GcsNodeInfo.GcsNodeState
        self.infos = {
            i: gcs_pb2.GcsNodeInfo(
                node_id=bytes([i]) * 28,
                node_manager_address="10.0.0.1",
                temp_dir=f"/tmp/n{i}",
                state=state.ALIVE if i != 2 else state.DEAD,
                labels={"tips.io/node-kind": "data"} if i == 1 else {},
            )
            for i in (1, 2)
        }
        self.calls: list[tuple[str, tuple, dict]] = []

    def get_all_node_info(self, timeout=None, node_selectors=None, state_filter=None):
        self.calls.append(("get_all_node_info", (), {"timeout": timeout, "state": state_filter}))
        return {
            k: v for k, v in self.infos.items() if state_filter is None or v.state == state_filter
        }

    def drain_node(self, *args):
        self.calls.append(("drain_node", args, {}))
        return True, ""

    def get_draining_nodes(self, timeout=None):
        return {"ab" * 28: 123}


def test_gcs_nodes_reads_node_records():
    gcs = _FakeGcs()
    nodes = ray_compat.gcs_nodes(gcs)
    assert [n.node_id for n in nodes] == ["01" * 28, "02" * 28]
    assert [n.alive for n in nodes] == [True, False]
    assert nodes[0] == ray_compat.GcsNode(
        "01" * 28, "10.0.0.1", "/tmp/n1", True, {"tips.io/node-kind": "data"}
    )
    assert [n.node_id for n in ray_compat.gcs_nodes(gcs, alive_only=True)] == ["01" * 28]


def test_drain_passes_the_preemption_reason_and_deadline():
    from ray.core.generated import autoscaler_pb2

    gcs = _FakeGcs()
    assert ray_compat.drain_node_for_preemption(gcs, "ab" * 28, "spot", 1234) == (True, "")
    preemption = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    assert gcs.calls == [("drain_node", ("ab" * 28, preemption, "spot", 1234), {})]
    assert ray_compat.draining_nodes(gcs) == {"ab" * 28: 123}


# ------------------------------------------------------------------ nowhere else

_PRIVATE_IMPORT = re.compile(
    r"^\s*(?:from|import)\s+(?:ray\.(?:\w+\.)*_\w+|ray\.core\.generated|ray\._\w+)"
    r"|^\s*from\s+(?:ray|torch)[\w.]*\s+import\s+(?:\(?\s*)_[a-z]"
    r"|\bray\.(?:\w+\.)*_(?:private|raylet|internal)\b"
)


def test_no_private_ray_import_outside_ray_compat():
    allowed = {ROOT / "orchestrator/ray_compat.py", Path(__file__).resolve()}
    found = []
    for top in ("orchestrator", "tips_model", "tests", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path in allowed:
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if _PRIVATE_IMPORT.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "private Ray/torch APIs outside orchestrator/ray_compat.py:\n" + "\n".join(
        found
    )


# ------------------------------------------------------------------ public replacements


@pytest.mark.parametrize(
    "n,parallelism", [(1, 1), (5, 5), (7, 3), (64, 2000), (4001, 2000), (6000, 2000)]
)
def test_unit_ids_read_tasks_are_rays_range_layout(n, parallelism):
    """orchestrator/data/pipeline.py's UnitIds: ids 0..n-1 in order, max(1, n // parallelism)
    per task (the last takes the rest), as Ray 2.60's range read; exact resume depends on it."""
    from orchestrator.data.pipeline import UnitIds

    tasks = UnitIds(n).get_read_tasks(parallelism)
    size = max(1, n // parallelism)
    assert len(tasks) == -(-n // size)
    blocks = [list(t()) for t in tasks]
    assert all(len(b) == 1 for b in blocks)  # one block per task
    ids = [b[0].column("id").to_numpy() for b in blocks]
    assert all(a.dtype == np.int64 for a in ids)
    assert [len(a) for a in ids] == [t.metadata.num_rows for t in tasks]
    assert all(len(a) == size for a in ids[:-1])
    np.testing.assert_array_equal(np.concatenate(ids), np.arange(n))
    assert UnitIds(n).estimate_inmemory_data_size() == sum(t.metadata.size_bytes for t in tasks)


def test_xla_rendezvous_address_is_this_node_and_a_free_port():
    import ray.util

    from orchestrator.train.xla import _address_and_port

    addr, port = _address_and_port()
    assert addr == ray.util.get_node_ip_address()
    assert 0 < port < 65536
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("", port))  # still free


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_adafactor_step_counter_dtype_is_torchs(default):
    from orchestrator.train.adafactor import Adafactor

    saved = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        dtypes = []
        for cls in (torch.optim.Adafactor, Adafactor):
            p = torch.nn.Parameter(torch.ones(4, 3))
            opt = cls([p], lr=1e-2)
            p.grad = torch.full_like(p, 0.5)
            opt.step()
            dtypes.append(opt.state[p]["step"].dtype)
    finally:
        torch.set_default_dtype(saved)
    assert dtypes[0] == dtypes[1] == default
