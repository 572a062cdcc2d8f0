"""The plan past one machine: the figures docs/scaling.md is written from (issue 21).

    .venv/bin/python benchmarks/scaling_plan.py                     # tables from the defaults
    .venv/bin/python benchmarks/scaling_plan.py --measure-ray-data  # + Ray Data tasks/s here

Computed here, from the code:

* parameters and checkpoint bytes of each recipe: the objective is built on the meta device
  (no memory), with the released tokenizer's vocabulary (32000, docs/method.md,
  "Tokenizer"); the model state is ``objective.state_dict()`` in fp32 (student, EMA teacher,
  heads, centres), the optimizer state is what ``orchestrator/train/adafactor.py`` keeps
  (factored row/column second moments for matrices, a full one for vectors);
* FLOPs per image of a training step, counted by ``torch.utils.flop_counter`` on the meta
  device: the student's towers (1 x 224 + 6 x 98 crops, alt-text + synthetic caption) forward
  x 3 for forward + backward, plus the teacher's forward on the global crop; gradient
  checkpointing (``model.grad_checkpointing``) adds one more student forward. The heads are
  left out: the count for ``tips_b14`` (410 GFLOP) is within 3 % of the whole-step count that
  benchmarks/gpu_step.py measured (419 GFLOP, README "Performance").

Measured elsewhere and passed in (each flag's help names the measurement; the defaults are
the figures in README "Performance"): the ``tips_b14`` step rate on one GPU, the data
pipeline's images/s per CPU core, the per-rank DCP write and staging bandwidths
(benchmarks/checkpoint_io.py), the recovery times (benchmarks/elastic_recovery.py). Spot
interruption rates are AWS Spot Instance Advisor's bands ("the rate at which Spot has
reclaimed capacity during the trailing month": <5 %, 5-10 %, 10-15 %, 15-20 %, >20 %).

A GPU other than B/14's is estimated at B/14's measured efficiency: images/s scale with the
FLOPs per image. That is an assumption (a larger model usually reaches a higher MFU), and
the tables say "est." where it is used.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import markdown_table  # noqa: E402
from orchestrator import config as config_lib  # noqa: E402
from orchestrator.recipes import find_recipe  # noqa: E402
from tips_model.objectives import build_objective  # noqa: E402

VOCAB = 32000  # the released sentencepiece model (docs/method.md, "Tokenizer")
GPUS_PER_NODE = 8  # p4d/p5 and a3 machines: 8 GPUs each
SAMPLE_BYTES = 3 * 224 * 224 + 6 * 3 * 98 * 98 + 16 * 16 + 2 * 64 * 8  # uint8 crops, mask, ids


# The figures measured elsewhere, passed in as flags: (flag, default, where it was measured).
MEASURED = [
    ("--b14-img-s", 575.0,
     "tips_b14 images/s on one GPU (README 'GPU step': H200, batch 256, bf16)"),
    ("--img-s-per-core", 287.5,
     "data pipeline images/s per CPU core (README 'Data throughput': Ray Data, "
     "epoch 2, 575 img/s on 2 cores, 1x224 + 6x98 crops of ~500x400 JPEGs)"),
    ("--dcp-write-mb-s", 283.0,
     "per-rank DCP write bandwidth, MB/s (README 'Checkpoint I/O': "
     "benchmarks/checkpoint_io.py, dcp_sync, 2 ranks on one local disk); 0: omit"),
    ("--dcp-stage-mb-s", 4540.0,
     "per-rank async-DCP staging bandwidth (the stall), MB/s (README 'Checkpoint "
     "I/O': 1681 MB per rank staged in 0.37 s); 0: omit"),
    ("--full-write-mb-s", 248.0,
     "the full layout: rank 0's gather + torch.save bandwidth, MB/s (README "
     "'Checkpoint I/O': 3359 MB in 13.52 s); 0: omit"),
    ("--recovery-kill-s", 17.8, "node killed -> next step, s (README 'Elastic recovery')"),
    (
        "--recovery-drain-s",
        17.8,
        "drain notice -> next step with the early restart, s: the most a drained run stalls "
        "(README 'Elastic recovery')",
    ),
]  # fmt: skip


@dataclass
class ModelFigures:
    recipe: str
    student_params: float
    state_bytes: float  # fp32 objective.state_dict()
    optim_bytes: float  # Adafactor state
    gflop_per_image: float
    global_batch: int
    checkpoint_every: int
    total_steps: int


def _adafactor_numel(p: torch.Tensor) -> int:
    """Elements of the Adafactor state of one parameter (orchestrator/train/adafactor.py)."""
    shape = list(p.shape)
    if p.ndim > 1:
        return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
    return p.numel()


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def model_figures(recipe: str) -> ModelFigures:
    cfg = config_lib.load(
        find_recipe(recipe),
        ["data.train_uri=/unused", "model.tokenizer=bpe", "model.tokenizer_path=null"],
    )
    with torch.device("meta"):
        objective = build_objective(cfg.objective, cfg.model, VOCAB)
    state = objective.state_dict()
    state_bytes = sum(v.numel() * v.element_size() for v in state.values())
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optim_bytes = 4 * sum(_adafactor_numel(p) for p in trainable)
    vision, text = objective.student.vision, objective.student.text
    a = cfg.augment
    meta = torch.device("meta")
    g = _flops(
        lambda: vision(torch.zeros(1, 3, a.global_crop_size, a.global_crop_size, device=meta))
    )
    loc = _flops(
        lambda: vision(torch.zeros(1, 3, a.local_crop_size, a.local_crop_size, device=meta))
    )
    ids = torch.ones(1, cfg.model.max_text_len, dtype=torch.long, device=meta)
    txt = _flops(lambda: text(ids))
    student_fwd = a.num_global_crops * g + a.num_local_crops * loc + 2 * txt
    passes = 4 if cfg.model.grad_checkpointing else 3
    step = passes * student_fwd + a.num_global_crops * g  # + the teacher's forward
    return ModelFigures(
        recipe=recipe,
        student_params=float(sum(p.numel() for p in objective.student.parameters())),
        state_bytes=float(state_bytes),
        optim_bytes=float(optim_bytes),
        gflop_per_image=step / 1e9,
        global_batch=cfg.train.global_batch_size,
        checkpoint_every=cfg.train.checkpoint_every_steps,
        total_steps=cfg.train.total_steps,
    )


def measure_ray_data_tasks(tasks: int = 400) -> float:
    """Map tasks per second one Ray Data streaming executor runs here (2 cores): no-op tasks
    of one row each, consumed through ``streaming_split`` by two readers as the trainer's
    workers do. The executor's scheduling loop is the part that does not grow with nodes."""
    import threading

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.range(tasks, override_num_blocks=tasks).map_batches(
            lambda b: b, batch_size=None
        )
        splits = ds.streaming_split(2, equal=False)
        counts = [0, 0]

        def consume(i: int) -> None:
            for batch in splits[i].iter_batches(batch_size=None):
                counts[i] += len(batch["id"])

        t0 = time.perf_counter()
        threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        assert sum(counts) == tasks, counts
        return tasks / seconds
    finally:
        ray.shutdown()


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"


def _fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["tips_b14", "tips_g14"])
    ap.add_argument("--gpus", nargs="+", type=int, default=[64, 256, 1024])
    for flag, default, help_ in MEASURED:
        ap.add_argument(flag, type=float, default=default, help=help_)
    ap.add_argument(
        "--interruptions", nargs="+", type=float, default=[0.05, 0.20],
        help="spot interruptions per node per month (AWS Spot Instance Advisor bands)",
    )  # fmt: skip
    ap.add_argument("--ray-data-tasks-s", type=float, default=0.0, help="0: omit or measure")
    ap.add_argument("--measure-ray-data", action="store_true")
    args = ap.parse_args()

    figures = [model_figures(r) for r in args.recipes]
    base = next((f for f in figures if f.recipe == "tips_b14"), None) or model_figures("tips_b14")
    rates = {f.recipe: args.b14_img_s * base.gflop_per_image / f.gflop_per_image for f in figures}
    _models_table(figures, rates)
    tasks_s = args.ray_data_tasks_s
    if args.measure_ray_data:
        tasks_s = measure_ray_data_tasks()
        print(f"\nRay Data, one streaming executor on this machine: {tasks_s:.0f} map tasks/s")
    _plan_table(args, figures, rates)
    _preemption_table(args, figures, rates)
    _ray_table(args, figures, rates, tasks_s)


def _models_table(figures: list[ModelFigures], rates: dict[str, float]) -> None:
    rows = []
    for f in figures:
        est = "" if f.recipe == "tips_b14" else " (est.)"
        rows.append([f.recipe, f"{f.student_params / 1e6:.0f}M", _fmt_bytes(f.state_bytes),
                     _fmt_bytes(f.optim_bytes), _fmt_bytes(f.state_bytes + f.optim_bytes),
                     f"{f.gflop_per_image:.0f}", f"{rates[f.recipe]:.0f}{est}"])  # fmt: skip
    print("## Models (computed from the recipes)\n")
    print(markdown_table(["recipe", "student params", "model state (fp32)", "Adafactor state",
                          "checkpoint", "GFLOP / image (step)", "GPU img/s"], rows))  # fmt: skip


def _plan_table(args, figures: list[ModelFigures], rates: dict[str, float]) -> None:
    rows = []
    for f in figures:
        ckpt = f.state_bytes + f.optim_bytes
        for n in args.gpus:
            step = f.global_batch / (n * rates[f.recipe])
            shard = ckpt / n
            write = f"{shard / 1e6 / args.dcp_write_mb_s:.1f} s" if args.dcp_write_mb_s else "-"
            stall = f"{shard / 1e6 / args.dcp_stage_mb_s:.2f} s" if args.dcp_stage_mb_s else "-"
            full = f"{ckpt / 1e6 / args.full_write_mb_s:.0f} s" if args.full_write_mb_s else "-"
            rows.append([f.recipe, n, f"{f.global_batch / n:.0f}", f"{step:.2f} s",
                         _fmt_s(step * f.total_steps),
                         f"{rates[f.recipe] / args.img_s_per_core:.2f}", _fmt_bytes(shard),
                         write, stall, full, _fmt_s(step * f.checkpoint_every)])  # fmt: skip
    print("\n## Per scale: step, data CPUs, checkpoints\n")
    print(markdown_table(["recipe", "GPUs", "batch / GPU", "step", "run", "CPU cores / GPU",
                          "checkpoint shard / rank", "write (DCP)", "stall (async DCP)",
                          "today: rank 0 writes all", "checkpoint interval"], rows))  # fmt: skip


def _preemption_table(args, figures: list[ModelFigures], rates: dict[str, float]) -> None:
    rows = []
    for f in figures:
        for n in args.gpus:
            nodes = math.ceil(n / GPUS_PER_NODE)
            interval = f.global_batch / (n * rates[f.recipe]) * f.checkpoint_every
            notice_h = n * args.recovery_drain_s / 3600
            kill_h = n * (args.recovery_kill_s + interval / 2) / 3600
            for rate in args.interruptions:
                per_day = nodes * rate / 30
                lost_frac = per_day * kill_h / (n * 24)
                rows.append([f.recipe, n, nodes, f"{rate:.0%}", f"{per_day:.2f}",
                             f"{notice_h:.1f}", f"{kill_h:.1f}", f"{lost_frac:.2%}"])  # fmt: skip
    print("\n## Spot preemptions: expected per day and work lost\n")
    print(markdown_table(["recipe", "GPUs", "nodes", "interruptions / node / month",
                          "preemptions / day", "lost per preemption, notice (GPU-h)",
                          "lost, no notice (GPU-h)", "lost / day, no notice"], rows))  # fmt: skip


def _ray_table(args, figures, rates, tasks_s: float) -> None:
    rows = []
    for f in figures:
        for n in args.gpus:
            img_s = n * rates[f.recipe]
            tasks = img_s / 256
            share = f"{tasks / tasks_s:.1f}x" if tasks_s else "-"
            node_in = GPUS_PER_NODE * rates[f.recipe] * SAMPLE_BYTES
            rows.append([f.recipe, n, f"{img_s:,.0f}", f"{tasks:.0f}", share,
                         f"{node_in / 1e9:.2f} GB/s"])  # fmt: skip
    print("\n## Ray load per scale\n")
    print(markdown_table(["recipe", "GPUs", "images/s (cluster)", "map tasks/s (256 rows)",
                          "share of one executor", "object store in, per node"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
