"""The training step on an accelerator, with and without each change of issue 22: images/s,
TFLOP/s, MFU, peak memory, and the CPU proxies (host reads, graph breaks, launches per step).

    .venv/bin/python benchmarks/gpu_step.py                          # tips_b14 + tipsv2_b14, CUDA
    .venv/bin/python benchmarks/gpu_step.py --recipes tips_b14 --settings old all_on
    .venv/bin/python benchmarks/gpu_step.py --peak-tflops 989        # H100/H200 SXM dense bf16
    .venv/bin/python benchmarks/gpu_step.py --device cpu --recipes tiny_cpu \\
        --batch 8 --steps 2 --warmup 1                                # smoke run without a GPU

Per recipe (``--recipes``: packaged names or YAML paths), one process, one device:

* ``vision``: the vision tower alone, forward + backward on the global crops under bf16
  autocast (the FLOP-dense core of every dual-encoder step): the baseline of the ratios;
* then the whole training step, built and run as the Ray Train worker does
  (``orchestrator/train/loop.py``: ``wrap_for_distributed`` (FSDP2 on a process group of
  one for ``fsdp_params``), ``Objective.compile_step`` after wrapping, the optimizer, the
  ``Worker``, and ``train_step`` itself: host batch copied to the device, forward + loss,
  backward, clipping, optimizer step, EMA teacher, the device-side non-finite
  ``StepGuard``, device metrics), in these settings (``--settings``):

  - ``old``: eager, bf16 autocast, iBOT on ``x[masks]`` (``objective.mim_masked_capacity=
    null``): the step before issue 22 (items 4 and 5, the fused q/k/v projection and the
    grouped Adafactor step, have no switch and are in every row);
  - ``fixed``: ``old`` + the fixed-count iBOT (the recipe's ``mim_masked_capacity``, else
    ``masking.ratio_max``; item 1); left out for all-token iBOT (tipsv2), which has no
    ``x[masks]``;
  - ``fsdp_params``: ``old`` + ``train.mixed_precision=fsdp_params`` (bf16 compute copies
    of fp32 master weights; item 4);
  - ``compile``: ``old`` + ``train.compile=true`` (item 3; ``x[masks]`` breaks the graph);
  - ``fixed_compile``: the fixed-count iBOT + compile;
  - ``all_on``: fixed-count iBOT + fsdp_params + compile;
  - ``recipe``: the recipe's own settings.

  A setting equal to an earlier one for this recipe is left out (tips_b14's own settings are
  ``fixed_compile``). Each compiled setting compiles forward + backward first (minutes at
  B/14, seconds from inductor's cache on a rerun): ``--settings`` and ``--recipes`` split
  the run into parts.

Columns: images/s; its ratio to the vision tower's; TFLOP/s and MFU from the FLOPs of the
recipe's ``old`` step, counted once with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, attention; element-wise work uncounted, as usual for MFU; the
padded iBOT slots of ``fixed`` are not useful work, so they do not count), MFU = FLOPs x
steps/s / ``--peak-tflops``; peak memory (``torch.cuda.max_memory_allocated``, CUDA only);
and, from steps apart from the timed ones: host reads per step
(``orchestrator/train/guard.py count_host_reads``; compiled settings are counted with
``torch.compiler.set_stance("force_eager")``: a compiled region cannot read back without a
graph break, which the next column shows), graph breaks of the objective's forward + loss
(``torch._dynamo.explain``, compiled settings only: an eager step has no graph) and
launches per step from ``torch.profiler``: device events (kernels, copies, memsets) on
CUDA; on the CPU the aten ops called from Python (no aten op above them: a
``torch._foreach_*`` op counts once, not per tensor) plus the kernels of compiled graphs.
``--profile N`` prints the N kernels (ops on the CPU) with the most device time of each step
setting after its timing. Target (issue 22): ``tips_b14`` >= 35 % MFU, ``tipsv2_b14`` >= 30 %
on an H100/H200.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import markdown_table, top_level_aten  # noqa: E402
from orchestrator import config as config_lib  # noqa: E402
from orchestrator.recipes import find_recipe  # noqa: E402
from orchestrator.train.guard import count_host_reads, host_tensors  # noqa: E402
from orchestrator.train.loggers import Loggers  # noqa: E402
from orchestrator.train.loop import Worker, train_step  # noqa: E402
from orchestrator.train.metrics import IntervalMeter, MetricsHistory  # noqa: E402
from orchestrator.train.optim import build_optimizer, build_schedules  # noqa: E402
from orchestrator.train.parallel import wrap_for_distributed  # noqa: E402
from orchestrator.train.state import TrainState  # noqa: E402
from tips_model.masking import BlockMaskGenerator, sample_batch_masks  # noqa: E402
from tips_model.objectives import StepState, build_objective  # noqa: E402
from tips_model.tokenizer import build_tokenizer  # noqa: E402

# Dense bf16 peak TFLOP/s by device name fragment (vendor datasheets, without sparsity).
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}
SETTINGS = ("old", "fixed", "fsdp_params", "compile", "fixed_compile", "all_on", "recipe")
LABELS = {
    "old": "eager, autocast, x[masks] iBOT (old step)",
    "fixed": "+ fixed-count iBOT",
    "fsdp_params": "+ fsdp_params bf16",
    "compile": "+ compile",
    "fixed_compile": "+ fixed-count iBOT + compile",
    "all_on": "fixed iBOT + fsdp_params + compile",
    "recipe": "recipe's own settings",
}


@dataclass
class Row:
    """One line of the table."""

    recipe: str
    setting: str
    images_s: float
    tflops: float
    peak_gib: float
    reads: str = "-"
    breaks: str = "-"
    launches: str = "-"


def load_cfg(recipe: str, batch: int, extra: list[str]) -> config_lib.TipsConfig:
    """The recipe with one device's batch (no accumulation) and the given overrides."""
    return config_lib.load(
        find_recipe(recipe),
        [
            "data.train_uri=/unused",
            "model.tokenizer=bpe",  # the vocabulary size is all that matters here
            "model.tokenizer_path=null",
            f"train.global_batch_size={batch}",
            f"train.batch_size_per_worker={batch}",
            "scaling.min_workers=1",  # one device
            "scaling.max_workers=1",
            *extra,
        ],
    )


def _key(cfg: config_lib.TipsConfig) -> tuple:
    """What the settings change: (compile, mixed precision, iBOT capacity)."""
    capacity = getattr(cfg.objective, "mim_masked_capacity", None)
    return bool(cfg.train.compile), cfg.train.mixed_precision, capacity


def setting_overrides(recipe: str, batch: int, wanted: list[str]) -> dict[str, list[str]]:
    """The overrides of each wanted setting that applies to this recipe (module doc), less
    those equal to an earlier one (the recipe's own row, or fixed_compile for tipsv2)."""
    cfg = load_cfg(recipe, batch, [])
    obj = cfg.objective
    dynamic = getattr(obj, "mim_tokens", None) == "masked" and not obj.mim_fixed_shapes
    old = ["train.compile=false", "train.mixed_precision=autocast"]
    fixed: list[str] = []
    if dynamic:
        old.append("objective.mim_masked_capacity=null")
        fixed = [
            f"objective.mim_masked_capacity={obj.mim_masked_capacity or cfg.masking.ratio_max}"
        ]
    candidates = {
        "old": old,
        "fixed": [*old, *fixed],
        "fsdp_params": [*old, "train.mixed_precision=fsdp_params"],
        "compile": [*old, "train.compile=true"],
        "fixed_compile": [*old, *fixed, "train.compile=true"],
        "all_on": [*old, *fixed, "train.mixed_precision=fsdp_params", "train.compile=true"],
        "recipe": [],
    }
    out, seen = {}, set()
    for name, extra in candidates.items():
        key = _key(load_cfg(recipe, batch, extra))
        if key not in seen and name in wanted:
            out[name] = extra
        seen.add(key)
    return out


def make_batch(cfg: config_lib.TipsConfig, batch: int, keys: set[str]) -> dict[str, torch.Tensor]:
    """A host batch as the pipeline gives the loop (batch contract): random uint8 crops,
    DINOv2-style block masks at the recipe's ratios, half-length captions, sample indices."""
    rng = np.random.default_rng(0)
    a, p = cfg.augment, config_lib.patch_size(cfg.model)
    g, hg, m, hl = a.num_global_crops, a.global_crop_size, a.num_local_crops, a.local_crop_size
    grid, mk = hg // p, cfg.masking
    gen = BlockMaskGenerator((grid, grid), min_num_patches=mk.min_num_patches)
    masks = sample_batch_masks(
        batch * g, gen, rng, mk.mask_probability, mk.ratio_min, mk.ratio_max
    ).reshape(batch, g, grid, grid)
    vocab = build_tokenizer("bpe", max_len=cfg.model.max_text_len).vocab_size
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
    missing = keys - out.keys()
    if missing:
        raise SystemExit(f"gpu_step.py makes no batch key {sorted(missing)} for this objective")
    host = {k: v for k, v in out.items() if k in keys}
    host["sample_index"] = torch.arange(batch)
    return host


def build_worker(cfg: config_lib.TipsConfig, device: torch.device, step: int) -> Worker:
    """What ``loop._setup`` builds for a world of one, without Ray: the objective wrapped
    (FSDP2 on a process group of one for fsdp_params) and the optimizer; the caller calls
    ``compile_step`` (after its graph-break count), which does not touch the parameters."""
    tok = build_tokenizer("bpe", max_len=cfg.model.max_text_len)
    torch.manual_seed(cfg.train.seed)
    objective = build_objective(cfg.objective, cfg.model, tok.vocab_size).to(device)
    strategy = wrap_for_distributed(objective, cfg, device, 1)
    return Worker(
        cfg=cfg, plan=config_lib.derive(cfg, 1), rank=0, world_size=1, device=device,
        distributed=False, objective=objective, tokenizer=tok, strategy=strategy,
        optimizer=build_optimizer(objective, cfg), schedules=build_schedules(cfg),
        state=TrainState(step=step, seed=cfg.train.seed), run_uri="", persist_locally=False,
        use_bf16=cfg.train.precision == "bf16" and device.type == "cuda",
        config_yaml="", loggers=Loggers([]), history=MetricsHistory(None), monitor=None,
    )  # fmt: skip


def batches(host: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """The same host batch again and again (``train_step`` pops its bookkeeping keys)."""
    while True:
        yield dict(host)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def count_flops(fn: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def launches(fn: Callable[[], None], device: torch.device, top: int = 0) -> int:
    """Launches of one call (module doc): device kernels on CUDA; on the CPU aten ops with no
    aten op above them, and compiled graphs' kernels. ``top``: print the busiest ones."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        count = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    else:
        count = sum(1 for e in events if _top_level_cpu(e))
    if top:
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))
    return count


def _top_level_cpu(event: Any) -> bool:
    """An aten op no aten op called, or a kernel of an inductor-compiled graph."""
    # inductor's C++ kernels (cpp.enable_kernel_profile)
    return "cpp_fused" in event.name or top_level_aten(event)


def free(device: torch.device) -> None:
    """Forget the last setting: its compiled graphs (each objective would add cache entries
    to the same code objects) and its memory; restart the peak-memory count."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def vision_row(recipe: str, cfg: config_lib.TipsConfig, host: dict, args: Any) -> Row:
    """The baseline: the vision tower alone, forward + backward on the global crops."""
    device = torch.device(args.device)
    free(device)
    torch.manual_seed(0)
    vision = build_objective(cfg.objective, cfg.model, 1000).student.vision.to(device)
    pixels = host["global_crops"].flatten(0, 1).to(device).float().div_(255.0)
    bf16 = cfg.train.precision == "bf16" and device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = vision(pixels)
        (out.cls_alt.float().sum() + out.patch_tokens.float().mean()).backward()
        vision.zero_grad(set_to_none=True)

    flops = count_flops(step)
    sec = timed(step, args.steps, args.warmup, device)
    row = Row(recipe, "vision tower fwd+bwd (baseline)", args.batch / sec, flops / sec / 1e12, 0)
    row.peak_gib = peak_gib(device)
    row.launches = str(launches(step, device))
    return row


def graph_breaks(w: Worker, host: dict, step: int) -> str:
    """``torch._dynamo.explain`` of the objective's forward + loss, as the loop calls it."""
    batch = {k: v.to(w.device) for k, v in host.items() if k != "sample_index"}
    state = StepState(step=step, teacher_temp=w.schedules.at(step)["teacher_temp"])
    with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.use_bf16):
        explained = torch._dynamo.explain(w.objective)(batch, state)
    torch._dynamo.reset()
    return str(explained.graph_break_count)


def step_row(recipe: str, name: str, cfg: config_lib.TipsConfig, host: dict, args: Any) -> Row:
    """One setting of the training step (module doc): timed, then its proxies counted."""
    device = torch.device(args.device)
    free(device)
    step = max(100, cfg.optim.freeze_last_layer_steps)  # past the freeze: a steady step
    w = build_worker(cfg, device, step)
    breaks = graph_breaks(w, host, step) if cfg.train.compile else "-"
    if cfg.train.compile:  # after wrapping, as loop._setup does
        w.objective.compile_step()
    stream, meter, sched = batches(host), IntervalMeter(), w.schedules.at(step)

    def one() -> None:
        train_step(w, stream, sched, meter)

    one()  # creates the optimizer state (the one step that reads the finite flag)
    if name == "old":
        args.flops[recipe] = count_flops(one)
    sec = timed(one, args.steps, args.warmup, device)
    flops = args.flops.get(recipe, 0.0)
    row = Row(recipe, LABELS[name], args.batch / sec, flops / sec / 1e12, peak_gib(device))
    eager = torch.compiler.set_stance("force_eager") if cfg.train.compile else None
    with eager or contextlib.nullcontext(), count_host_reads(host_tensors(w.optimizer)) as r:
        one()
    row.reads, row.breaks = str(r.count), breaks
    row.launches = str(launches(one, device, args.profile))
    return row


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["tips_b14", "tipsv2_b14"])
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--batch", type=int, default=128, help="images per step (one device)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="0: from the device name")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="print the N kernels (CPU: ops) with most device time of each step setting",
    )
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every recipe")
    args = ap.parse_args()
    if "old" not in args.settings:  # the FLOPs of every row are the old step's
        args.settings.insert(0, "old")
    args.flops = {}
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # so that the profiler sees compiled graphs' kernels
        torch._inductor.config.cpp.enable_kernel_profile = True
    rows = []
    for recipe in args.recipes:
        settings = setting_overrides(recipe, args.batch, args.settings)
        old = load_cfg(recipe, args.batch, [*settings["old"], *args.overrides])
        keys = build_objective(old.objective, old.model, 1000).required_batch_keys()
        host = make_batch(old, args.batch, keys)
        if device.type == "cuda":
            host = {k: v.pin_memory() for k, v in host.items()}  # as the loop's batches
        rows.append(vision_row(recipe, old, host, args))
        for name, extra in settings.items():
            t0 = time.perf_counter()
            cfg = load_cfg(recipe, args.batch, [*extra, *args.overrides])
            rows.append(step_row(recipe, name, cfg, host, args))
            print(f"  {recipe}: {LABELS[name]}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if torch.distributed.is_initialized():  # fsdp_params' process group of one
        torch.distributed.destroy_process_group()
    print_table(rows, args)


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), 0.0)
    unit = "kernels" if device.type == "cuda" else "aten ops"
    print(
        f"\n{name}, torch {torch.__version__}, batch {args.batch}, {args.steps} timed steps, "
        f"peak {peak or '?'} TFLOP/s; {unit} per step from torch.profiler"
    )
    columns = ["recipe", "setting", "images/s", "ratio vs vision tower", "TFLOP/s", "MFU",
               "peak GiB", "host reads/step", "graph breaks", f"{unit}/step"]  # fmt: skip
    base, cells = {}, []
    for r in rows:
        base.setdefault(r.recipe, r.images_s)
        mfu = f"{100 * r.tflops / peak:.1f} %" if peak else "n/a"
        mem = f"{r.peak_gib:.1f}" if device.type == "cuda" else "-"
        cells.append([Path(r.recipe).stem, r.setting, f"{r.images_s:.1f}",
                      f"{r.images_s / base[r.recipe]:.2f}", f"{r.tflops:.3g}", mfu, mem,
                      r.reads, r.breaks, r.launches])  # fmt: skip
    print(markdown_table(columns, cells, left=2))


if __name__ == "__main__":
    main()
