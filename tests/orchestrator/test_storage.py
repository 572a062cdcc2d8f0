"""storage.py: local paths and a real S3 endpoint (moto server) through the same code path."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from orchestrator import storage as st


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert st.normalize_uri("runs/x") == str(tmp_path / "runs" / "x")
    assert st.normalize_uri(f"file://{tmp_path}/a") == str(tmp_path / "a")
    assert st.normalize_uri("s3://bucket/prefix/") == "s3://bucket/prefix"
    fs, path = st.filesystem("data")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "data")


def test_local_write_read_list(tmp_path):
    st.write_text(str(tmp_path / "a" / "b.txt"), "hello")
    st.write_bytes(str(tmp_path / "a" / "c.bin"), b"\x00\x01")
    assert st.read_text(str(tmp_path / "a" / "b.txt")) == "hello"
    files = st.list_files(str(tmp_path))
    assert [f.uri.rsplit("/", 1)[-1] for f in files] == ["b.txt", "c.bin"]
    assert [f.size for f in files] == [5, 2]
    assert st.list_files(str(tmp_path), suffixes=(".bin",))[0].size == 2
    with pytest.raises(FileNotFoundError, match="nope"):
        st.list_files(str(tmp_path / "nope"))


def test_s3_settings_from_config_then_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert st.s3_settings(None) == st.S3Settings("http://127.0.0.1:1", "eu-west-1")
    cfg = SimpleNamespace(endpoint_url="http://localhost:9000", region="us-west-2")
    assert st.s3_settings(cfg) == st.S3Settings("http://localhost:9000", "us-west-2")
    with pytest.raises(ValueError, match="bucket name"):
        st.filesystem("s3://ab/x")


def test_s3_pyarrow_and_boto3_see_the_same_objects(s3_bucket):
    uri = f"{s3_bucket}/dir/obj.json"
    st.write_text(uri, json.dumps({"a": 1}))
    assert json.loads(st.read_text(uri)) == {"a": 1}
    assert st.exists(uri) and not st.exists(f"{s3_bucket}/dir/missing")
    bucket = s3_bucket[len("s3://") :]
    body = st.s3_client().get_object(Bucket=bucket, Key="dir/obj.json")["Body"].read()
    assert json.loads(body) == {"a": 1}
    st.s3_client().put_object(Bucket=bucket, Key="dir/sub/x.bin", Body=b"123")
    files = st.list_files(f"{s3_bucket}/dir")
    assert [f.uri for f in files] == [f"{s3_bucket}/dir/obj.json", f"{s3_bucket}/dir/sub/x.bin"]
    assert files[1].size == 3
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


def test_train_storage(tmp_path, s3_bucket):
    path, fs = st.train_storage(str(tmp_path / "runs"))
    assert path == str(tmp_path / "runs") and fs is None
    path, fs = st.train_storage(f"{s3_bucket}/runs")
    assert path == f"{s3_bucket[5:]}/runs" and isinstance(fs, pafs.S3FileSystem)
