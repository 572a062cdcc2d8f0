"""`tips eval` end to end on the synthetic split with a random-init tiny checkpoint, the
checkpoint loader, the CLI's errors, and periodic evaluation during training."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator import config as config_lib
from orchestrator.cli.eval import main as main_eval
from orchestrator.cli.eval import parse_eval_args
from orchestrator.eval import ALL_TASKS, LoadError, evaluate_during_training, load_encoders
from orchestrator.recipes import RECIPES_DIR
from tips_model.checkpoints import save_state_dict
from tips_model.objectives import build_objective
from tips_model.tokenizer import build_tokenizer

TINY = RECIPES_DIR / "tiny_cpu.yaml"
FAST = [
    "max_images=8",
    "max_train_images=8",
    "probe_steps=5",
    "batch_size=8",
    "progress=false",
    "plot_images=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with two random-init checkpoints of the tiny recipe (steps 5, 10)."""
    cfg = config_lib.load(TINY, ["data.train_uri=/unused"])
    tok = build_tokenizer(cfg.model.tokenizer, max_len=cfg.model.max_text_len)
    root = tmp_path_factory.mktemp("run")
    for step in (5, 10):
        torch.manual_seed(step)
        objective = build_objective(cfg.objective, cfg.model, tok.vocab_size)
        ckpt = root / "tiny_cpu" / f"checkpoint_{step:08d}"
        ckpt.mkdir(parents=True)
        save_state_dict(objective.state_dict(), ckpt / "model.pt")
        (ckpt / "config.yaml").write_text(config_lib.to_yaml(cfg))
    return root


def test_cli_runs_every_task_on_the_synthetic_split(run_dir, tmp_path, capsys):
    ckpt = run_dir / "tiny_cpu" / "checkpoint_00000010"
    out = tmp_path / "eval"
    assert main_eval([f"checkpoint={ckpt}", f"out={out}", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "zero_shot_seg" in printed and "results.json" in printed
    payload = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in payload["results"]] == list(ALL_TASKS)
    assert all(r["dataset"] == "synthetic" for r in payload["results"])
    metrics = payload["metrics"]
    for key in (
        "eval/zero_shot_cls/top1",
        "eval/retrieval/t2i_r5",
        "eval/zero_shot_seg/miou",
        "eval/linear_seg/miou",
        "eval/depth/rmse",
        "eval/knn/top1",
    ):
        assert math.isfinite(metrics[key]), key
    assert payload["settings"]["options"]["probe_steps"] == 5
    assert "| zero_shot_seg | synthetic |" in (out / "results.md").read_text()
    for task in ("zero_shot_seg", "linear_seg", "depth"):
        assert (out / f"{task}.png").stat().st_size > 1000


def test_loader_picks_latest_checkpoint_and_teacher(run_dir):
    enc = load_encoders(str(run_dir))  # a run directory: the highest step is used
    ref = torch.load(run_dir / "tiny_cpu" / "checkpoint_00000010" / "model.pt")
    torch.testing.assert_close(enc.vision.pos_embed, ref["student.vision.pos_embed"])
    assert enc.temperature == pytest.approx(math.exp(ref["student.temperature.log_temperature"]))
    assert not enc.vision.training and not enc.text.training
    teacher = load_encoders(
        str(run_dir / "tiny_cpu" / "checkpoint_00000005" / "model.pt"), which="teacher"
    )
    ref5 = torch.load(run_dir / "tiny_cpu" / "checkpoint_00000005" / "model.pt")
    torch.testing.assert_close(teacher.vision.pos_embed, ref5["teacher.vision.pos_embed"])


def test_loader_errors_name_the_path(run_dir, tmp_path):
    with pytest.raises(LoadError, match="not a checkpoint; expected a checkpoint_<step>/"):
        load_encoders(str(tmp_path))
    bad = tmp_path / "checkpoint_00000001"
    shutil.copytree(run_dir / "tiny_cpu" / "checkpoint_00000005", bad)
    text = (bad / "config.yaml").read_text().replace("head_out_dim: 256", "head_out_dim: 128")
    (bad / "config.yaml").write_text(text)
    with pytest.raises(LoadError, match="model.pt does not match config.yaml"):
        load_encoders(str(bad))
    with pytest.raises(LoadError, match="tokenizer not found at .*tokenizer.model"):
        load_encoders(f"released={tmp_path}/v.npz,{tmp_path}/t.npz,B")


def test_cli_argument_errors(tmp_path, capsys):
    assert main_eval(["checkpoint=x", "nonsense=1"]) == 2
    assert "unknown key 'nonsense'" in capsys.readouterr().err
    assert main_eval(["checkpoint=x", "released=a,b,B"]) == 2
    assert main_eval(["checkpoint=x", "tasks=[zero_shot_seg,segment]"]) == 2
    assert "unknown eval task 'segment'" in capsys.readouterr().err
    assert main_eval(["checkpoint=x", "probe_steps=many"]) == 2
    err = capsys.readouterr().err  # the same OmegaConf merge as tips train
    assert "key 'probe_steps'" in err and "converted to Integer" in err
    assert main_eval([f"checkpoint={tmp_path / 'none'}"]) == 1
    assert "not a checkpoint" in capsys.readouterr().err


def test_tips_eval_verb_is_wired(capsys):
    from orchestrator.cli import main

    assert main(["eval", "--help"]) == 0
    assert "usage: tips eval (checkpoint=URI" in capsys.readouterr().out


def test_parse_eval_args():
    req, opts = parse_eval_args(
        [
            "released=[v.npz,t.npz,B]",
            "tasks=[knn,depth]",
            "cls=syn",
            "data.depth=nyu:/data/nyu",
            "progress=false",
            "knn_k=10",
        ]
    )
    assert req.released == "v.npz,t.npz,B" and req.model_spec == "released=v.npz,t.npz,B"
    assert req.tasks == ["knn", "depth"] and req.data == {"depth": "nyu:/data/nyu"}
    assert opts.cls == "syn" and opts.progress is False and opts.knn_k == 10


def test_evaluate_during_training_restores_modes(run_dir):
    enc = load_encoders(str(run_dir))
    enc.vision.train()
    out = evaluate_during_training(
        enc.vision, enc.text, enc.tokenizer, torch.tensor(enc.temperature), max_images=8
    )
    assert set(out) >= {
        "eval/zero_shot_seg/miou",
        "eval/retrieval/i2t_r1",
        "eval/zero_shot_cls/top1",
    }
    assert all(math.isfinite(v) for v in out.values())
    assert enc.vision.training and not enc.text.training


def test_checkpoint_and_synthetic_split_from_s3(run_dir, s3_bucket):
    from orchestrator.data.synthetic import write_synthetic
    from orchestrator.eval import open_dataset
    from orchestrator.storage import s3_client

    bucket = s3_bucket.removeprefix("s3://")
    client = s3_client()
    for path in (run_dir / "tiny_cpu").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"runs/{path.relative_to(run_dir)}")
    enc = load_encoders(f"{s3_bucket}/runs/tiny_cpu")  # the latest checkpoint only is copied
    ref = torch.load(run_dir / "tiny_cpu" / "checkpoint_00000010" / "model.pt")
    torch.testing.assert_close(enc.vision.pos_embed, ref["student.vision.pos_embed"])
    write_synthetic(f"{s3_bucket}/synth", n=4, n_eval=4, seed=0)
    ds = open_dataset(f"{s3_bucket}/synth/eval", "depth")
    assert ds.name == "synthetic" and len(ds.split("val")) == 2


def test_checkpoint_carries_the_input_normalisation_into_eval(run_dir, tmp_path):
    """tiny_cpu trains with ImageNet mean/std; its checkpoint's config.yaml says so and the
    evaluated tower applies it; the same weights under a config without it do not."""
    ckpt = run_dir / "tiny_cpu" / "checkpoint_00000010"
    enc = load_encoders(str(ckpt))
    assert enc.vision.input_norm == "imagenet"
    other = tmp_path / "checkpoint_00000010"
    shutil.copytree(ckpt, other)
    cfg = config_lib.load(TINY, ["data.train_uri=/unused", "model.input_norm=none"])
    (other / "config.yaml").write_text(config_lib.to_yaml(cfg))
    raw = load_encoders(str(other))
    assert raw.vision.input_norm == "none"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = enc.vision(x).cls_alt, raw.vision(x).cls_alt
    assert not torch.allclose(a, b, atol=1e-3)
