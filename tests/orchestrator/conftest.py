"""Fixtures for orchestrator tests: a real S3 endpoint, synthetic shards, a small Ray runtime.

* ``s3_endpoint`` (session): moto's S3 HTTP server on 127.0.0.1 at a free port, with
  ``AWS_ENDPOINT_URL`` and fake credentials in the environment, so plain ``s3://`` URIs
  reach it through boto3 and pyarrow exactly as they would reach AWS or MinIO.
* ``s3_bucket``: a fresh bucket on that endpoint, as ``s3://name``.
* ``synth_data`` / ``synth_wds`` (session): tiny synthetic shard sets (Parquet / WebDataset).
* ``data_cfg``: a real, validated ``TipsConfig`` (tiny recipe) pointed at any shard URI.
* ``ray_data_runtime`` (module; tests/orchestrator/data/ shares one per package):
  ``ray.init(num_cpus=2)`` with a 200 MiB object store and Ray Data progress bars off;
  started after the S3 environment so workers inherit it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.recipes import RECIPES_DIR

RECIPES = RECIPES_DIR
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    from orchestrator.storage import s3_client

    name = f"tips-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/train`` (96 records, 3 shards of 2 row groups) and ``root/eval`` (16)."""
    from orchestrator.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(str(root), n=96, seed=3, image_size=48, shard_size=32, n_eval=16)
    return root


@pytest.fixture(scope="session")
def synth_wds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synth_wds")
    write_synthetic(
        str(root), n=48, seed=3, image_size=48, shard_size=16, n_eval=16, format="webdataset"
    )
    return root


@pytest.fixture(scope="session")
def data_cfg() -> Callable[..., Any]:
    """``data_cfg(train_uri, *overrides)`` -> a validated tiny-recipe config."""
    from orchestrator import config as config_lib

    def make(train_uri: str, *overrides: str) -> Any:
        base = [
            f"data.train_uri={train_uri}",
            "augment.global_crop_size=32",
            "augment.local_crop_size=16",
            "augment.num_local_crops=2",
            "model.max_text_len=16",
            "data.map_batch_size=8",
            "data.num_cpus_per_map_task=1",
        ]
        return config_lib.load(RECIPES / "tiny_cpu.yaml", [*base, *overrides])

    return make


def ray_runtime() -> Iterator[None]:
    """``ray.init(num_cpus=2)`` for tests, quiet Ray Data; shut down afterwards."""
    import ray
    import ray.data

    if ray.is_initialized():  # a module before us left one running
        ray.shutdown()
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_data_runtime(s3_endpoint: str) -> Iterator[None]:
    yield from ray_runtime()
