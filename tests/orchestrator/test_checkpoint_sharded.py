"""Sharded (DCP) checkpoints: exact round trips, resharding, incomplete writes, S3, export.

* world of one: save, load into a fresh objective and optimizer, every tensor equal;
* a damaged or unfinished checkpoint (no ``.metadata``, a missing or short shard file, no
  ``train_state.json``) is refused by name and ``newest_checkpoint`` takes the previous one;
* an asynchronous save whose process is SIGKILLed while the shards are being written leaves
  the previous checkpoint as the newest complete one, and it loads; the resume (a new
  ``ShardedCheckpointer``) removes the partial directory, and only unfinished ones newer than
  the newest complete one (never a complete, a damaged or an older one); a save into a
  partial directory of its step replaces it whole;
* S3 through the moto server: the same files, found and loaded there;
* ``tips export``: a sharded checkpoint to today's single-file layout (model.pt, optim.pt);
* slow: written by 2 FSDP ranks (gloo; synchronously and asynchronously), loaded on 1 process
  and on 3 FSDP ranks, student, EMA teacher, centres and Adafactor state equal exactly; the
  same for 2 DDP ranks, loaded on 1 process and on 2 DDP ranks.
"""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.train import state as ckpt
from orchestrator.train.checkpoint import (
    ShardedCheckpointer,
    load_sharded,
    read_full_state,
    sharded_problem,
)
from orchestrator.train.optim import build_optimizer
from orchestrator.train.state import TrainState
from tests.gloo import run_gloo
from tips_model.objectives import ModelConfig, StepState, TipsObjectiveConfig, build_objective

VOCAB = 100
HEAD = dict(head_out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, separate_ibot_head=True)
REPO = Path(__file__).resolve().parents[2]


def _objective() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_objective(
        TipsObjectiveConfig(**HEAD),
        ModelConfig(vision="vit_test", text="text_test", max_text_len=16),
        vocab_size=VOCAB,
    )


def _cfg(strategy: str = "fsdp") -> SimpleNamespace:
    optim = SimpleNamespace(name="adafactor", lr=1e-2, weight_decay=0.04, betas=[0.9, 0.999])
    return SimpleNamespace(
        optim=optim,
        scaling=SimpleNamespace(strategy=strategy),
        train=SimpleNamespace(precision="fp32", mixed_precision="autocast"),
    )


def _batch(step: int, rows: slice) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(1, VOCAB, (4, 16), generator=g)
    batch = {
        "global_crops": torch.randint(0, 256, (4, 1, 3, 32, 32), generator=g, dtype=torch.uint8),
        "local_crops": torch.randint(0, 256, (4, 2, 3, 16, 16), generator=g, dtype=torch.uint8),
        "masks": torch.rand(4, 1, 4, 4, generator=g) < 0.3,
        "alt_ids": ids,
        "syn_ids": torch.roll(ids, 1, dims=1),
    }
    return {k: v[rows] for k, v in batch.items()}


def _train(objective, optimizer, strategy, steps: int, rows: slice) -> None:
    """A few optimizer steps (student, Adafactor state, EMA teacher and centres all move)."""
    for step in range(steps):
        out = objective(_batch(step, rows), StepState(step, teacher_temp=0.05))
        out.loss.backward()
        if strategy is not None:
            strategy.finish_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.update_teacher(0.9)


def _trained(steps: int = 2):
    objective = _objective()
    optimizer = build_optimizer(objective, _cfg("none"))
    _train(objective, optimizer, None, steps, slice(0, 4))
    return objective, optimizer


def _assert_equal(a: dict, b: dict, where: str) -> None:
    """Nested dicts/lists of tensors and plain values equal exactly."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ {set(a) ^ set(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), torch.as_tensor(b).cpu()), where
    else:
        assert a == b, where


def _named_optim(objective, optimizer, every_rank: bool = False) -> dict:
    """``optimizer.state_dict()`` keyed by parameter names (comparable across processes);
    on rank 0 only (FSDP's gather to the CPU) unless ``every_rank`` (whole replicas: DDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    return get_optimizer_state_dict(objective, optimizer, options=options)


def _save(run: Path | str, objective, optimizer, step: int, storage=None) -> str:
    saver = ShardedCheckpointer(str(run), storage, 0, False, async_save=False)
    saver.save(objective, optimizer, TrainState(step=step, seed=3), "model: {}\n", wait=True)
    ((saved_step, uri),) = saver.ready()
    assert saved_step == step
    return uri


def test_world_of_one_round_trip_is_exact(tmp_path):
    objective, optimizer = _trained()
    uri = _save(tmp_path / "run", objective, optimizer, step=2)
    saved = copy.deepcopy(objective.state_dict())
    names = {p.name for p in Path(uri).iterdir()}
    assert {".metadata", "train_state.json", "config.yaml", "__0_0.distcp"} <= names
    assert sharded_problem(uri) is None and ckpt.checkpoint_problem(uri) is None
    assert ckpt.newest_checkpoint(str(tmp_path / "run")) == uri
    assert ckpt.latest_train_state(str(tmp_path / "run")).step == 2

    fresh = _objective()
    fresh_opt = build_optimizer(fresh, _cfg("none"))
    load_sharded(uri, None, fresh, fresh_opt)
    _assert_equal(objective.state_dict(), fresh.state_dict(), "model")
    _assert_equal(_named_optim(objective, optimizer), _named_optim(fresh, fresh_opt), "optim")
    # the same next step from the loaded state as from the original
    _train(objective, optimizer, None, 1, slice(0, 4))
    _train(fresh, fresh_opt, None, 1, slice(0, 4))
    _assert_equal(objective.state_dict(), fresh.state_dict(), "after a step")
    _assert_equal(read_full_state(uri)["model"], saved, "read_full_state")


def test_the_cached_save_plan_writes_every_save_exactly(tmp_path):
    """train.checkpoint_plan_cache (on by default): DCP's plan is cached after the first
    save (the saves of one model reuse it); another model's tensors in the same process
    change the plan, which is then merged and made afresh; every save loads exactly."""
    from torch.distributed.checkpoint.planner import SavePlanner

    def saved_states(objective, optimizer, run: Path, steps) -> dict:
        saver = ShardedCheckpointer(str(run), None, 0, False, async_save=False)
        want = {}
        for step in steps:
            if step:
                _train(objective, optimizer, None, 1, slice(0, 4))
            saver.save(objective, optimizer, TrainState(step=step), "{}\n", wait=True)
            assert "TipsCachedSavePlanner" in SavePlanner._cached_metadata  # the cache is used
            optim = _named_optim(objective, optimizer)
            want[step] = copy.deepcopy((objective.state_dict(), optim))
        assert [step for step, _ in saver.ready()] == list(steps)
        return want

    def check(run: Path, want: dict, make) -> None:
        for step, (model, optim) in want.items():
            fresh = make()
            fresh_opt = build_optimizer(fresh, _cfg("none"))
            load_sharded(str(run / f"checkpoint_{step:08d}"), None, fresh, fresh_opt)
            _assert_equal(model, fresh.state_dict(), f"step {step}: model")
            _assert_equal(optim, _named_optim(fresh, fresh_opt), f"step {step}: optim")

    objective = _objective()
    optimizer = build_optimizer(objective, _cfg("none"))
    want = saved_states(objective, optimizer, tmp_path / "a", (0, 1, 2))

    def other() -> torch.nn.Module:  # other head sizes: every tensor of the heads changes shape
        torch.manual_seed(1)
        head = {**HEAD, "head_out_dim": 48, "head_bottleneck_dim": 8}
        model = ModelConfig(vision="vit_test", text="text_test", max_text_len=16)
        return build_objective(TipsObjectiveConfig(**head), model, vocab_size=VOCAB)

    other_objective = other()
    other_optimizer = build_optimizer(other_objective, _cfg("none"))
    other_want = saved_states(other_objective, other_optimizer, tmp_path / "b", (1, 2))
    check(tmp_path / "a", want, _objective)
    check(tmp_path / "b", other_want, other)


@pytest.mark.parametrize(
    "damage, named",
    [
        ("rm .metadata", ".metadata: missing"),
        ("rm __0_0.distcp", "__0_0.distcp: missing"),
        ("truncate __0_0.distcp", "__0_0.distcp: "),
        ("rm train_state.json", "train_state.json: missing"),
        ("bad train_state.json", "train_state.json: not a valid train state"),
    ],
)
def test_an_incomplete_sharded_checkpoint_is_skipped_for_the_previous(tmp_path, damage, named):
    objective, optimizer = _trained(1)
    run = tmp_path / "run"
    older = _save(run, objective, optimizer, step=1)
    _train(objective, optimizer, None, 1, slice(0, 4))
    newer = Path(_save(run, objective, optimizer, step=2))
    verb, name = damage.split(" ")
    if verb == "rm":
        (newer / name).unlink()
    elif verb == "truncate":
        data = (newer / name).read_bytes()
        (newer / name).write_bytes(data[: len(data) // 2])
    else:
        (newer / name).write_text("{")
    problem = ckpt.checkpoint_problem(str(newer))
    assert problem is not None and problem.startswith(named), problem
    assert ckpt.newest_checkpoint(str(run)) == older
    load_sharded(older, None, _objective(), None)  # the previous one still loads


KILLED_WRITER = """
import os, signal, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {repo!r})
from tests.orchestrator import test_checkpoint_sharded as t
from orchestrator.train.checkpoint import ShardedCheckpointer
from orchestrator.train.state import TrainState

run = Path({run!r})
objective, optimizer = t._trained(1)
saver = ShardedCheckpointer(str(run), None, 0, False, async_save=True)
saver.save(objective, optimizer, TrainState(step=1), "model: {{}}\\n", wait=True)
objective.register_buffer("ballast", torch.ones(96 * 2**20))  # ~400 MB: a write in flight
saver.save(objective, optimizer, TrainState(step=2), "model: {{}}\\n", wait=False)
shard = run / "checkpoint_00000002" / "__0_0.distcp"
deadline = time.monotonic() + 60
while not (shard.exists() and shard.stat().st_size > 0) and time.monotonic() < deadline:
    time.sleep(0.001)
print("killing", shard.exists(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_async_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    script = KILLED_WRITER.format(repo=str(REPO), run=str(run))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed, not finished
    assert "killing True" in proc.stdout
    partial = run / "checkpoint_00000002"
    assert (partial / "__0_0.distcp").exists()  # the write had started
    assert not (partial / "train_state.json").exists()  # and not finished
    assert ckpt.checkpoint_problem(str(partial)) is not None
    first = run / "checkpoint_00000001"
    assert ckpt.newest_checkpoint(str(run)) == str(first)
    leftover = tmp_path / "leftover"  # what the killed write left, for the cases below
    shutil.copytree(partial, leftover)
    with caplog.at_level(logging.WARNING):
        ShardedCheckpointer(str(run), None, 0, False, async_save=True)  # the resume
    assert not partial.exists()  # removed, with one line naming it
    removed = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    assert len(removed) == 1 and str(partial) in removed[0], removed
    assert ckpt.checkpoint_problem(str(first)) is None  # the one resumed from is kept
    objective, optimizer = _trained(1)  # the state that step 1 saved
    fresh = _objective()
    fresh_opt = build_optimizer(fresh, _cfg("none"))
    load_sharded(ckpt.newest_checkpoint(str(run)), None, fresh, fresh_opt)
    _assert_equal(objective.state_dict(), fresh.state_dict(), "model")
    _assert_equal(_named_optim(objective, optimizer), _named_optim(fresh, fresh_opt), "optim")
    _only_unfinished_newer_ones_are_removed(run, leftover, objective, optimizer)


def _only_unfinished_newer_ones_are_removed(run: Path, leftover: Path, objective, optimizer):
    """Steps 1 and 3 complete, 2 unfinished (older than 3), 4 unfinished, 5 damaged (its
    marker written, a shard truncated later): a resume removes 4 only. A save of step 6 into
    an unfinished ``checkpoint_00000006`` (with a stale shard of another world) replaces it."""
    third = Path(_save(run, objective, optimizer, step=3))
    shutil.copytree(leftover, run / "checkpoint_00000002")
    shutil.copytree(leftover, run / "checkpoint_00000004")
    damaged = run / "checkpoint_00000005"
    shutil.copytree(third, damaged)
    shard = damaged / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    saver = ShardedCheckpointer(str(run), None, 0, False, async_save=False)  # the resume
    left = sorted(p.name for p in run.iterdir())
    assert left == [f"checkpoint_0000000{i}" for i in (1, 2, 3, 5)], left
    assert ckpt.checkpoint_problem(str(third)) is None
    assert ckpt.newest_checkpoint(str(run)) == str(third)
    sixth = run / "checkpoint_00000006"
    shutil.copytree(leftover, sixth)
    (sixth / "__7_0.distcp").write_bytes(b"a shard of a rank the new write does not have")
    saver.save(objective, optimizer, TrainState(step=6), "{}\n", wait=True)
    names = {p.name for p in sixth.iterdir()}
    assert names == {".metadata", "__0_0.distcp", "config.yaml", "train_state.json"}, names
    assert ckpt.newest_checkpoint(str(run)) == str(sixth)


def test_sharded_checkpoint_on_s3(s3_bucket):
    from orchestrator.storage import exists, write_bytes

    objective, optimizer = _trained(1)
    run = f"{s3_bucket}/runs/sharded"
    write_bytes(f"{run}/checkpoint_00000001/__3_0.distcp", b"stale: replaced by the save")
    uri = _save(run, objective, optimizer, step=1)
    assert uri == f"{run}/checkpoint_00000001"
    assert not exists(f"{uri}/__3_0.distcp")
    write_bytes(f"{run}/checkpoint_00000002/__0_0.distcp", b"an unfinished write")
    ShardedCheckpointer(run, None, 0, False, async_save=False)  # the resume removes it
    assert not exists(f"{run}/checkpoint_00000002/__0_0.distcp")
    assert ckpt.newest_checkpoint(run) == uri
    assert ckpt.latest_train_state(run).step == 1
    fresh = _objective()
    fresh_opt = build_optimizer(fresh, _cfg("none"))
    load_sharded(uri, None, fresh, fresh_opt)
    _assert_equal(objective.state_dict(), fresh.state_dict(), "model")
    _assert_equal(_named_optim(objective, optimizer), _named_optim(fresh, fresh_opt), "optim")
    _assert_equal(read_full_state(uri)["model"], objective.state_dict(), "read_full_state")


def _wrapped(world: int, kind: str = "fsdp"):
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.train.parallel import Strategy, wrap_for_distributed

    objective = _objective()
    if kind == "ddp":  # DdpStrategy's wrapping: Ray's prepare_model is DDP(student) on the
        objective.wrap_student(DistributedDataParallel)  # CPU, but needs Ray Train's context
        strategy = Strategy()  # (and DdpStrategy's only other part is micro_batch's no_sync)
    else:
        strategy = wrap_for_distributed(objective, _cfg(kind), torch.device("cpu"), world)
    return objective, build_optimizer(objective, _cfg(kind)), strategy


def _writer_ranks(rank: int, out: str, kind: str = "fsdp") -> None:
    """2 FSDP (or DDP) ranks train 2 steps on their halves, save sync and async at step 2
    (the async write runs during a third step)."""
    import torch.distributed as dist

    objective, optimizer, strategy = _wrapped(2, kind)
    rows = slice(2 * rank, 2 * rank + 2)
    _train(objective, optimizer, strategy, 2, rows)
    sync = ShardedCheckpointer(f"{out}/sync", None, rank, True, async_save=False)
    sync.save(objective, optimizer, TrainState(step=2), "{}\n", wait=False)
    model, _ = strategy.full_state_dicts(objective, optimizer, rank)
    optim = _named_optim(objective, optimizer)  # a collective under FSDP: every rank
    if rank == 0:  # the reference: today's gathered, unsharded state
        torch.save({"model": model, "optim": optim}, f"{out}/s2.pt")
    asyn = ShardedCheckpointer(f"{out}/async", None, rank, True, async_save=True)
    asyn.save(objective, optimizer, TrainState(step=2), "{}\n", wait=False)
    _train(objective, optimizer, strategy, 1, rows)  # the write runs during this step
    got: list = []
    while not got:  # every rank agrees when it is complete
        got = asyn.ready()
    asyn.close()
    assert got == [(2, f"{out}/async/checkpoint_00000002")]
    assert sync.ready() == [(2, f"{out}/sync/checkpoint_00000002")]
    dist.barrier()


def _reader_ranks(rank: int, out: str, world: int, strategy_name: str = "fsdp") -> None:
    """``world`` FSDP (or DDP) ranks load both checkpoints; rank 0 saves the gathered states
    (under DDP every rank saves its own: each loaded whole tensors)."""
    for kind in ("sync", "async"):
        objective, optimizer, strategy = _wrapped(world, strategy_name)
        saver = ShardedCheckpointer(f"{out}/{kind}", None, rank, True, async_save=False)
        load_sharded(f"{out}/{kind}/checkpoint_00000002", None, objective, optimizer, saver.group)
        model, _ = strategy.full_state_dicts(objective, optimizer, rank)
        optim = _named_optim(objective, optimizer, every_rank=strategy_name == "ddp")
        if strategy_name == "ddp":
            model = objective.state_dict()
        if rank == 0 or strategy_name == "ddp":
            name = f"{kind}_on{world}" + (f"_rank{rank}" if rank else "")
            torch.save({"model": model, "optim": optim}, f"{out}/{name}.pt")


def _saved_by_2_loaded_alone(tmp_path: Path, strategy_name: str) -> dict:
    """2 ranks (FSDP or DDP) save sync and async; one process without a process group loads
    each exactly (whole tensors). The gathered reference state."""
    for store in ("w", "r"):
        (tmp_path / store).mkdir()
    run_gloo(_writer_ranks, 2, tmp_path / "w", str(tmp_path), strategy_name)
    ref = torch.load(tmp_path / "s2.pt", weights_only=True)
    assert any("teacher" in k for k in ref["model"]) and any("center" in k for k in ref["model"])
    assert any("row_var" in s for s in ref["optim"]["state"].values())  # Adafactor, factored
    for kind in ("sync", "async"):
        uri = str(tmp_path / kind / "checkpoint_00000002")
        assert ckpt.checkpoint_problem(uri) is None
        assert {p.name for p in Path(uri).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
        alone = _objective()  # one process, no process group: whole tensors
        alone_opt = build_optimizer(alone, _cfg("none"))
        load_sharded(uri, None, alone, alone_opt)
        _assert_equal(ref["model"], alone.state_dict(), f"{kind} on 1: model")
        _assert_equal(ref["optim"], _named_optim(alone, alone_opt), f"{kind} on 1: optim")
    return ref


@pytest.mark.slow
def test_saved_by_2_fsdp_ranks_loads_exactly_on_1_and_3(tmp_path):
    ref = _saved_by_2_loaded_alone(tmp_path, "fsdp")
    run_gloo(_reader_ranks, 3, tmp_path / "r", str(tmp_path), 3)
    for kind in ("sync", "async"):
        got = torch.load(tmp_path / f"{kind}_on3.pt", weights_only=True)
        _assert_equal(ref["model"], got["model"], f"{kind} on 3: model")
        _assert_equal(ref["optim"], got["optim"], f"{kind} on 3: optim")


@pytest.mark.slow
def test_saved_by_2_ddp_ranks_loads_exactly_on_1_and_2(tmp_path):
    """DDP replicas: DCP writes each whole tensor once (``__0_0`` or ``__1_0``), and a DDP
    rank or a lone process loads every tensor whole from whichever file holds it."""
    ref = _saved_by_2_loaded_alone(tmp_path, "ddp")
    run_gloo(_reader_ranks, 2, tmp_path / "r", str(tmp_path), 2, "ddp")
    for kind in ("sync", "async"):
        for name in (f"{kind}_on2", f"{kind}_on2_rank1"):
            got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
            _assert_equal(ref["model"], got["model"], f"{name}: model")
            _assert_equal(ref["optim"], got["optim"], f"{name}: optim")


# ------------------------------------------------- the training loop, tips export, tips eval

BASE = [
    "train.global_batch_size=8",
    "train.batch_size_per_worker=8",
    "train.log_every_steps=1",
    "train.checkpoint_every_steps=3",
    "train.total_steps=6",
    "train.report_min_interval_s=0",  # every step reports: the async checkpoint rides along
    "optim.name=adafactor",
    "optim.warmup_steps=2",
    "teacher.temp_warmup_steps=2",
    "train.checkpoint_format=sharded",
]
LOCAL = ["scaling.min_workers=0", "scaling.max_workers=0"]


@pytest.fixture(scope="module")
def ray_train_runtime(s3_endpoint: str):
    from tests.orchestrator.conftest import ray_runtime

    yield from ray_runtime()


def _run_cfg(data_cfg, synth_data, tmp_path, *overrides):
    from orchestrator.train.driver import absolutize

    return absolutize(
        data_cfg(str(synth_data / "train"), *BASE, f"run.storage_uri={tmp_path}/runs", *overrides)
    )


def _losses(cfg) -> dict[int, float]:
    from orchestrator.train.driver import metrics_path
    from orchestrator.train.metrics import read_history

    return {int(r["train/step"]): r["loss/total"] for r in read_history(metrics_path(cfg))}


@pytest.mark.slow
def test_async_sharded_training_resumes_exactly_and_exports(
    ray_train_runtime, data_cfg, synth_data, tmp_path
):
    from orchestrator.cli import main
    from orchestrator.eval.loader import load_checkpoint
    from orchestrator.train.driver import fit
    from tips_model.checkpoints import load_state_dict

    full = _run_cfg(
        data_cfg, synth_data, tmp_path, *LOCAL, "run.name=a", "train.async_checkpoint=true"
    )
    result = fit(full)
    assert result.error is None
    run = tmp_path / "runs" / "a"
    for step in (3, 6):
        uri = str(run / f"checkpoint_{step:08d}")
        assert ckpt.checkpoint_problem(uri) is None and not Path(uri, "model.pt").exists()
        assert ckpt.latest_train_state(uri, is_checkpoint=True).step == step
    assert Path(result.checkpoint.path).name == "checkpoint_00000006"
    # a run resumed from the async checkpoint at step 3 takes the same steps 4-6
    resumed = _run_cfg(
        data_cfg,
        synth_data,
        tmp_path,
        *LOCAL,
        "run.name=b",
        f"run.resume_from={run}/checkpoint_00000003",
    )
    assert fit(resumed).error is None
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a, b)
    # tips export: today's layout, the same tensors; tips eval's loader reads both
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    sharded = read_full_state(str(run / "checkpoint_00000006"))
    _assert_equal(load_state_dict(out / "model.pt"), sharded["model"], "model.pt")
    optim = load_state_dict(out / "optim.pt")
    assert sorted(optim["state"]) == list(range(len(sharded["optim"]["state"])))
    assert ckpt.checkpoint_problem(str(out)) is None  # a complete full-layout checkpoint
    objective = _objective_of(full)
    state = ckpt.restore_checkpoint_dir(out, objective, build_optimizer(objective, full))
    assert state.step == 6
    enc_sharded = load_checkpoint(str(run / "checkpoint_00000006"))
    enc_full = load_checkpoint(str(out))
    _assert_equal(enc_sharded.vision.state_dict(), enc_full.vision.state_dict(), "eval load")


def _objective_of(cfg):
    from tips_model.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.model.tokenizer, max_len=cfg.model.max_text_len)
    return build_objective(cfg.objective, cfg.model, tok.vocab_size)


def test_export_refuses_an_incomplete_checkpoint_in_one_line(tmp_path, capsys):
    from orchestrator.cli import main

    objective, optimizer = _trained(1)
    uri = Path(_save(tmp_path / "run", objective, optimizer, step=1))
    (uri / "train_state.json").unlink()
    assert main(["export", "--checkpoint", str(uri), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_state.json: missing" in err[0], err


def test_export_names_a_checkpoint_that_does_not_exist(tmp_path, capsys):
    from orchestrator.cli import main

    missing = tmp_path / "runs" / "no_such_run"
    assert main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tips export: {missing}: no such checkpoint or run directory"], err
    assert not (tmp_path / "x").exists()  # nothing written


@pytest.mark.slow
def test_fsdp_on_two_ray_workers_sharded_async_resumes_on_one(
    ray_train_runtime, data_cfg, synth_data, tmp_path
):
    """Through Ray Train: 2 FSDP workers write sharded checkpoints in the background and
    register them with Ray; one worker resumes from step 3 (lr 1e-30 and EMA momentum 1 keep
    the loaded weights through its step, so they must equal the saved ones)."""
    import ray.train

    from orchestrator.train.driver import fit

    two = _run_cfg(
        data_cfg, synth_data, tmp_path,
        "run.name=fsdp", "scaling.strategy=fsdp", "train.async_checkpoint=true",
        "scaling.min_workers=2", "scaling.max_workers=2",
        "scaling.resources_per_worker={CPU: 0.5}", "data.num_cpus_per_map_task=0.5",
    )  # fmt: skip
    result = fit(two)
    assert result.error is None and result.metrics["train/world_size"] == 2
    run = tmp_path / "runs" / "fsdp"
    ckpt3 = run / "checkpoint_00000003"
    assert ckpt.checkpoint_problem(str(ckpt3)) is None
    assert {p.name for p in ckpt3.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert Path(result.checkpoint.path).name == "checkpoint_00000006"
    reported = {Path(c.path).name for c, _ in result.best_checkpoints}
    assert reported == {"checkpoint_00000003", "checkpoint_00000006"}  # both told to Ray
    assert isinstance(result.checkpoint, ray.train.Checkpoint)
    one = _run_cfg(
        data_cfg, synth_data, tmp_path,
        "run.name=fsdp_resumed", "scaling.strategy=fsdp", f"run.resume_from={ckpt3}",
        "scaling.min_workers=1", "scaling.max_workers=1",
        "train.total_steps=4", "optim.lr=1e-30", "optim.final_lr=0",
        "teacher.momentum_start=1.0", "teacher.momentum_end=1.0",
    )  # fmt: skip
    result = fit(one)
    assert result.error is None and sorted(_losses(one)) == [4]
    saved = read_full_state(str(ckpt3))
    after = read_full_state(str(tmp_path / "runs" / "fsdp_resumed" / "checkpoint_00000004"))
    params = [k for k in saved["model"] if k.startswith(("student.", "teacher."))]
    assert params
    for k in params:
        torch.testing.assert_close(after["model"][k], saved["model"][k], rtol=0, atol=1e-25)
    steps = {float(s["step"]) for s in after["optim"]["state"].values()}
    assert steps == {4.0}  # the optimizer state came along: its counters went on from 3
