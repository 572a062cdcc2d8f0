"""Ablation on the synthetic set: CLIP-like vs TIPS vs TIPSv2, beside CLOC and MUG, over
several seeds, with error bars (issues 5, 8, 16).

    python benchmarks/ablation_synthetic.py --out runs/ablation --seeds 3           # tiny recipe
    python benchmarks/ablation_synthetic.py --steps 1000 --n 4096 --out runs/ablation_long

For every seed s (0..K-1) it writes a synthetic set with data seed s and trains the tiny
model (vit_test + text_test) with train seed s, the same steps and batch in every arm,
changing only the objective:

* ``clip``   - ``tiny_cpu.yaml`` with ``objective.alpha=0 objective.beta=0`` and
  ``objective.koleo_weight=0``: the dual-CLS contrastive terms only (CLIP-like);
* ``tips``   - ``tiny_cpu.yaml``: contrastive + DINO self-distillation + iBOT MIM
  (docs/method.md, "Loss weights");
* ``tipsv2`` - ``tiny_cpu.yaml`` with ``objective.name=tipsv2``: iBOT++ on all patch tokens,
  head-only EMA (docs/method.md, "TIPSv2 changes");
* ``cloc``   - ``cloc_tiny.yaml``: CLIP + region-text contrastive + grounding through the
  prompter (docs/method.md, "CLOC"), on the synthetic set's regions;
* ``mug``    - ``mug_tiny.yaml``: MAE reconstruction + alt-text captioning (docs/method.md, "MUG");
  it has no text encoder, so the text-side columns (zero-shot seg, retrieval) are n/a;

then evaluates each final checkpoint on its seed's synthetic evaluation split and prints one
Markdown table of mean +- std over the seeds (sample std, ddof 1): zero-shot segmentation
mIoU (TIPS protocol), linear-probe mIoU, depth-probe RMSE, and retrieval R@1 both ways.
Retrieval uses ``cls_syn`` because the synthetic captions are what the 2nd CLS is trained
against (docs/method.md). Below the table it checks the papers' direction: tips beats clip on
linear-probe mIoU and on depth RMSE, tipsv2 beats tips on zero-shot segmentation mIoU, each by
more than the larger of the two stds, and tips stays within one std of clip on retrieval;
each claim is reported as seen, whichever way it goes. Writes ``OUT/ablation.md``,
``OUT/ablation.json`` (every seed's numbers) and ``OUT/ablation.png`` (bars with error bars).
Rerunning the same command after an interruption keeps the arms already evaluated and the
checkpoints already trained.
Needs ``orchestrator.train.driver`` and the Ray Data pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from pathlib import Path

from orchestrator.recipes import RECIPES_DIR

RECIPES = RECIPES_DIR
ARMS: dict[str, tuple[str, list[str]]] = {  # arm -> (recipe, overrides)
    "clip": (
        "tiny_cpu.yaml",
        [
            "objective.name=tips",
            "objective.alpha=0",
            "objective.beta=0",
            "objective.koleo_weight=0",
        ],
    ),
    "tips": ("tiny_cpu.yaml", ["objective.name=tips"]),
    "tipsv2": ("tiny_cpu.yaml", ["objective.name=tipsv2"]),
    "cloc": ("cloc_tiny.yaml", []),
    "mug": ("mug_tiny.yaml", []),
}
COLUMNS = [  # (header, task, metric)
    ("zero-shot seg mIoU", "zero_shot_seg", "miou"),
    ("linear-probe mIoU", "linear_seg", "miou"),
    ("depth RMSE (m)", "depth", "rmse"),
    ("R@1 I->T", "retrieval", "i2t_r1"),
    ("R@1 T->I", "retrieval", "t2i_r1"),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/ablation", help="data, runs and the table go here")
    p.add_argument("--steps", type=int, default=200, help="train.total_steps of every arm")
    p.add_argument("--n", type=int, default=1024, help="synthetic training records")
    p.add_argument("--n-eval", type=int, default=256, help="synthetic evaluation records")
    p.add_argument("--seeds", type=int, default=3, help="K: seeds 0..K-1 (data and training)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of " + ", ".join(ARMS))
    p.add_argument("--probe-steps", type=int, default=300, help="linear-probe budget")
    p.add_argument("overrides", nargs="*", help="extra key=value recipe overrides for all arms")
    return p.parse_args(argv)


def train_arm(name: str, args: argparse.Namespace, data: Path, seed: int) -> str:
    """Train one arm and return its final checkpoint path."""
    from orchestrator import config as config_lib
    from orchestrator.train.driver import fit
    from orchestrator.train.state import newest_checkpoint

    done = newest_checkpoint(str(Path(args.out).resolve() / "runs" / f"ablation_{name}_seed{seed}"))
    if done and done.endswith(f"checkpoint_{args.steps:08d}"):
        return done  # trained by an earlier, interrupted invocation
    recipe, arm_overrides = ARMS[name]
    overrides = [
        f"data.train_uri={data / 'train'}",
        f"data.seed={seed}",
        f"train.seed={seed}",
        f"train.total_steps={args.steps}",
        f"run.name=ablation_{name}_seed{seed}",
        f"run.storage_uri={Path(args.out).resolve() / 'runs'}",
        "train.eval_every_steps=0",
        *arm_overrides,
        *args.overrides,
    ]
    cfg = config_lib.load(RECIPES / recipe, overrides)
    result = fit(cfg)
    if result.error is not None or result.checkpoint is None:
        raise RuntimeError(f"arm {name}: training failed: {result.error}")
    return str(result.checkpoint.path)


def evaluate_arm(checkpoint: str, data: Path, probe_steps: int) -> dict[str, float]:
    from orchestrator.eval import EvalOptions, load_encoders
    from orchestrator.eval.suite import VISION_TASKS, run_eval

    tasks = sorted({task for _, task, _ in COLUMNS})
    spec = f"synthetic:{data / 'eval'}"
    opts = EvalOptions(progress=False, probe_steps=probe_steps)
    enc = load_encoders(checkpoint)
    out: dict[str, float] = {}
    for task in tasks:
        if enc.text is None and task not in VISION_TASKS:
            continue  # a vision-only objective (MUG): no text tower to compare against
        task_opts = dataclasses.replace(opts, cls="syn") if task == "retrieval" else opts
        (result,) = run_eval(enc, [task], {task: spec}, task_opts)
        out.update({f"{task}/{k}": v for k, v in result.metrics.items()})
    return out


def summarise(per_seed: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple]]:
    """arm -> "task/metric" -> (mean, std, n) over the seeds (std 0 for a single seed)."""
    out: dict[str, dict[str, tuple]] = {}
    for arm, runs in per_seed.items():
        keys = sorted({k for r in runs for k in r})
        out[arm] = {}
        for k in keys:
            vals = [r[k] for r in runs if k in r]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[arm][k] = (statistics.fmean(vals), std, len(vals))
    return out


def table(stats: dict[str, dict[str, tuple]], steps: int, seeds: int) -> str:
    head = "| arm | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    lines = [
        f"Synthetic ablation, tiny recipes, {steps} steps, mean +- std over {seeds} seeds",
        "",
        head,
        "|---|" + "---|" * len(COLUMNS),
    ]
    for arm, m in stats.items():
        cells = []
        for _, task, metric in COLUMNS:
            key = f"{task}/{metric}"
            cells.append(f"{m[key][0]:.2f} +- {m[key][1]:.2f}" if key in m else "n/a")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def claims(stats: dict[str, dict[str, tuple]]) -> list[tuple[str, bool | None, str]]:
    """The papers' direction, checked on the table: (claim, held?, evidence)."""

    def get(arm: str, key: str) -> tuple[float, float] | None:
        v = stats.get(arm, {}).get(key)
        return (v[0], v[1]) if v else None

    def beats(a: str, b: str, key: str, higher: bool, what: str) -> tuple[str, bool | None, str]:
        x, y = get(a, key), get(b, key)
        claim = f"{a} beats {b} on {what} by more than the larger std"
        if x is None or y is None:
            return claim, None, "arm missing"
        gap = (x[0] - y[0]) if higher else (y[0] - x[0])
        margin = max(x[1], y[1])
        return claim, gap > margin, f"{x[0]:.2f}+-{x[1]:.2f} vs {y[0]:.2f}+-{y[1]:.2f}"

    out = [
        beats("tips", "clip", "linear_seg/miou", True, "linear-probe mIoU"),
        beats("tips", "clip", "depth/rmse", False, "depth RMSE"),
        beats("tipsv2", "tips", "zero_shot_seg/miou", True, "zero-shot seg mIoU"),
    ]
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r1"):
        x, y = get("tips", key), get("clip", key)
        claim = f"tips within one std of clip on {key} (or above)"
        if x is None or y is None:
            out.append((claim, None, "arm missing"))
        else:
            held = x[0] >= y[0] - max(x[1], y[1])
            out.append((claim, held, f"{x[0]:.2f}+-{x[1]:.2f} vs {y[0]:.2f}+-{y[1]:.2f}"))
    return out


def claims_text(checked: list[tuple[str, bool | None, str]]) -> str:
    word = {True: "held", False: "NOT held", None: "not checked"}
    return "".join(f"- {c}: **{word[h]}** ({e})\n" for c, h, e in checked)


def plot(stats: dict[str, dict[str, tuple]], path: Path, title: str) -> None:
    """One panel per column: a bar per arm at its mean, error bars of one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.2 * len(COLUMNS), 3.2))
    for ax, (header, task, metric) in zip(axes, COLUMNS):
        arms = [a for a in stats if f"{task}/{metric}" in stats[a]]
        means = [stats[a][f"{task}/{metric}"][0] for a in arms]
        stds = [stats[a][f"{task}/{metric}"][1] for a in arms]
        ax.bar(arms, means, yerr=stds, capsize=4, color="#4C72B0")
        ax.set_title(header, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=45)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"unknown arms {unknown}; known: {list(ARMS)}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    per_seed: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    saved = out / "ablation.json"
    if saved.is_file():  # an interrupted invocation with the same settings: keep its arms
        old = json.loads(saved.read_text())
        same = {k: v for k, v in old["args"].items() if k != "seeds"} == {
            k: v for k, v in vars(args).items() if k != "seeds"
        }
        if same:
            per_seed.update({a: r for a, r in old["per_seed"].items() if a in per_seed})
    for seed in range(args.seeds):
        data = out / f"data_seed{seed}"
        if not (data / "eval").is_dir():
            from orchestrator.data.synthetic import write_synthetic

            write_synthetic(str(data), n=args.n, seed=seed, n_eval=args.n_eval)
        for arm in arms:
            if len(per_seed[arm]) > seed:
                continue  # evaluated by an earlier invocation
            checkpoint = train_arm(arm, args, data, seed)
            per_seed[arm].append(evaluate_arm(checkpoint, data, args.probe_steps))
            (out / "ablation.json").write_text(
                json.dumps({"args": vars(args), "per_seed": per_seed}, indent=2)
            )
    stats = summarise(per_seed)
    text = table(stats, args.steps, args.seeds) + "\n" + claims_text(claims(stats))
    print(text)
    (out / "ablation.md").write_text(text)
    plot(stats, out / "ablation.png", f"tiny recipes, {args.steps} steps, {args.seeds} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
