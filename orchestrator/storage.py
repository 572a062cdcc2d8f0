"""Local paths and ``s3://bucket/prefix`` URIs: filesystems, small I/O helpers, run storage.

Contract:
    filesystem(uri, storage=None) -> (pyarrow.fs.FileSystem, path)   path as that fs takes it
    normalize_uri(uri) -> str            local paths made absolute (Ray workers chdir), s3 kept
    s3_client(storage=None) -> boto3 S3 client with the same endpoint and region
    list_files / read_bytes / write_bytes / read_text / write_text / exists / join_uri
    train_storage(uri, storage) -> (storage_path, storage_filesystem) for ray.train.RunConfig
    checkpoint_from_uri(uri, storage=None) -> ray.train.Checkpoint

``storage`` is ``cfg.storage`` (anything with ``endpoint_url`` and ``region``) or None. The
endpoint falls back to ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the region to
``AWS_REGION`` / ``AWS_DEFAULT_REGION``; credentials always come from the standard AWS chain
(environment, profile, instance role), so the same code path talks to AWS, MinIO or a local
moto server (docs/design.md, "Real components in tests").
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

S3_SCHEMES = ("s3://", "s3a://")


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 connection settings (no credentials: those stay in the AWS chain)."""

    endpoint_url: str | None  # e.g. "http://127.0.0.1:9000"; None = AWS
    region: str


@dataclass(frozen=True)
class FileEntry:
    uri: str  # full URI (absolute local path or s3://bucket/key)
    size: int  # bytes


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEMES)


def s3_settings(storage: Any | None = None) -> S3Settings:
    """Endpoint and region from ``storage`` (cfg.storage), else the standard AWS variables."""
    endpoint = getattr(storage, "endpoint_url", None) or (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    )
    region = (
        getattr(storage, "region", None)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    return S3Settings(endpoint_url=endpoint, region=region)


@functools.lru_cache(maxsize=16)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": settings.region}
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        if not parsed.scheme or not parsed.netloc:
            raise ValueError(
                f"S3 endpoint {settings.endpoint_url!r} must look like http://host:port"
            )
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**kwargs)


def normalize_uri(uri: str) -> str:
    """``s3://`` URIs unchanged (minus a trailing slash); local paths absolute, no ``file://``."""
    if is_s3(uri):
        return "s3://" + uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().resolve())


def filesystem(uri: str, storage: Any | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path that filesystem expects.

    Args:
        uri: local path, ``file://`` path or ``s3://bucket/key``.
        storage: ``cfg.storage`` or None (environment only).

    Returns:
        ``(fs, path)``: ``path`` is ``bucket/key`` for S3 and an absolute path locally.
    """
    if is_s3(uri):
        rest = uri.split("://", 1)[1].strip("/")
        if not rest or len(rest.split("/", 1)[0]) < 3:
            raise ValueError(f"{uri!r}: an S3 URI needs a bucket name of 3+ characters")
        return _s3_filesystem(s3_settings(storage)), rest
    return pafs.LocalFileSystem(), normalize_uri(uri)


def s3_client(storage: Any | None = None) -> Any:
    """A boto3 S3 client with the same endpoint and region as ``filesystem``."""
    import boto3

    settings = s3_settings(storage)
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region)


def join_uri(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI with ``/``."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _to_uri(uri: str, fs_path: str) -> str:
    return f"s3://{fs_path}" if is_s3(uri) else fs_path


def list_files(
    uri: str, storage: Any | None = None, suffixes: tuple[str, ...] | None = None
) -> list[FileEntry]:
    """Files under ``uri`` (recursive), sorted by URI; ``uri`` may also name one file.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
    """
    fs, path = filesystem(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = [
        FileEntry(_to_uri(uri, i.path), int(i.size or 0))
        for i in infos
        if i.type == pafs.FileType.File and (suffixes is None or i.path.endswith(suffixes))
    ]
    return sorted(out, key=lambda e: e.uri)


def exists(uri: str, storage: Any | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: Any | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, storage: Any | None = None) -> None:
    """Write ``data`` to ``uri``, creating parent directories (a no-op on S3)."""
    fs, path = filesystem(uri, storage)
    if not is_s3(uri):
        fs.create_dir(str(Path(path).parent), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_text(uri: str, storage: Any | None = None) -> str:
    return read_bytes(uri, storage).decode("utf-8")


def write_text(uri: str, text: str, storage: Any | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage)


def makedirs(uri: str, storage: Any | None = None) -> None:
    """Create a local directory (S3 has no directories: nothing to do)."""
    if not is_s3(uri):
        Path(normalize_uri(uri)).mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- run storage


def train_storage(uri: str, storage: Any | None = None) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    Local: an absolute path and None (Ray's default local filesystem). S3: ``bucket/prefix``
    and our S3FileSystem, so Ray uses the same endpoint override (docs/ray.md,
    "Storage and S3").
    """
    if is_s3(uri):
        fs, path = filesystem(uri, storage)
        return path, fs
    return normalize_uri(uri), None


def checkpoint_from_uri(uri: str, storage: Any | None = None) -> Any:
    """A ``ray.train.Checkpoint`` for a checkpoint directory on local disk or S3."""
    import ray.train

    fs, path = filesystem(uri, storage)
    return ray.train.Checkpoint(path=path, filesystem=fs)
