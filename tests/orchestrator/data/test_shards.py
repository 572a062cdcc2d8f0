"""shards.py: real Parquet and tar files, schema errors, manifests, truncation, S3."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.data.shards import (
    BadRecord,
    ShardError,
    ShardWriter,
    iter_records,
    iter_unit,
    list_shards,
)


def _jpeg(seed: int, size: int = 24) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _records(n: int) -> list[dict]:
    return [
        {
            "key": f"rec-{i:03d}",
            "image": _jpeg(i),
            "alt_text": f"alt {i}",
            "captions": [{"kind": "short", "text": f"s{i}"}, {"kind": "long", "text": f"l{i}"}],
            "regions": [{"box": [0.0, 0.1, 0.5, 0.75], "text": f"r{i}"}],
            "meta": json.dumps({"i": i}),
        }
        for i in range(n)
    ]


def _write(uri: str, fmt: str, records: list[dict], **kw) -> list:
    with ShardWriter(uri, format=fmt, shard_size=kw.pop("shard_size", 4), **kw) as w:
        for r in records:
            w.write(r)
    return w.shards


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_round_trip(tmp_path, fmt):
    records = _records(10)
    shards = _write(str(tmp_path), fmt, records, row_group_size=3)
    assert [s.num_rows for s in shards] == [4, 4, 2]
    if fmt == "parquet":
        assert shards[0].row_groups == (3, 1)
        assert pq.ParquetFile(shards[0].uri).metadata.num_row_groups == 2
    else:
        names = tarfile.open(shards[0].uri).getnames()
        assert names[:3] == ["rec-000.jpg", "rec-000.txt", "rec-000.json"]
    back = list(iter_records(str(tmp_path)))
    assert len(back) == 10 and not any(isinstance(r, BadRecord) for r in back)
    for r, b in zip(records, back):
        assert b["key"] == r["key"] and b["image"] == r["image"] and b["alt_text"] == r["alt_text"]
        assert b["captions"] == r["captions"]
        assert np.allclose([list(x["box"]) for x in b["regions"]], [[0.0, 0.1, 0.5, 0.75]])
        assert json.loads(b["meta"]) == {"i": int(r["key"][-3:])}


def test_writer_refuses_to_mix_sets_unless_overwrite(tmp_path):
    _write(str(tmp_path), "parquet", _records(6))
    with pytest.raises(ShardError, match="already holds"):
        ShardWriter(str(tmp_path))
    _write(str(tmp_path), "parquet", _records(2), overwrite=True)
    assert list_shards(str(tmp_path)).num_rows == 2


def test_schema_errors_name_file_and_column(tmp_path):
    table = pa.table({"key": ["a"], "image": [b"x"], "alt_text": ["t"]})
    pq.write_table(table, tmp_path / "missing.parquet")
    with pytest.raises(ShardError, match=r"missing\.parquet: missing column 'captions'"):
        list_shards(str(tmp_path))
    (tmp_path / "missing.parquet").unlink()
    table = pa.table(
        {
            "key": ["a"],
            "image": ["not bytes"],
            "alt_text": ["t"],
            "captions": [[{"kind": "short", "text": "x"}]],
        }
    )
    pq.write_table(table, tmp_path / "typed.parquet")
    with pytest.raises(ShardError, match=r"typed\.parquet: column 'image' has type string"):
        list_shards(str(tmp_path))


def test_record_errors_name_the_column(tmp_path):
    with pytest.raises(ShardError, match="'captions' must be a list"):
        _write(str(tmp_path), "parquet", [{**_records(1)[0], "captions": ["bare string"]}])
    with pytest.raises(ShardError, match="not allowed in WebDataset"):
        _write(str(tmp_path / "w"), "webdataset", [{**_records(1)[0], "key": "a.b"}])


def test_manifest_is_used_and_ignored_when_stale(tmp_path):
    shards = _write(str(tmp_path), "parquet", _records(8))
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert manifest["num_rows"] == 8 and len(manifest["shards"]) == 2
    manifest["shards"][0]["row_groups"] = [99]  # a lie the size check cannot catch
    (tmp_path / "_manifest.json").write_text(json.dumps(manifest))
    assert list_shards(str(tmp_path)).shards[0].num_rows == 99
    manifest["shards"][0]["size"] += 1  # stale: the file is opened instead
    (tmp_path / "_manifest.json").write_text(json.dumps(manifest))
    assert list_shards(str(tmp_path)).shards[0].num_rows == shards[0].num_rows


def test_truncated_parquet_is_reported_by_name(tmp_path):
    shards = _write(str(tmp_path), "parquet", _records(8))
    (tmp_path / "_manifest.json").unlink()
    data = open(shards[1].uri, "rb").read()
    open(shards[1].uri, "wb").write(data[: len(data) // 2])
    listing = list_shards(str(tmp_path))
    assert [s.uri for s in listing.shards] == [shards[0].uri]
    assert listing.unreadable[0][0] == shards[1].uri


@pytest.mark.parametrize("where", ["mid_image", "member_boundary", "mid_header"])
def test_truncated_tar_keeps_its_complete_records(tmp_path, where):
    shards = _write(str(tmp_path), "webdataset", _records(4), shard_size=4)
    (tmp_path / "_manifest.json").unlink()
    members = tarfile.open(shards[0].uri).getmembers()
    cut = {
        "mid_image": members[6].offset_data + 100,  # third record's image
        "member_boundary": members[-1].offset,  # last record loses its json
        "mid_header": members[-1].offset + 200,
    }[where]
    data = open(shards[0].uri, "rb").read()
    open(shards[0].uri, "wb").write(data[:cut])
    info = list_shards(str(tmp_path)).shards[0]
    items = list(iter_unit(info, 0))  # every listed record is accounted for
    good = [r for r in items if not isinstance(r, BadRecord)]
    bad = [r for r in items if isinstance(r, BadRecord)]
    assert len(good) < info.num_rows and bad and bad[-1].reason == "unreadable"
    assert sum(b.count for b in bad) + len(good) == info.num_rows
    for g in good:  # a kept record is whole
        assert g["captions"] and g["alt_text"] and g["image"][-2:] == b"\xff\xd9"


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_s3_round_trip(s3_bucket, fmt):
    uri = f"{s3_bucket}/shards/{fmt}"
    _write(uri, fmt, _records(6))
    listing = list_shards(uri)
    assert listing.num_rows == 6 and listing.shards[0].uri.startswith(f"{uri}/shard-00000")
    keys = [r["key"] for r in iter_records(uri)]
    assert keys == [f"rec-{i:03d}" for i in range(6)]
