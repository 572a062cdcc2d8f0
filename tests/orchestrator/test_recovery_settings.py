"""Settings that make an elastic run recover fast after a node loss
(docs/ray.md, "Recovery time"): the worker-group start timeout the driver hands to Ray
Train, its validation, and the GCS health-check settings shared by the local cluster and
the cluster files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.cluster.local import HEALTH_CHECK_ENV
from orchestrator.config import ConfigError, load
from orchestrator.recipes import find_recipe
from orchestrator.train.driver import train_env

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _cfg(*overrides: str):
    return load(find_recipe("tiny_cpu"), ["data.train_uri=/tmp/shards", *overrides])


POLL = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"


def test_elastic_run_gets_the_configured_worker_group_start_timeout():
    elastic = ("scaling.min_workers=1", "scaling.max_workers=2")
    assert train_env(_cfg(*elastic)) == {TIMEOUT: "5", POLL: "1"}
    env = train_env(_cfg(*elastic, "scaling.worker_group_start_timeout_s=7.5"))
    assert env[TIMEOUT] == "7.5"


def test_fixed_size_run_keeps_rays_timeout():
    fixed = ("scaling.min_workers=2", "scaling.max_workers=2")
    assert train_env(_cfg(*fixed, "scaling.worker_group_start_timeout_s=3")) == {POLL: "1"}


def test_every_run_polls_for_draining_nodes_as_configured():
    assert train_env(_cfg("train.preemption_poll_interval_s=0.5"))[POLL] == "0.5"
    with pytest.raises(ConfigError, match="train.preemption_poll_interval_s"):
        _cfg("train.preemption_poll_interval_s=0")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_start_timeout_is_refused_at_validation(value):
    with pytest.raises(ConfigError, match="scaling.worker_group_start_timeout_s"):
        _cfg(f"scaling.worker_group_start_timeout_s={value}")


def _assignments(command: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in command.split() if tok.startswith("RAY_health"))


@pytest.mark.parametrize("name", ["aws-spot.yaml", "gcp-tpu.yaml"])
def test_launcher_head_starts_with_the_local_clusters_health_checks(name):
    doc = yaml.safe_load((ROOT / "cluster" / name).read_text())
    head = next(c for c in doc["head_start_ray_commands"] if "ray start --head" in c)
    assert _assignments(head) == HEALTH_CHECK_ENV


@pytest.mark.parametrize("name", ["ray-cluster.tips.yaml", "ray-job.tips-b14.yaml"])
def test_kuberay_head_has_the_local_clusters_health_checks(name):
    doc = yaml.safe_load((ROOT / "cluster/kuberay" / name).read_text())
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    env = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    found = {e["name"]: e["value"] for e in env if e["name"].startswith("RAY_health")}
    assert found == HEALTH_CHECK_ENV
