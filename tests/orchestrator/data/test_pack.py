"""`tips data pack|inspect`: real folders, JSONL and COCO files, and their skip summaries."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from orchestrator.cli.data import main as main_data
from orchestrator.data.pack import inspect_shards
from orchestrator.data.shards import ShardWriter, iter_records, list_shards


def _folder(root, n: int = 6) -> None:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        arr = np.full((20, 30, 3), i * 30, dtype=np.uint8)
        Image.fromarray(arr).save(root / "sub" / f"img.{i}.jpg")
    data = (root / "sub" / "img.0.jpg").read_bytes()
    (root / "sub" / "img.5.jpg").write_bytes(data[: len(data) // 3])  # corrupt


def test_pack_from_folder_and_jsonl(tmp_path, capsys):
    images = tmp_path / "images"
    _folder(images)
    lines = [
        {"file": "sub/img.0.jpg", "alt_text": "zero", "captions": [{"kind": "short", "text": "z"}]},
        {"file": "sub/img.1.jpg", "alt_text": "one", "captions": {"short": "o", "long": "oo"}},
        {"file": "sub/img.2.jpg", "alt_text": "", "captions": []},  # no text
        {"file": "sub/missing.jpg", "alt_text": "gone"},  # missing image
        {"file": "sub/img.3.jpg", "alt_text": "three", "key": "custom.key"},
        {"file": "sub/img.4.jpg", "alt_text": "dup", "key": "custom_key"},  # duplicate key
        {"file": "sub/img.5.jpg", "alt_text": "corrupt"},
    ]
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    out = tmp_path / "packed"
    argv = [
        "pack",
        "--images",
        str(images),
        "--captions",
        str(jsonl),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--format",
        "webdataset",
    ]
    assert main_data(argv) == 0
    summary = capsys.readouterr().out
    assert f"packed 3 records into {out}; skipped 5" in summary
    for reason in (
        "bad_line=1",
        "corrupt_image=1",
        "duplicate_key=1",
        "missing_image=1",
        "no_text=1",
    ):
        assert reason in summary
    records = list(iter_records(str(out)))
    assert [r["key"] for r in records] == ["sub_img_0", "sub_img_1", "custom_key"]
    assert records[1]["captions"] == [
        {"kind": "short", "text": "o"},
        {"kind": "long", "text": "oo"},
    ]
    assert records[0]["image"] == (images / "sub" / "img.0.jpg").read_bytes()


def test_pack_from_coco_captions(tmp_path, capsys):
    images = tmp_path / "images"
    _folder(images, n=6)
    coco = {
        "images": [{"id": i, "file_name": f"sub/img.{i}.jpg"} for i in range(6)],
        "annotations": [
            {"id": 1, "image_id": 0, "caption": "first caption"},
            {"id": 2, "image_id": 0, "caption": "second caption"},
            {"id": 3, "image_id": 1, "caption": "another"},
            {"id": 4, "image_id": 5, "caption": "of a corrupt image"},
        ],
    }
    path = tmp_path / "captions_train.json"
    path.write_text(json.dumps(coco))
    out = tmp_path / "coco"
    assert main_data(["pack", "--images", str(images), "--coco", str(path), "--out", str(out)]) == 0
    assert "packed 2 records" in (out_text := capsys.readouterr().out)
    assert "skipped 4 (corrupt_image=1, no_text=3)" in out_text
    first = next(iter_records(str(out)))
    assert first["alt_text"] == "first caption"
    assert [c["text"] for c in first["captions"]] == ["first caption", "second caption"]
    assert {c["kind"] for c in first["captions"]} == {"short"}
    assert json.loads(first["meta"]) == {"coco_id": 0}


def test_inspect_counts(tmp_path, synth_data, capsys):
    assert main_data(["inspect", str(synth_data / "train"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 3 and report["rows"] == 96 and report["readable_records"] == 96
    assert report["caption_kinds"] == {"long": 96, "short": 96}
    assert report["decode_failures"] == 0 and report["unreadable_shards"] == []
    listing = list_shards(str(synth_data / "train"))
    assert report["bytes"] == sum(s.size for s in listing.shards)


def test_inspect_reports_bad_records_and_shards(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(good, format="JPEG")
    records = [
        {
            "key": f"k{i}",
            "image": good.getvalue(),
            "alt_text": "a" if i else "",
            "captions": [{"kind": "long", "text": "t"}],
        }
        for i in range(4)
    ]
    records[2]["image"] = good.getvalue()[:-100]
    out = tmp_path / "set"
    with ShardWriter(str(out), shard_size=4) as w:
        for r in records:
            w.write(r)
    (out / "extra.parquet").write_bytes(b"PAR1 truncated")
    report = inspect_shards(str(out))
    assert report["rows"] == 4 and report["decode_failures"] == 1
    assert report["empty_alt_text"] == 1 and report["caption_kinds"] == {"long": 4}
    assert report["unreadable_shards"] == [str(out / "extra.parquet")]


def test_a_pack_that_wrote_nothing_leaves_nothing_behind(tmp_path, capsys):
    """Issue 17: the JSONL error names file and line; an empty pack does not block a rerun."""
    (tmp_path / "imgs").mkdir()
    captions = tmp_path / "c.jsonl"
    captions.write_text('{"file": "missing.jpg", "alt_text": "a dog"}\nnot json\n')
    args = ["pack", "--images", str(tmp_path / "imgs"), "--captions", str(captions)]
    out = tmp_path / "out"
    for _ in range(2):  # the second attempt meets no "already holds shard files"
        assert main_data([*args, "--out", str(out)]) == 1
        printed = capsys.readouterr()
        assert "packed 0 records" in printed.out
        assert f"{captions}:2: skipped" in printed.err
        assert "already holds" not in printed.err
    assert not out.exists() or not any(out.iterdir())
