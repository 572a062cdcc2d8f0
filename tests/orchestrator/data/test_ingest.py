"""`tips data ingest`: img2dataset output (WebDataset tars with their metadata Parquet beside,
and its Parquet mode) and Hugging Face-style Parquet, on disk and on moto's S3, as a Ray
Data job; every skipped record is counted by reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from orchestrator import storage as st
from orchestrator.cli.data import main as main_data
from orchestrator.data.ingest import Columns, ingest
from orchestrator.data.pack import inspect_shards
from orchestrator.data.shards import iter_records, list_shards


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(i).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_webdataset(root: Path, shards: int = 2, per_shard: int = 4) -> dict:
    """What ``img2dataset --output_format webdataset`` leaves: ``NNNNN.tar`` (KEY.jpg,
    KEY.txt, KEY.json), ``NNNNN.parquet`` (metadata, no image) and ``NNNNN_stats.json``.
    Key 000000001 has a cut JPEG, 000010002 no image member."""
    root.mkdir(parents=True)
    images = {}
    for s in range(shards):
        meta_rows = []
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                meta = {"url": f"http://img/{key}.jpg", "key": key, "status": "success",
                        "caption": f"caption {key}", "width": 28, "height": 20}  # fmt: skip
                meta_rows.append(meta)
                image = _jpeg(s * 100 + i)
                if key == "000000001":
                    image = image[: len(image) // 3]
                if key != "000010002":
                    _add(tar, f"{key}.jpg", image)
                    images[key] = image
                _add(tar, f"{key}.txt", f"caption {key}".encode())
                _add(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
        pq.write_table(pa.Table.from_pylist(meta_rows), root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text("{}")
    return images


def test_ingest_img2dataset_webdataset_and_resume(tmp_path, ray_data_runtime, capsys):
    src, out = tmp_path / "i2d", tmp_path / "shards"
    images = write_img2dataset_webdataset(src)
    assert main_data(["ingest", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 records in 2 shards" in printed, printed
    assert "corrupt_image=1" in printed and "missing_image=1" in printed
    records = list(iter_records(str(out)))
    assert [r["key"] for r in records] == [
        "000000000", "000000002", "000000003", "000010000", "000010001", "000010003",
    ]  # fmt: skip
    for r in records:
        assert r["image"] == images[r["key"]]
        assert r["alt_text"] == f"caption {r['key']}" and r["captions"] == []
        assert json.loads(r["meta"])["url"] == f"http://img/{r['key']}.jpg"
    report = inspect_shards(str(out))
    assert report["rows"] == 6 and report["decode_failures"] == 0
    assert json.loads((out / "_manifest.json").read_text())["num_rows"] == 6
    # a rerun publishes nothing again; a lost shard is redone alone
    first = out / "shard-00000.parquet"
    mtime = first.stat().st_mtime_ns
    (out / "shard-00001.parquet").unlink()
    again = ingest(str(src), str(out))
    assert (again.shards_skipped, again.shards_written, again.written) == (1, 1, 3)
    assert first.stat().st_mtime_ns == mtime and list_shards(str(out)).num_rows == 6


def test_ingest_hf_parquet_s3_with_column_mapping(s3_bucket, ray_data_runtime, capsys):
    """Hugging Face-style Parquet (image struct {bytes, path}) on S3 -> WebDataset on S3."""
    rows = [
        {"picture": {"bytes": _jpeg(i), "path": f"{i}.jpg"}, "sentence": f"text {i}", "uid": i}
        for i in range(5)
    ]
    rows[4]["picture"] = {"bytes": None, "path": "gone.jpg"}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=2)
    st.write_bytes(
        f"{s3_bucket}/hf/data/train-00000-of-00001.parquet", sink.getvalue().to_pybytes()
    )
    out = f"{s3_bucket}/shards"
    argv = ["ingest", f"{s3_bucket}/hf", "--out", out, "--format", "webdataset"]
    mapping = ["--image-column", "picture", "--text-column", "sentence", "--key-column", "uid"]
    assert main_data([*argv, *mapping]) == 0
    assert "missing_image=1" in capsys.readouterr().out
    records = list(iter_records(out))
    assert [(r["key"], r["alt_text"]) for r in records] == [(str(i), f"text {i}") for i in range(4)]
    assert [r["image"] for r in records] == [_jpeg(i) for i in range(4)]
    assert {s.format for s in list_shards(out).shards} == {"webdataset"}
    # without --text/--key-column, neither is found by its usual names: empty alt-text,
    # keys from the file name and row
    again = ingest(f"{s3_bucket}/hf", f"{s3_bucket}/auto", columns=Columns(image="picture"))
    assert again.written == 4
    first = next(iter_records(f"{s3_bucket}/auto"))
    assert (first["key"], first["alt_text"]) == ("train-00000-of-00001_000000", "")


def test_ingest_img2dataset_parquet_mode(tmp_path, ray_data_runtime):
    """``--output_format parquet``: ``jpg`` bytes beside the metadata; failed downloads
    have no image and a status, and are counted by it."""
    rows = []
    for i in range(4):
        ok = i != 2
        rows.append(
            {"key": f"{i:09d}", "jpg": _jpeg(i) if ok else None, "txt": f"alt {i}",
             "url": f"http://img/{i}", "status": "success" if ok else "failed_to_download",
             "error_message": None if ok else "404"}
        )  # fmt: skip
    (tmp_path / "i2d").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "i2d" / "00000.parquet")
    report = ingest(str(tmp_path / "i2d"), str(tmp_path / "out"), format="webdataset")
    assert report.written == 3 and dict(report.skipped) == {"failed_download": 1}
    recs = list(iter_records(str(tmp_path / "out")))
    assert [r["alt_text"] for r in recs] == ["alt 0", "alt 1", "alt 3"]
    assert json.loads(recs[2]["meta"]) == {"url": "http://img/3", "status": "success"}


def test_ingest_refuses_parquet_without_images(tmp_path, capsys):
    """img2dataset's metadata Parquet alone (no tars): refused before any job, exit 2."""
    (tmp_path / "meta").mkdir()
    table = pa.table({"url": ["http://a"], "key": ["0"], "caption": ["c"], "status": ["success"]})
    pq.write_table(table, tmp_path / "meta" / "00000.parquet")
    argv = ["ingest", str(tmp_path / "meta"), "--out", str(tmp_path / "out")]
    assert main_data(argv) == 2
    err = capsys.readouterr().err
    assert "no image bytes column" in err and "img2dataset metadata file" in err
    assert main_data([*argv, "--image-column", "nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main_data(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert main_data(["ingest", "--help"]) == 0
