"""The workers' side of a drain (orchestrator/train/preemption.py): when the report of the
drain checkpoint asks the controller for the early restart. The restart itself is exercised
on a real cluster (tests/integration/test_cluster_train.py, benchmarks/elastic_recovery.py)."""

from __future__ import annotations

import pytest

from orchestrator.config import load
from orchestrator.recipes import find_recipe
from orchestrator.train.preemption import RESTART_KEY, PreemptionWatch, restart_marker


def _watch(*overrides: str, world_size: int = 2, preempted: tuple[int, ...] = (1,)):
    cfg = load(find_recipe("tiny_cpu"), ["data.train_uri=/tmp/shards", *overrides])
    watch = PreemptionWatch(cfg, rank=0, world_size=world_size)
    watch.preempted_ranks = list(preempted)  # what get_preemption_info() said
    return watch


ELASTIC = ("scaling.min_workers=1", "scaling.max_workers=2")


def test_elastic_run_asks_for_the_restart_on_the_first_drain_checkpoint_only():
    watch = _watch(*ELASTIC)
    assert restart_marker(watch, preempted=True) == {RESTART_KEY: 1.0}
    assert restart_marker(watch, preempted=False) == {}  # a periodic checkpoint
    watch.saved(step=7, seconds=0.1, restarting=True)
    assert restart_marker(watch, preempted=True) == {}  # the near-deadline one


@pytest.mark.parametrize(
    "overrides,world_size,preempted",
    [
        ((*ELASTIC, "train.preemption_restart=deadline"), 2, (1,)),  # Ray's behaviour asked
        (("scaling.min_workers=2", "scaling.max_workers=2"), 2, (1,)),  # fixed size
        (("scaling.min_workers=2", "scaling.max_workers=3"), 2, (1,)),  # 1 left < min 2
        (ELASTIC, 2, (0, 1)),  # every rank is on drained nodes: nothing to restart on
    ],
)
def test_no_early_restart_where_the_group_cannot_go_on_without_the_node(
    overrides, world_size, preempted
):
    watch = _watch(*overrides, world_size=world_size, preempted=preempted)
    assert restart_marker(watch, preempted=True) == {}


def test_without_a_deadline_the_watch_uses_rays_default():
    watch = _watch(*ELASTIC)
    watch.detected_at, watch.deadline = 1000.0, None
    assert watch._deadline() == 1120.0  # DEFAULT_PREEMPTION_DEADLINE_S in Ray Train
    watch.deadline = 1050.0
    assert watch._deadline() == 1050.0
