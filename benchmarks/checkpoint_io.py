"""Checkpoint I/O under FSDP: today's gathered write against DCP sharded sync and async.

    .venv/bin/python benchmarks/checkpoint_io.py                       # ViT-L TIPS, 2 ranks
    .venv/bin/python benchmarks/checkpoint_io.py --vision vit_s14 --text text_s   # quicker

Each mode runs in fresh processes: ``--ranks`` gloo ranks (spawned, as tests/gloo.py starts
them) build the ``tips_b14`` recipe's objective with ``--vision``/``--text`` swapped in
(default ViT-L/14 + text_l: a 511M-parameter student and its 327M-parameter full EMA
teacher, TIPS heads, loss centres), shard it with FSDP2 (``scaling.strategy=fsdp``), give
every parameter a random gradient and take one Adafactor step (its factored state exists),
then save one checkpoint and load it back into a fresh sharded objective:

* ``full``: today's ``train.checkpoint_format=full``: every rank joins the gather of the
  whole state (``FsdpStrategy.full_state_dicts``), rank 0 writes ``model.pt`` + ``optim.pt``
  (``state.write_checkpoint_dir``, fsync'd); load as ``loop._restore`` does: every rank
  reads ``model.pt`` into the unwrapped objective, then, after wrapping, the whole
  ``optim.pt`` (``load_optimizer_state``). Ray's copy of the directory to run storage,
  which today follows, is not counted.
* ``dcp_sync``: ``ShardedCheckpointer(async_save=False)``: each rank writes its shards;
* ``dcp_async``: ``ShardedCheckpointer(async_save=True)``: the loop is blocked only while
  the state is copied to host memory; the rest is written in the background (the loop then
  polls ``ready()`` every 10 ms and does nothing else, so the write has the cores to itself:
  under a real training step it would take longer, the stall would not).
  Both load with ``load_sharded`` after wrapping.

Each mode saves twice (steps 1 and 2) and the table shows the second save (the steady state
of a run: e.g. the async stager's host buffers are kept), and the first save's stall apart.
Per mode and rank: the stall (how long ``save`` blocked the loop), the total write time
(until the checkpoint is complete on every rank), the bytes this rank wrote and its write
bandwidth (bytes / total write time), the load time (model and optimizer, wrapping not
counted), and the peak host RSS during the save and during the load (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before each phase: the memory of building the model
is not counted). Prints a table with ratios against ``full``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("full", "dcp_sync", "dcp_async")


def _hwm_reset() -> None:
    """Reset this process's peak RSS (Linux: ``VmHWM`` starts again from the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cfg(args: argparse.Namespace) -> Any:
    from orchestrator import config as config_lib
    from orchestrator.recipes import find_recipe

    return config_lib.load(
        find_recipe("tips_b14"),
        [
            f"model.vision={args.vision}",
            f"model.text={args.text}",
            "model.tokenizer=bpe",  # no tokenizer file is read: only its vocabulary size
            "model.tokenizer_path=null",
            "scaling.strategy=fsdp",
            "train.precision=fp32",
            "train.compile=false",
            "data.train_uri=unused",
        ],
    )


def _build(cfg: Any, world: int) -> tuple[Any, Any, Any]:
    """The sharded objective, its Adafactor and the FSDP strategy (one optimizer step taken)."""
    from orchestrator.train.optim import build_optimizer
    from orchestrator.train.parallel import wrap_for_distributed
    from tips_model.objectives import build_objective

    torch.manual_seed(0)
    objective = build_objective(cfg.objective, cfg.model, vocab_size=32000)
    strategy = wrap_for_distributed(objective, cfg, torch.device("cpu"), world)
    optimizer = build_optimizer(objective, cfg)
    return objective, optimizer, strategy


def _fake_step(objective: Any, optimizer: Any) -> None:
    for p in objective.student.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _dir_bytes(path: Path, rank: int, mode: str) -> int:
    """Bytes this rank wrote into checkpoint directory ``path``."""
    if mode == "full":
        return sum(f.stat().st_size for f in path.iterdir()) if rank == 0 else 0
    own = sum(f.stat().st_size for f in path.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        own += sum((path / n).stat().st_size for n in (".metadata", "train_state.json"))
    return own


def _save(mode: str, run: Path, objective: Any, optimizer: Any, strategy: Any, rank: int):
    """Save twice (steps 1 and 2: the second shows the steady state, e.g. staging buffers
    kept); returns ([stall s per save], [write s per save], the second checkpoint's dir)."""
    from orchestrator.train.checkpoint import ShardedCheckpointer
    from orchestrator.train.state import TrainState, write_checkpoint_dir

    stalls, totals = [], []
    saver = None
    if mode != "full":
        saver = ShardedCheckpointer(str(run), None, rank, True, async_save=mode == "dcp_async")
    for step in (1, 2):
        state = TrainState(step=step)
        dist.barrier()
        t0 = time.perf_counter()
        if saver is None:
            model, optim = strategy.full_state_dicts(objective, optimizer, rank)
            if rank == 0:
                path = write_checkpoint_dir(model, optim, state, "{}\n")
                shutil.move(str(path), run / path.name)
                shutil.rmtree(path.parent, ignore_errors=True)
            del model, optim
            dist.barrier()  # every rank waits for rank 0's write before training on
            stalls.append(time.perf_counter() - t0)
        else:
            saver.save(objective, optimizer, state, "{}\n", wait=False)
            stalls.append(time.perf_counter() - t0)
            while not saver.ready():
                time.sleep(0.01)
        totals.append(time.perf_counter() - t0)
    if saver is not None:
        saver.close()
    return stalls, totals, run / "checkpoint_00000002"


def _load(mode: str, ckpt: Path, cfg: Any, world: int, rank: int) -> tuple[float, float]:
    """Load into a fresh objective; returns (load s, wrapping s)."""
    from orchestrator.train.checkpoint import ShardedCheckpointer, load_sharded
    from orchestrator.train.optim import build_optimizer
    from orchestrator.train.parallel import wrap_for_distributed
    from orchestrator.train.state import read_optimizer_state, restore_checkpoint_dir
    from tips_model.objectives import build_objective

    torch.manual_seed(1)
    objective = build_objective(cfg.objective, cfg.model, vocab_size=32000)
    _hwm_reset()
    dist.barrier()
    t0 = time.perf_counter()
    if mode == "full":
        restore_checkpoint_dir(ckpt, objective, None)
    t_model = time.perf_counter() - t0
    t1 = time.perf_counter()
    strategy = wrap_for_distributed(objective, cfg, torch.device("cpu"), world)
    optimizer = build_optimizer(objective, cfg)
    wrap = time.perf_counter() - t1
    t2 = time.perf_counter()
    if mode == "full":
        strategy.load_optimizer_state(objective, optimizer, read_optimizer_state(ckpt))
    else:
        group = ShardedCheckpointer(str(ckpt.parent), None, rank, True, False).group
        load_sharded(str(ckpt), None, objective, optimizer, group)
    dist.barrier()
    return t_model + time.perf_counter() - t2, wrap


def _rank_main(rank: int, mode: str, world: int, store: str, run: str, ns: dict) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        args = argparse.Namespace(**ns)
        cfg = _cfg(args)
        objective, optimizer, strategy = _build(cfg, world)
        _fake_step(objective, optimizer)
        steady_kb = _status_kb("VmRSS")
        _hwm_reset()
        stalls, totals, ckpt = _save(mode, Path(run), objective, optimizer, strategy, rank)
        save_peak_kb = _status_kb("VmHWM")
        written = _dir_bytes(ckpt, rank, mode)
        del objective, optimizer, strategy
        load_s, wrap_s = _load(mode, ckpt, cfg, world, rank)
        row = dict(
            mode=mode, rank=rank, first_stall_s=stalls[0], stall_s=stalls[1],
            first_total_s=totals[0], total_s=totals[1], bytes=written,
            load_s=load_s, wrap_s=wrap_s, steady_rss_gb=steady_kb / 2**20,
            save_peak_gb=save_peak_kb / 2**20, load_peak_gb=_status_kb("VmHWM") / 2**20,
        )  # fmt: skip
        Path(run, f"result_{rank}.json").write_text(json.dumps(row))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see tests/gloo.py: libgloo's threads can abort a normal shutdown


def run_mode(mode: str, args: argparse.Namespace, root: Path) -> list[dict]:
    run = root / mode
    run.mkdir(parents=True)
    store = str(root / f"{mode}.store")
    mp.spawn(_rank_main, args=(mode, args.ranks, store, str(run), vars(args)), nprocs=args.ranks)
    rows = [json.loads((run / f"result_{r}.json").read_text()) for r in range(args.ranks)]
    shutil.rmtree(run, ignore_errors=True)
    return rows


def table(results: dict[str, list[dict]]) -> str:
    base = results["full"]
    base_stall = max(r["stall_s"] for r in base)
    base_total = max(r["total_s"] for r in base)
    base_load = max(r["load_s"] for r in base)
    lines = [
        "| mode | stall s (x full) | first save's stall s | write s (x full) | load s (x full) "
        "| written MB per rank | write MB/s per rank | RSS GB before the save per rank "
        "| save peak RSS GB per rank | load peak RSS GB per rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, rows in results.items():
        stall = max(r["stall_s"] for r in rows)
        total = max(r["total_s"] for r in rows)
        load = max(r["load_s"] for r in rows)
        mb = " / ".join(f"{r['bytes'] / 1e6:.0f}" for r in rows)
        bw = " / ".join(f"{r['bytes'] / 1e6 / r['total_s']:.0f}" for r in rows)
        steady = " / ".join(f"{r['steady_rss_gb']:.2f}" for r in rows)
        save_rss = " / ".join(f"{r['save_peak_gb']:.2f}" for r in rows)
        load_rss = " / ".join(f"{r['load_peak_gb']:.2f}" for r in rows)
        lines.append(
            f"| {mode} | {stall:.2f} ({stall / base_stall:.2f}) "
            f"| {max(r['first_stall_s'] for r in rows):.2f} | {total:.2f} "
            f"({total / base_total:.2f}) | {load:.2f} ({load / base_load:.2f}) | {mb} | {bw} "
            f"| {steady} | {save_rss} | {load_rss} |"
        )
    return "\n".join(lines)


def _run_all(args: argparse.Namespace) -> dict[str, list[dict]]:
    root = Path(tempfile.mkdtemp(prefix="ckpt-io-", dir=args.dir))
    results = {}
    try:
        for mode in MODES:
            t0 = time.perf_counter()
            results[mode] = run_mode(mode, args, root)
            print(f"{mode}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="vit_l14")
    parser.add_argument("--text", default="text_l")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the per-rank rows here")
    parser.add_argument("--table-from", default=None, help="print the table of a --json file")
    args = parser.parse_args()
    if args.table_from:
        results = json.loads(Path(args.table_from).read_text())
    else:
        results = _run_all(args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    world = len(results["full"])
    print(f"{world} gloo ranks, FSDP, {args.vision} + {args.text} TIPS (student + EMA teacher)")
    print(table(results))
    print(
        "DCP per-rank write bandwidth (sync): "
        + ", ".join(
            f"rank {r['rank']} {r['bytes'] / 1e6 / r['total_s']:.0f} MB/s"
            for r in results["dcp_sync"]
        )
    )


if __name__ == "__main__":
    main()
