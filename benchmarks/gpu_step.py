"""One TIPS training step on an accelerator: images/s, achieved TFLOP/s and MFU (issue 4).

    .venv/bin/python benchmarks/gpu_step.py                        # ViT-B/14 TIPS, bf16, CUDA
    .venv/bin/python benchmarks/gpu_step.py --peak-tflops 989      # H100/H200 SXM dense bf16
    .venv/bin/python benchmarks/gpu_step.py --device cpu --recipe tiny_cpu \\
        --batch 16 --steps 3 --warmup 1                             # smoke run without a GPU

The model, objective and optimizer come from a recipe (default ``tips_b14``:
ViT-B/14 + text_b, 1x224 + 6x98 crops, DINO 65536 prototypes, iBOT, full EMA teacher,
Adafactor) through the same builders the Ray Train worker uses; the batch follows the batch
contract (random uint8 pixels, DINOv2-style block masks at the recipe's ratios, token ids) and stays
on the device, so this measures the step, not the data pipeline. One process, one device,
all in one run:

* baseline: the vision tower alone, forward + backward on the global crops (the FLOP-dense
  core every dual-encoder step contains);
* TIPS step: the whole objective under bf16 autocast (``train.precision``), backward,
  gradient clipping, optimizer step, EMA teacher update - what ``orchestrator/train/loop.py``
  runs per micro-batch.

FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions and attention; element-wise work is not counted, as is usual for MFU). MFU =
counted FLOPs x steps/s / ``--peak-tflops``. Prints a table with the ratio of each row's
images/s to the baseline's. Target (issue 4): >= 35 % MFU on an H100.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import config as config_lib  # noqa: E402
from orchestrator.recipes import find_recipe  # noqa: E402
from orchestrator.train.optim import build_optimizer, build_schedules, set_lr  # noqa: E402
from tips_model.masking import BlockMaskGenerator, sample_batch_masks  # noqa: E402
from tips_model.objectives import StepState, build_objective  # noqa: E402

# Dense bf16 peak TFLOP/s by device name fragment (vendor datasheets, without sparsity).
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}


def make_batch(cfg, batch: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    a, p = cfg.augment, config_lib.patch_size(cfg.model)
    g, hg, m, hl = a.num_global_crops, a.global_crop_size, a.num_local_crops, a.local_crop_size
    grid = hg // p
    mk = cfg.masking
    gen = BlockMaskGenerator((grid, grid), min_num_patches=mk.min_num_patches)
    masks = sample_batch_masks(
        batch * g, gen, rng, mk.mask_probability, mk.ratio_min, mk.ratio_max
    ).reshape(batch, g, grid, grid)
    ids = rng.integers(1, vocab, (2, batch, cfg.model.max_text_len))
    ids[:, :, cfg.model.max_text_len // 2 :] = 0  # half-length captions, 0 = padding
    out = {
        "global_crops": torch.randint(0, 256, (batch, g, 3, hg, hg), dtype=torch.uint8),
        "local_crops": torch.randint(0, 256, (batch, m, 3, hl, hl), dtype=torch.uint8),
        "masks": torch.from_numpy(masks),
        "alt_ids": torch.from_numpy(ids[0]),
        "syn_ids": torch.from_numpy(ids[1]),
        "syn_kind": torch.zeros(batch, dtype=torch.int64),
    }
    return {k: v.to(device) for k, v in out.items()}


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tips_b14", help="a packaged recipe name or a YAML path")
    ap.add_argument("--batch", type=int, default=128, help="images per step (one device)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="0: from the device name")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every vision/text tower in place (nn.Module.compile, static shapes)",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile the TIPS step and print the N kernels with most device time",
    )
    ap.add_argument("overrides", nargs="*", help="extra key=value recipe overrides")
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = config_lib.load(
        find_recipe(args.recipe),
        [
            "data.train_uri=/unused",
            "model.tokenizer=bpe",  # the vocabulary size is all that matters here
            "model.tokenizer_path=null",
            f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}",
            *args.overrides,
        ],
    )
    from tips_model.tokenizer import build_tokenizer

    vocab = build_tokenizer("bpe", max_len=cfg.model.max_text_len).vocab_size
    torch.manual_seed(0)
    objective = build_objective(cfg.objective, cfg.model, vocab).to(device)
    if args.compile:
        from tips_model.text import TextTransformer
        from tips_model.vision import VisionTransformer

        for mod in objective.modules():
            if isinstance(mod, VisionTransformer | TextTransformer):
                mod.compile(dynamic=False)
    optimizer = build_optimizer(objective, cfg)
    sched = build_schedules(cfg).at(100)
    batch = make_batch(cfg, args.batch, vocab, device)
    bf16 = cfg.train.precision == "bf16" and device.type == "cuda"
    step_state = StepState(step=100, teacher_temp=sched["teacher_temp"])

    def tips_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = objective(batch, step_state)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.student.parameters(), cfg.optim.grad_clip_norm)
        set_lr(optimizer, sched["lr"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.update_teacher(sched["ema_momentum"])

    vision = objective.student.vision
    pixels = batch["global_crops"].flatten(0, 1).float().div_(255.0)

    def vision_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = vision(pixels)
        (out.cls_alt.float().sum() + out.patch_tokens.float().mean()).backward()
        vision.zero_grad(set_to_none=True)

    rows = []
    for name, fn in (("vision tower fwd+bwd (baseline)", vision_step), ("TIPS step", tips_step)):
        flops = count_flops(fn)
        optimizer.zero_grad(set_to_none=True)
        sec = timed(fn, args.steps, args.warmup, device)
        rows.append((name, args.batch / sec, flops / sec / 1e12))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                tips_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(
            sort_by=key, row_limit=args.profile, max_name_column_width=60
        )
        print(table)
    peak = args.peak_tflops
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if not peak:
        peak = next((v for k, v in PEAKS.items() if k in dev_name), 0.0)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    print()
    print(
        f"{Path(args.recipe).name}: {cfg.model.vision} + {cfg.model.text}, batch {args.batch}, "
        f"{cfg.train.precision if bf16 else 'fp32'}{', compiled' if args.compile else ''}, "
        f"{dev_name}, torch {torch.__version__}, peak {peak or '?'} TFLOP/s, "
        f"max memory {mem:.1f} GiB"
    )
    print("| setting | images/s | ratio vs baseline | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|")
    base = rows[0][1]
    for name, ips, tflops in rows:
        mfu = f"{100 * tflops / peak:.1f} %" if peak else "n/a"
        print(f"| {name} | {ips:.1f} | {ips / base:.2f} | {tflops:.1f} | {mfu} |")


if __name__ == "__main__":
    main()
