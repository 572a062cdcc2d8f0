"""Data tests share one Ray runtime for the whole package (Ray start and worker imports
dominate their run time); it is shut down before other test packages run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.orchestrator.conftest import ray_runtime


@pytest.fixture(scope="package")
def ray_data_runtime(s3_endpoint: str) -> Iterator[None]:
    yield from ray_runtime()
