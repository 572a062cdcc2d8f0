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
  Both load with ``load_sharded`` after wrapping. Both cache DCP's save plan as training
  does (``train.checkpoint_plan_cache``, default true), so the second save reuses the
  first's; ``--no-plan-cache`` plans both afresh.

Each mode saves twice (steps 1 and 2) and the table shows the second save (the steady state
of a run: e.g. the async stager's host buffers are kept), and the first save's stall apart.
Per mode and rank: the stall (how long ``save`` blocked the loop), the total write time
(until the checkpoint is complete on every rank), the bytes this rank wrote and its write
bandwidth (bytes / total write time), the load time (model and optimizer, wrapping not
counted), and the peak host RSS during the save and during the load (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before each phase: the memory of building the model
is not counted). Prints a table with ratios against ``full``.

DCP's planning cost against the number of ranks (``--planning``):

    .venv/bin/python benchmarks/checkpoint_io.py --planning --ranks 2,4,8

A save with DCP is collective: every rank makes a local plan (one write item per tensor),
rank 0 gathers all plans, makes the global plan (deduplicates what several ranks hold whole,
assigns storage), scatters it back, every rank writes, rank 0 gathers the write results and
writes ``.metadata`` (one entry per tensor per shard). That cost does not shrink with the
shards, and grows with the ranks. Per world size, ``--ranks`` gloo ranks (spawned, CPU) each
hold a state with exactly the entries of the ``tips_b14`` objective's (``--vision``/
``--text``: its student, EMA teacher, centres and Adafactor state after one step, counted
by building it once here), laid out as FSDP2 lays them out: a parameter of one dimension or
more, and Adafactor's ``row_var``/``variance``, a DTensor sharded on dim 0 over all ranks;
Adafactor's ``col_var`` and ``step``, buffers, 0-d parameters and the optimizer's settings
whole on every rank. The tensors are tiny (a few floats per rank): what is measured is the
per-entry work. Each rank times, ``--repeats`` times: ``dcp.save`` to a writer that keeps
nothing (every phase of DCP but the bytes: the planning, the collectives and the metadata;
its planner's local planning and rank 0's ``create_global_plan`` timed apart, and the CPU
seconds of rank 0 and of the other ranks: with more ranks than cores, wall seconds include
the wait for a core), the same with DCP's plan caching (``enable_plan_caching``; the first
of the repeats fills the cache), and ``dcp.save`` to local disk (``FileSystemWriter``,
fsync'd, as ``ShardedCheckpointer``). The table shows the median of the slowest rank, the
save's peak RSS (rank 0, which holds every plan, and the largest of the others) and the
size of ``.metadata``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import DefaultSavePlanner, StorageWriter

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
            *([f"model.vision={args.vision}"] if args.vision else []),
            *([f"model.text={args.text}"] if args.text else []),
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


def _save(
    mode: str,
    run: Path,
    objective: Any,
    optimizer: Any,
    strategy: Any,
    rank: int,
    plan_cache: bool = True,
):
    """Save twice (steps 1 and 2: the second shows the steady state, e.g. staging buffers
    kept); returns ([stall s per save], [write s per save], the second checkpoint's dir)."""
    from orchestrator.train.checkpoint import ShardedCheckpointer
    from orchestrator.train.state import TrainState, write_checkpoint_dir

    stalls, totals = [], []
    saver = None
    if mode != "full":
        async_save = mode == "dcp_async"
        saver = ShardedCheckpointer(str(run), None, rank, True, async_save, plan_cache)
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


def _in_gloo_rank(rank: int, world: int, store: str, body: Any) -> None:
    """Run ``body()`` as gloo rank ``rank`` of ``world`` and end the process: exit status 1
    with the traceback printed when it raised."""
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        body()
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see tests/gloo.py: libgloo's threads can abort a normal shutdown


def _rank_main(rank: int, mode: str, world: int, store: str, run: str, ns: dict) -> None:
    def body() -> None:
        args = argparse.Namespace(**ns)
        cfg = _cfg(args)
        objective, optimizer, strategy = _build(cfg, world)
        _fake_step(objective, optimizer)
        steady_kb = _status_kb("VmRSS")
        _hwm_reset()
        stalls, totals, ckpt = _save(
            mode, Path(run), objective, optimizer, strategy, rank, args.plan_cache
        )
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

    _in_gloo_rank(rank, world, store, body)


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


# ------------------------------------------------- --planning: DCP's per-save fixed cost


def planning_spec(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """``(key, layout, ndim)`` of every entry DCP saves for the recipe's objective and
    Adafactor after one step (keys as DCP flattens them); layout ``shard`` (a DTensor on
    dim 0 under FSDP2), ``whole`` (a tensor every rank holds) or ``object`` (not a tensor)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict import get_state_dict

    objective, optimizer, _ = _build(_cfg(args), 1)  # a world of one: nothing wrapped
    _fake_step(objective, optimizer)
    model, optim = get_state_dict(objective, optimizer)
    flat, _ = flatten_state_dict({"model": model, "optim": optim})
    params = {f"model.{n}" for n, _ in objective.named_parameters()}
    spec = []
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor):
            spec.append((key, "object", 0))
            continue
        name = key.rsplit(".", 1)[-1]
        sharded = (key in params or name in ("row_var", "variance")) and value.ndim > 0
        spec.append((key, "shard" if sharded else "whole", value.ndim))
    return spec


def _planning_state(spec: list[tuple[str, str, int]], world: int) -> dict[str, Any]:
    """This rank's tiny state with ``spec``'s entries: 4 rows of a sharded tensor per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    state: dict[str, Any] = {}
    for key, layout, ndim in spec:
        if layout == "object":
            state[key] = 0.5
        elif layout == "whole":
            state[key] = torch.ones((2,) * ndim)
        else:
            local = torch.full((4,) + (2,) * (ndim - 1), float(dist.get_rank()))
            state[key] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return state


class _NullWriter(StorageWriter):
    """A DCP writer that keeps nothing: ``dcp.save`` runs every phase but the bytes (the
    tensors are still resolved, and rank 0 still builds and pickles the metadata)."""

    metadata_bytes = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list) -> list:
        return plans

    def write_data(self, plan: Any, planner: Any) -> torch.futures.Future:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.storage import WriteResult

        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            size = data.nbytes if isinstance(data, torch.Tensor) else len(data.getbuffer())
            where = _StorageInfo(f"__{dist.get_rank()}_0.distcp", 0, size)  # as FileSystemWriter
            results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=where))
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Any, results: list) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}
        self.metadata_bytes = len(pickle.dumps(metadata))  # what FileSystemWriter writes

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class _TimedPlanner(DefaultSavePlanner):
    """DCP's default save planner, its local (set-up included) and global planning timed."""

    local_s = global_s = 0.0

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        super().set_up_planner(*args, **kwargs)
        self.local_s += time.perf_counter() - t0

    def create_local_plan(self) -> Any:
        t0 = time.perf_counter()
        plan = super().create_local_plan()
        self.local_s += time.perf_counter() - t0
        return plan

    def create_global_plan(self, all_plans: list) -> Any:
        t0 = time.perf_counter()
        out = super().create_global_plan(all_plans)
        self.global_s = time.perf_counter() - t0
        return out


def _planning_saves(state: dict, out: str, repeats: int) -> list[dict]:
    """``repeats`` times: ``dcp.save`` to ``_NullWriter``, the same with DCP's plan caching
    (``DefaultSavePlanner(enable_plan_caching=True)``: from the second save on, a rank whose
    local plan did not change sends none and rank 0 reuses its global plan and metadata),
    then to local disk (fsync'd)."""
    rows = []
    for i in range(repeats):
        for target in ("null", "cached", "disk"):
            planner = _TimedPlanner(enable_plan_caching=target == "cached")
            if target in ("null", "cached"):
                writer: Any = _NullWriter()
            else:
                writer = dcp.FileSystemWriter(f"{out}/ckpt_{i}", sync_files=True)
            before = _status_kb("VmRSS")
            _hwm_reset()
            dist.barrier()
            t0, cpu0 = time.perf_counter(), time.process_time()
            dcp.save(state, storage_writer=writer, planner=planner)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            rows.append(
                dict(target=target, s=seconds, cpu_s=cpu, local_s=planner.local_s,
                     global_s=planner.global_s, before_mb=before / 1024,
                     peak_mb=_status_kb("VmHWM") / 1024)
            )  # fmt: skip
    return rows


def _planning_rank(rank: int, world: int, store: str, out: str, spec: list, repeats: int):
    def body() -> None:
        rows = _planning_saves(_planning_state(spec, world), out, repeats)
        Path(out, f"planning_{rank}.json").write_text(json.dumps(rows))

    _in_gloo_rank(rank, world, store, body)


def _planning_row(world: int, out: Path, repeats: int) -> dict:
    """One world size: per save the slowest rank, then the median over the repeats."""
    from statistics import median

    ranks = [json.loads((out / f"planning_{r}.json").read_text()) for r in range(world)]

    def med(target: str, key: str, only_rank0: bool = False) -> float:
        picks = [
            [
                rows[i]
                for rows in (ranks[:1] if only_rank0 else ranks)
                if rows[i]["target"] == target
            ]
            for i in range(len(ranks[0]))
        ]
        return median(max(r[key] for r in pick) for pick in picks if pick)

    null, disk = med("null", "s"), med("disk", "s")
    cpu_other = [r["cpu_s"] for rows in ranks[1:] for r in rows if r["target"] == "null"]
    return dict(
        ranks=world, null_s=null, disk_s=disk, write_s=disk - null,
        cpu0_s=med("null", "cpu_s", only_rank0=True), cpu_other_s=median(cpu_other or [0.0]),
        cached_s=med("cached", "s"), cached_cpu0_s=med("cached", "cpu_s", only_rank0=True),
        local_s=med("null", "local_s"), global_s=med("null", "global_s", only_rank0=True),
        metadata_kb=(out / "ckpt_0" / ".metadata").stat().st_size / 1024,
        rss0_mb=max(r["peak_mb"] for r in ranks[0]),
        rise0_mb=max(r["peak_mb"] - r["before_mb"] for r in ranks[0]),
        rss_other_mb=max((r["peak_mb"] for rows in ranks[1:] for r in rows), default=0.0),
    )  # fmt: skip


def planning_table(rows: list[dict], spec: list) -> str:
    tensors = sum(1 for _, layout, _ in spec if layout != "object")
    sharded = sum(1 for _, layout, _ in spec if layout == "shard")
    lines = [
        f"{len(spec)} entries per rank ({tensors} tensors, {sharded} of them sharded DTensors)",
        "| ranks | save, nothing written s | its CPU s, rank 0 / another rank | local plan s "
        "| global plan s (rank 0) | plan cached: save, nothing written s (rank 0 CPU s) "
        "| save to disk s | write s (disk - nothing) | .metadata KB "
        "| peak RSS MB rank 0 (rise in the save) | peak RSS MB other ranks |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['null_s']:.3f} | {r['cpu0_s']:.2f} / {r['cpu_other_s']:.2f} "
            f"| {r['local_s']:.3f} | {r['global_s']:.3f} "
            f"| {r['cached_s']:.3f} ({r['cached_cpu0_s']:.2f}) "
            f"| {r['disk_s']:.3f} | {r['write_s']:.3f} | {r['metadata_kb']:.0f} "
            f"| {r['rss0_mb']:.0f} ({r['rise0_mb']:+.0f}) | {r['rss_other_mb']:.0f} |"
        )
    return "\n".join(lines)


def run_planning(args: argparse.Namespace, ranks: list[int]) -> None:
    spec = planning_spec(args)
    root = Path(tempfile.mkdtemp(prefix="ckpt-plan-", dir=args.dir))
    rows = []
    try:
        for world in ranks:
            out = root / f"w{world}"
            out.mkdir()
            t0 = time.perf_counter()
            mp.spawn(
                _planning_rank,
                args=(world, str(root / f"w{world}.store"), str(out), spec, args.repeats),
                nprocs=world,
            )
            rows.append(_planning_row(world, out, args.repeats))
            print(f"{world} ranks: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"DCP save planning, gloo on {os.cpu_count()} CPU cores, median of {args.repeats}")
    print(planning_table(rows, spec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default=None, help="default vit_l14; --planning: the recipe's")
    parser.add_argument("--text", default=None, help="default text_l; --planning: the recipe's")
    parser.add_argument("--ranks", default="2", help="gloo ranks; --planning: a list, 2,4,8")
    parser.add_argument("--planning", action="store_true", help="DCP's planning cost vs ranks")
    parser.add_argument("--repeats", type=int, default=3, help="--planning: saves per size")
    parser.add_argument(
        "--plan-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dcp modes: cache DCP's save plan (train.checkpoint_plan_cache; default on)",
    )
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the per-rank rows here")
    parser.add_argument("--table-from", default=None, help="print the table of a --json file")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.planning:
        run_planning(args, ranks)
        return
    if len(ranks) != 1:
        parser.error("--ranks takes one number without --planning")
    args.ranks = ranks[0]
    args.vision, args.text = args.vision or "vit_l14", args.text or "text_l"
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
