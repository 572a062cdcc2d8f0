"""A node drain (spot preemption) seen from the workers.

Ray Train's PreemptionWatcher finds a node being drained for preemption and
``ray.train.get_preemption_info()`` then returns its deadline and the ranks on it
(docs/ray.md, "Preemption"). What the workers do about it:

1. at the next check (every ``train.preemption_check_every_steps`` steps; the call is a
   barrier) every rank joins one checkpoint at once, waited for even when checkpoints are
   asynchronous;
2. ``train.preemption_restart=checkpoint`` (default) on an elastic run that still has
   ``scaling.min_workers`` without the drained ranks: the report of that checkpoint carries
   ``RESTART_KEY``; the controller callback (orchestrator/ray_compat.py
   ``recovery_callback``) then restarts the group at once, on the nodes that are not
   draining, and the workers wait for it instead of training steps that would be redone.
   The run trains on without the drained node before its deadline: the restart's cost is
   paid inside the notice, not after the node is gone (README, "Elastic recovery");
3. otherwise (``deadline``, a fixed-size run, or one already at its minimum) the group
   trains on and checkpoints again ``train.preemption_margin_s`` plus twice the first
   checkpoint's duration before the deadline; Ray restarts it when the deadline passes.
   A preemption then loses about the margin, not a checkpoint interval.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from orchestrator import config as config_lib

logger = logging.getLogger(__name__)

# metric of the report that carries the preemption checkpoint: "restart the group now"
RESTART_KEY = "preemption/restart_now"
# how long workers wait for that restart past the deadline (Ray's own default deadline
# when the drain named none: DEFAULT_PREEMPTION_DEADLINE_S, 120 s) before training on
WAIT_PAST_DEADLINE_S = 30.0
DEFAULT_DEADLINE_S = 120.0


def agreed(flag: bool, device: torch.device, distributed: bool) -> bool:
    """Rank 0's ``flag`` on every rank (decisions that lead to a collective call)."""
    if not distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class PreemptionWatch:
    """One checkpoint at the drain notice; then an early restart or a second checkpoint
    just before the deadline (module doc)."""

    def __init__(self, cfg: config_lib.TipsConfig, rank: int, world_size: int) -> None:
        self.every = max(1, cfg.train.preemption_check_every_steps)
        self.margin_s = cfg.train.preemption_margin_s
        self.mode = cfg.train.preemption_restart
        self.min_workers = cfg.scaling.min_workers
        self.elastic = cfg.scaling.min_workers < cfg.scaling.max_workers
        self.rank, self.world_size = rank, world_size
        self.saved_once = False
        self.deadline: float | None = None  # unix seconds when the drained node goes
        self.preempted_ranks: list[int] = []
        self.detected_at = 0.0
        self.saved_before_deadline = False
        self.checkpoint_s = 0.0  # how long the just-in-time checkpoint took

    def due(self, step: int, device: torch.device, distributed: bool) -> bool:
        """Whether this step's end takes a preemption checkpoint (the same on every rank)."""
        if step % self.every == 0 and not self.saved_once:
            info = ray.train.get_preemption_info()
            if info is not None:
                self.detected_at = time.time()
                self.deadline = info.deadline_ms / 1000.0 if info.deadline_ms else None
                self.preempted_ranks = list(info.preempted_ranks)
            return info is not None
        if self.saved_once and not self.saved_before_deadline:
            margin = self.margin_s + 2 * self.checkpoint_s
            near = agreed(time.time() >= self._deadline() - margin, device, distributed)
            self.saved_before_deadline = near
            return near
        return False

    def _deadline(self) -> float:
        return self.deadline or self.detected_at + DEFAULT_DEADLINE_S

    def restart_now(self) -> bool:
        """After the first preemption checkpoint: ask for the early restart? Only where the
        group left after the drained ranks is still a group (module doc, 2)."""
        survivors = self.world_size - len(self.preempted_ranks)
        return (
            not self.saved_once
            and self.mode == "checkpoint"
            and self.elastic
            and survivors >= max(1, self.min_workers)
        )

    def saved(self, step: int, seconds: float, restarting: bool) -> None:
        self.checkpoint_s = max(self.checkpoint_s, seconds)
        if self.rank == 0 and not self.saved_once:
            left = f"{self._deadline() - time.time():.0f} s"
            then = "restarting without it" if restarting else "training on"
            logger.warning(
                "node drain detected: checkpoint at step %d saved (deadline in %s), %s",
                step, left, then,
            )  # fmt: skip
        elif self.rank == 0:
            logger.warning("drain deadline near: checkpoint at step %d saved", step)
        self.saved_once = True

    def wait_for_restart(self) -> None:
        """Idle until the controller tears this group down for the early restart (steps
        trained now would be redone). Past the deadline with no restart (no controller
        callback: Ray Train local mode, an older driver) training goes on, as with
        ``deadline``: Ray then restarts the group itself."""
        until = self._deadline() + WAIT_PAST_DEADLINE_S
        while time.time() < until:
            time.sleep(0.2)
        self.saved_before_deadline = True
        if self.rank == 0:
            logger.warning("no restart came by the drain deadline: training on")


def restart_marker(watch: PreemptionWatch, preempted: bool) -> dict[str, Any]:
    """The metric that asks the controller for the early restart, on the report of the
    first preemption checkpoint only."""
    return {RESTART_KEY: 1.0} if preempted and watch.restart_now() else {}
