"""On the synthetic split a briefly trained tiny model beats its random init on zero-shot
segmentation and retrieval, by the margins stated below (``slow``: ~10 s idle, more when
the 2 cores are shared).

Training here is the objective's own step in a plain loop (contrastive on the synthetic
captions only: ``alpha = beta = 0``, ``contrastive_alt_weight = 0``, whole images resized to
32 px as the single global crop), not ``orchestrator.train``: that needs Ray and the data
pipeline, and this test is about the evaluation suite seeing learning. Measured with these
settings: zero-shot seg mIoU 0.03 -> 1.46, retrieval t2i R@5 7 -> 31 (cls_syn), zero-shot
top-1 3 -> 16.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from orchestrator import config as config_lib
from orchestrator.data.synthetic import make_record
from orchestrator.eval import EvalOptions, encoders_from_objective
from orchestrator.eval.suite import run_eval
from orchestrator.recipes import RECIPES_DIR
from tips_model.objectives import StepState, build_objective
from tips_model.tokenizer import build_tokenizer

TINY = RECIPES_DIR / "tiny_cpu.yaml"
STEPS, RECORDS, BATCH, LR, WARMUP = 200, 256, 32, 2e-3, 20
MIN_GAIN = {"zero_shot_seg/miou": 0.5, "retrieval/t2i_r5": 10.0, "retrieval/i2t_r5": 10.0}


def _batches(tok, image_size: int):
    recs = [make_record(0, "train", i) for i in range(RECORDS)]

    def decode(b: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(b)) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)

    imgs = torch.stack([decode(r["image"]) for r in recs]).float()
    imgs = F.interpolate(imgs, size=(image_size, image_size), mode="bilinear", antialias=True)
    imgs = imgs.round().clamp(0, 255).to(torch.uint8)[:, None]  # [N, G=1, 3, S, S]
    alt = torch.as_tensor(tok([r["alt_text"] for r in recs]))
    caps = [torch.as_tensor(tok([r["captions"][k]["text"] for r in recs])) for k in (0, 1)]
    return imgs, alt, caps


def _metrics(objective, tok, opts) -> dict[str, float]:
    enc = encoders_from_objective(objective, tok)
    results = run_eval(enc, ["zero_shot_seg", "retrieval"], options=opts)
    objective.train()
    return {f"{r.task}/{k}": v for r in results for k, v in r.metrics.items()}


@pytest.mark.slow
def test_trained_tiny_model_beats_random_init():
    cfg = config_lib.load(
        TINY,
        [
            "data.train_uri=/unused",
            "objective.alpha=0",
            "objective.beta=0",
            "objective.contrastive_alt_weight=0",
            "objective.gather_negatives=false",
            "augment.num_local_crops=0",
            # the settings the margins above were measured with (tiny_cpu has since moved to
            # ImageNet normalisation and KoLeo for its self-distillation terms, which this
            # contrastive-only test does not use)
            "model.input_norm=none",
            "objective.koleo_weight=0",
        ],
    )
    tok = build_tokenizer(cfg.model.tokenizer, max_len=cfg.model.max_text_len)
    torch.manual_seed(0)
    objective = build_objective(cfg.objective, cfg.model, tok.vocab_size)
    size = cfg.augment.global_crop_size
    opts = EvalOptions(progress=False, max_images=64, image_size=size, zs_window=size, cls="syn")
    before = _metrics(objective, tok, opts)

    imgs, alt, caps = _batches(tok, size)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        idx = torch.randint(RECORDS, (BATCH,), generator=gen)
        short = torch.rand(BATCH, generator=gen) < 0.5
        syn = torch.where(short[:, None], caps[0][idx], caps[1][idx])
        out = objective(
            {"global_crops": imgs[idx], "alt_ids": alt[idx], "syn_ids": syn}, StepState(step=step)
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    after = _metrics(objective, tok, opts)

    for key, gain in MIN_GAIN.items():
        assert after[key] >= before[key] + gain, (key, before[key], after[key])
