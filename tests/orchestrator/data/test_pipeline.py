"""pipeline.py: the batch contract through iter_torch_batches, exact resume, bad data, S3."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.data.pipeline import (
    STAT_COLUMNS,
    build_dataset,
    build_train_stream,
    pop_data_stats,
)
from orchestrator.data.plan import plan_stream
from orchestrator.data.shards import ShardWriter
from orchestrator.data.synthetic import make_record, write_synthetic

pytestmark = pytest.mark.usefixtures("ray_data_runtime")
PATCH = 8


def _rows(ds, batch_size: int = 16) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_batch_contract_through_iter_torch_batches(synth_data, data_cfg):
    cfg = data_cfg(str(synth_data / "train"))
    ds = build_dataset(cfg, patch_size=PATCH, epoch=0)
    batches = list(ds.iter_torch_batches(batch_size=16))
    b = batches[0]
    assert b["global_crops"].shape == (16, 1, 3, 32, 32) and b["global_crops"].dtype == torch.uint8
    assert b["local_crops"].shape == (16, 2, 3, 16, 16) and b["local_crops"].dtype == torch.uint8
    assert b["masks"].shape == (16, 1, 4, 4) and b["masks"].dtype == torch.bool
    assert b["alt_ids"].shape == b["syn_ids"].shape == (16, 16)
    assert b["alt_ids"].dtype == b["syn_ids"].dtype == b["syn_kind"].dtype == torch.int64
    index = torch.cat([x["sample_index"] for x in batches])
    assert sorted(index.tolist()) == list(range(96))
    kinds = torch.cat([x["syn_kind"] for x in batches])
    assert set(kinds.tolist()) == {0, 1}  # sorted kinds: long=0, short=1
    assert all(pop_data_stats(x) == {f"data/{c}": 0.0 for c in STAT_COLUMNS} for x in batches)
    assert torch.cat([x["masks"].flatten(1).any(1) for x in batches]).float().mean() > 0.2


def test_only_required_keys_are_made(synth_data, data_cfg):
    cfg = data_cfg(str(synth_data / "train"), "augment.num_local_crops=0", "objective.alpha=0")
    ds = build_dataset(cfg, patch_size=PATCH, required_keys={"local_crops", "alt_ids"})
    row = ds.take(1)[0]
    assert set(row) == {"alt_ids", "sample_index", "epoch", *STAT_COLUMNS}
    with pytest.raises(ValueError, match="boxes"):
        build_dataset(cfg, patch_size=PATCH, required_keys={"boxes"})


def test_region_keys_for_cloc(synth_data, data_cfg):
    cfg = data_cfg(str(synth_data / "train"))
    keys = {"regions", "region_ids", "region_valid"}
    b = next(
        iter(
            build_dataset(cfg, patch_size=PATCH, required_keys=keys).iter_torch_batches(
                batch_size=16
            )
        )
    )
    assert b["regions"].shape == (16, 8, 4) and b["regions"].dtype == torch.float32
    assert b["region_ids"].shape == (16, 8, 16) and b["region_valid"].dtype == torch.bool
    valid = b["region_valid"]
    assert valid.any() and "global_crops" in b
    assert ((b["regions"] >= 0) & (b["regions"] <= 1)).all()
    assert (b["region_ids"][valid][:, 0] > 0).all() and (b["region_ids"][~valid] == 0).all()


@pytest.mark.parametrize("local_shuffle", [0, 12])
def test_skip_gives_the_tail_of_the_unskipped_epoch(synth_data, data_cfg, local_shuffle):
    cfg = data_cfg(str(synth_data / "train"), f"data.local_shuffle_buffer_size={local_shuffle}")
    keys = {"global_crops", "syn_ids", "masks"}
    full = _rows(
        build_dataset(cfg, patch_size=PATCH, epoch=1, required_keys=keys, preserve_order=True)
    )
    again = _rows(
        build_dataset(cfg, patch_size=PATCH, epoch=1, required_keys=keys, preserve_order=True)
    )
    tail = _rows(
        build_dataset(
            cfg, patch_size=PATCH, epoch=1, skip_samples=37, required_keys=keys, preserve_order=True
        )
    )
    np.testing.assert_array_equal(full["sample_index"], np.arange(96, 192))
    for k in ("sample_index", "global_crops", "syn_ids", "masks"):
        np.testing.assert_array_equal(full[k], again[k])
        np.testing.assert_array_equal(tail[k], full[k][37:])
    other = _rows(
        build_dataset(cfg, patch_size=PATCH, epoch=2, required_keys=keys, preserve_order=True)
    )
    assert not np.array_equal(other["global_crops"], full["global_crops"])


def test_train_stream_crosses_epochs_and_resumes_exactly(synth_data, data_cfg):
    cfg = data_cfg(str(synth_data / "train"))
    keys = {"global_crops", "alt_ids"}
    stream = _rows(
        build_train_stream(
            cfg,
            patch_size=PATCH,
            start_sample=150,
            num_samples=60,
            required_keys=keys,
            preserve_order=True,
        )
    )
    assert stream["sample_index"][0] == 150 and len(stream["sample_index"]) == 60 + 96
    np.testing.assert_array_equal(stream["epoch"], np.arange(150, 306) // 96)
    epoch1 = _rows(
        build_dataset(
            cfg, patch_size=PATCH, epoch=1, skip_samples=54, required_keys=keys, preserve_order=True
        )
    )
    np.testing.assert_array_equal(stream["global_crops"][:42], epoch1["global_crops"])
    assert plan_stream(cfg).epoch_rows == 96


def _corrupt_set(root) -> tuple[str, int, int]:
    """20 records: 3 with broken images, 1 without any text; plus one cut-off shard."""
    records = [make_record(9, "train", i, image_size=32) for i in range(20)]
    records[2]["image"] = records[2]["image"][:200]  # truncated PNG
    records[7]["image"] = b"\xff\xd8\xff garbage"
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="JPEG")
    records[11]["image"] = buf.getvalue()[:-300]  # truncated JPEG
    records[15].update(alt_text="", captions=[])
    uri = str(root / "bad")
    with ShardWriter(uri, shard_size=10, row_group_size=5) as w:
        for r in records:
            w.write(r)
    with open(w.shards[1].uri, "rb") as f:
        data = f.read()
    with ShardWriter(str(root / "cut"), shard_size=10) as cut:
        for r in records[:10]:
            cut.write(r)
    import shutil

    shutil.copy(cut.shards[0].uri, f"{uri}/shard-99999.parquet")
    with open(f"{uri}/shard-99999.parquet", "wb") as f:
        f.write(data[: len(data) // 3])  # unreadable footer: reported by name
    return uri, 3, 1


def test_bad_records_lose_only_themselves_and_are_counted(tmp_path, data_cfg, caplog):
    uri, corrupt, no_text = _corrupt_set(tmp_path)
    cfg = data_cfg(uri)
    assert [u.rsplit("/", 1)[-1] for u, _ in plan_stream(cfg).unreadable] == ["shard-99999.parquet"]
    batches = list(build_dataset(cfg, patch_size=PATCH).iter_torch_batches(batch_size=4))
    stats = {}
    for b in batches:
        for k, v in pop_data_stats(b).items():
            stats[k] = stats.get(k, 0) + v
    rows = sum(len(b["sample_index"]) for b in batches)
    assert rows == 20 - corrupt - no_text
    assert stats["data/skipped_corrupt"] == corrupt
    assert stats["data/skipped_no_caption"] == no_text
    assert stats["data/skipped_unreadable"] == 0


def test_truncated_tar_counts_unreadable_records(tmp_path, data_cfg):
    out = tmp_path / "wds"
    write_synthetic(
        str(out), n=20, seed=1, image_size=32, format="webdataset", shard_size=10, n_eval=0
    )
    shard = out / "train" / "shard-00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    (out / "train" / "_manifest.json").unlink()
    cfg = data_cfg(str(out / "train"))
    plan = plan_stream(cfg)
    rows = _rows(build_dataset(cfg, patch_size=PATCH, required_keys={"alt_ids"}))
    lost = int(rows["skipped_unreadable"].sum())
    assert lost >= 1 and len(rows["sample_index"]) + lost == plan.epoch_rows


def test_reads_from_s3(s3_bucket, data_cfg):
    uri = f"{s3_bucket}/synth"
    write_synthetic(uri, n=24, seed=4, image_size=32, shard_size=8, n_eval=0)
    cfg = data_cfg(f"{uri}/train")
    rows = _rows(build_dataset(cfg, patch_size=PATCH, required_keys={"global_crops"}))
    assert sorted(rows["sample_index"].tolist()) == list(range(24))
    assert rows["global_crops"].shape == (24, 1, 3, 32, 32)
