"""Fixtures for cluster tests: local multi-node Ray clusters that always come down."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator

import pytest

from orchestrator.cluster.local import LocalCluster, NodeSpec


@pytest.fixture
def local_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """``local_cluster(head, workers)`` starts a uniquely named cluster; all are stopped
    (only their own processes) and their directories removed at teardown, even when the
    test fails."""
    started: list[LocalCluster] = []

    def start(head: NodeSpec, workers: list[NodeSpec], **kwargs: object) -> LocalCluster:
        cluster = LocalCluster(f"t{os.getpid()}-{uuid.uuid4().hex[:6]}")
        started.append(cluster)
        return cluster.up(head, workers, **kwargs)

    yield start
    for cluster in started:
        cluster.down()
        shutil.rmtree(cluster.root, ignore_errors=True)  # node logs and session dirs
