"""`tips data caption`: tiny, randomly initialised transformers captioners built here (no
download: tests run with HF_HUB_OFFLINE=1), loaded by ``from_pretrained(folder)`` exactly as
a model id is, through the Ray Data actor pool; real shards on disk and on moto's S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli.data import main as main_data
from orchestrator.data.caption import CaptionModel, CaptionSpec, caption_shards, caption_spec
from orchestrator.data.shards import ShardWriter, iter_records, list_shards

WORDS = "a photo of the cat dog red blue green square circle on with and image shows left right"


def _tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=specials))
    return tok


def save_tiny_ved(path: Path, width: int = 32) -> Path:
    """A ViT encoder + GPT-2 decoder VisionEncoderDecoder (``width`` wide, 1 layer), its image
    processor and a word-level tokenizer, saved with ``save_pretrained``
    (benchmarks/caption_throughput.py uses it too)."""
    import torch
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer(["[PAD]", "[UNK]", "[BOS]", "[EOS]"]),
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )
    enc = ViTConfig(
        hidden_size=width,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * width,
        image_size=32,
        patch_size=8,
    )
    dec = GPT2Config(
        vocab_size=len(tok), n_embd=width, n_layer=1, n_head=2, n_positions=64,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 3
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(cfg)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.pad_token_id, gen.eos_token_id = 2, 0, 3
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_tiny_blip(path: Path) -> Path:
    """A tiny BLIP captioner with its ``BlipProcessor`` (the AutoProcessor path real BLIP,
    Florence-2 and PaliGemma checkpoints take)."""
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertTokenizerFast(
        tokenizer_object=_tokenizer(specials),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=len(tok), max_position_embeddings=64, bos_token_id=2, sep_token_id=3,
            pad_token_id=0, eos_token_id=3, **tiny,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tiny),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(path)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    processor.save_pretrained(path)
    return path


def save_tiny_owlv2(path: Path) -> Path:
    """A tiny OWLv2 detector with its processor (a BPE CLIP tokenizer trained here). Its box
    head's last layer is zeroed, so each patch predicts the box of its own grid cell (the
    model's box bias): real, non-empty boxes from random weights."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        CLIPTokenizerFast,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    bpe = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    bpe.train_from_iterator(
        [WORDS], trainers.BpeTrainer(end_of_word_suffix="</w>", special_tokens=specials)
    )
    tok = CLIPTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        model_max_length=16,
    )
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = Owlv2Config(
        text_config=dict(
            vocab_size=len(tok), max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
            pad_token_id=0, **tiny,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tiny),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(cfg)
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(path)
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_ved(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_ved(tmp_path_factory.mktemp("tiny_ved")))


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_blip(tmp_path_factory.mktemp("tiny_blip")))


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24 + i % 5, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_source(uri: str, n: int = 10, *, format: str = "parquet", corrupt: int = 3) -> None:
    """``n`` records in shards of 4 (row groups of 2): an alt-text, a ``short`` caption, a
    region, meta, an extra ``class_mask`` PNG; record ``corrupt`` has a cut JPEG."""
    mask = io.BytesIO()
    Image.new("L", (8, 8), 3).save(mask, "PNG")
    with ShardWriter(
        uri, format=format, shard_size=4, row_group_size=2, extra_columns=("class_mask",)
    ) as w:
        for i in range(n):
            image = _jpeg(i)
            w.write(
                {
                    "key": f"rec{i:03d}",
                    "image": image[: len(image) // 3] if i == corrupt else image,
                    "alt_text": f"alt {i}",
                    "captions": [{"kind": "short", "text": f"old short {i}"}],
                    "regions": [{"box": [0.1, 0.2, 0.5, 0.75], "text": f"thing {i}"}],
                    "meta": json.dumps({"url": f"http://x/{i}.jpg"}),
                    "class_mask": mask.getvalue(),
                }
            )


def _check_captioned(src: str, out: str, kind: str, model: str, prompt: str, corrupt: int) -> None:
    before, after = list(iter_records(src)), list(iter_records(out))
    assert [r["key"] for r in after] == [r["key"] for r in before]
    for a, b in zip(after, before, strict=True):
        for col in ("image", "alt_text", "regions", "class_mask"):
            assert a[col] == b[col], col
        old = [c for c in b["captions"] if c["kind"] != kind]
        assert a["captions"][: len(old)] == old
        new = [c for c in a["captions"] if c["kind"] == kind]
        meta = json.loads(a["meta"])
        if a["key"] == f"rec{corrupt:03d}":  # kept as it was, counted as corrupt_image
            assert a["captions"] == b["captions"] and a["meta"] == b["meta"]
            continue
        assert len(new) == 1 and new[0]["text"].strip()
        assert meta["url"] == json.loads(b["meta"])["url"]
        assert meta["captioner"][kind] == {"model": model, "prompt": prompt}


def test_caption_model_loads_a_folder_like_a_model_id(tiny_ved, tiny_blip):
    """Both loading paths, without Ray: the prompt's tokens are cut from the output."""
    images = [Image.open(io.BytesIO(_jpeg(i))) for i in range(3)]
    for folder in (tiny_ved, tiny_blip):
        model = CaptionModel(folder, CaptionSpec("short", "a photo of", 6), device="cpu")
        texts = model(images)
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
        assert all(len(t.split()) <= 6 for t in texts) and any(texts)
    assert caption_spec("long").max_new_tokens == 128
    assert caption_spec("dense", prompt="describe:").prompt == "describe:"


@pytest.mark.slow  # two model-actor starts (each imports transformers): ~15-30 s
def test_caption_cli_adds_the_kind_and_resumes(tmp_path, tiny_ved, ray_data_runtime, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_source(src, n=10, corrupt=3)
    argv = ["caption", src, "--out", out, "--kind", "long", "--model", tiny_ved]
    assert main_data([*argv, "--batch-size", "3", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "captioned 9 records" in printed and "corrupt_image=1" in printed, printed
    assert "10 records in 3 shards" in printed
    prompt = caption_spec("long").prompt
    _check_captioned(src, out, "long", tiny_ved, prompt, corrupt=3)
    shards = sorted(Path(out).glob("shard-*.parquet"))
    assert [p.name for p in shards] == ["shard-00000.parquet", "shard-00001.parquet",
                                        "shard-00002.parquet"]  # fmt: skip
    assert list_shards(out).num_rows == 10 and not list(Path(out).glob("*.partial"))
    # resume: the finished shards stay as they are, only the missing one is captioned
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    report = caption_shards(
        src, out, model=tiny_ved, spec=caption_spec("long", max_new_tokens=8), batch_size=4
    )
    assert report.shards_skipped == 2 and report.shards_written == 1
    assert report.captioned == 4 and report.written == 4  # shard 1: rec004..rec007
    for p in (shards[0], shards[2]):
        assert p.stat().st_mtime_ns == mtimes[p.name]
    _check_captioned(src, out, "long", tiny_ved, prompt, corrupt=3)
    assert main_data([*argv]) == 0  # all done: nothing to caption, still a success
    assert "captioned 0 records" in capsys.readouterr().out


@pytest.mark.slow  # two model actors start: ~15 s
def test_caption_replaces_its_own_kind(tmp_path, tiny_ved, ray_data_runtime):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_source(src, n=4, corrupt=99)
    spec = CaptionSpec("short", "a photo of", 5)
    report = caption_shards(src, out, model=tiny_ved, spec=spec, concurrency=2, batch_size=2)
    assert report.captioned == 4 and dict(report.skipped) == {}
    for rec in iter_records(out):
        assert [c["kind"] for c in rec["captions"]] == ["short"]
        assert not rec["captions"][0]["text"].startswith("old short")


def test_caption_s3_in_and_out_with_a_processor_model(s3_bucket, tiny_blip, ray_data_runtime):
    src, out = f"{s3_bucket}/src", f"{s3_bucket}/captioned"
    write_source(src, n=6, format="webdataset", corrupt=0)
    spec = caption_spec("short", max_new_tokens=6)
    report = caption_shards(src, out, model=tiny_blip, spec=spec, batch_size=4)
    assert report.captioned == 5 and report.skipped["corrupt_image"] == 1
    assert {s.format for s in list_shards(out).shards} == {"webdataset"}
    _check_captioned(src, out, "short", tiny_blip, spec.prompt, corrupt=0)


def test_caption_refusals_are_usage_errors(tmp_path, tiny_ved, capsys):
    src = str(tmp_path / "src")
    write_source(src, n=2)
    base = ["caption", src, "--out", str(tmp_path / "out")]
    assert main_data([*base, "--kind", "nope", "--model", tiny_ved]) == 2
    assert "has no prompt" in capsys.readouterr().err
    assert main_data([*base, "--kind", "short", "--model", str(tmp_path / "missing")]) == 2
    assert main_data([*base, "--kind", "short", "--model", "org/not-cached-anywhere"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    same = ["caption", src, "--out", src, "--kind", "short", "--model", tiny_ved]
    assert main_data(same) == 2
    assert main_data(["caption", "--help"]) == 0


# --------------------------------------------------------------------------- regions


def test_regions_from_a_tiny_owlv2(tmp_path, ray_data_runtime, capsys):
    """``tips data regions``: xyxy boxes in [0, 1] with their query as text, at most
    --max-regions per image, everything else unchanged, the corrupt image counted."""
    model = str(save_tiny_owlv2(tmp_path / "owl"))
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_source(src, n=4, corrupt=1)
    argv = ["regions", src, "--out", out, "--model", model, "--queries", "a cat, a red dog"]
    assert main_data([*argv, "--threshold", "0", "--max-regions", "3", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "detected regions in 3 records" in printed and "corrupt_image=1" in printed, printed
    for a, b in zip(iter_records(out), iter_records(src), strict=True):
        for col in ("image", "alt_text", "captions", "class_mask"):
            assert a[col] == b[col], col
        if a["key"] == "rec001":
            assert a["regions"] == b["regions"] and a["meta"] == b["meta"]
            continue
        assert 1 <= len(a["regions"]) <= 3
        for r in a["regions"]:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert r["text"] in ("a cat", "a red dog")
        entry = json.loads(a["meta"])["regions"]
        assert entry["queries"] == ["a cat", "a red dog"] and entry["model"] == model
    assert main_data(["regions", src, "--out", out, "--model", model]) == 2  # no queries
