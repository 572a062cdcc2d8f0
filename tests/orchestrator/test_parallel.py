"""FSDP (``scaling.strategy=fsdp``) on 2 gloo ranks equals one process on the whole batch.

Both ranks shard the tiny objective with ``wrap_for_distributed`` and train a few steps on
their halves of fixed batches (the loop's order: micro-batches, ``finish_grads``, clip,
optimizer step, EMA update). One process trains the same objective on the concatenated
batches. Per step the mean of the ranks' losses and the clip norm, and at the end the
gathered unsharded state (student, EMA teacher, centres) and optimizer state, must match.
A resume from the gathered checkpoint (model loaded before sharding, optimizer state
distributed by DCP) must then take the same next step as the uninterrupted process.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.train.optim import build_optimizer
from orchestrator.train.parallel import mixed_precision_policy
from tests.gloo import run_gloo
from tests.tips_model import test_cloc, test_mug
from tips_model.objectives import (
    ModelConfig,
    StepState,
    TipsObjectiveConfig,
    TipsV2ObjectiveConfig,
    build_objective,
)

WORLD, PER_RANK, STEPS, VOCAB = 2, 4, 3, 100
HEAD = dict(head_out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
CASES = {
    # TIPS: full EMA teacher (backbone + two heads), AdamW, gradient checkpointing
    "tips_full_ema": dict(
        objective=TipsObjectiveConfig(separate_ibot_head=True, **HEAD),
        model=ModelConfig(
            vision="vit_test", text="text_test", max_text_len=16, grad_checkpointing=True
        ),
        optim="adamw",
        lr=2e-3,
        accum=1,
    ),
    # TIPSv2: head-only EMA (the student backbone runs for the teacher), Adafactor, 2 micro-batches
    "tipsv2_head_ema": dict(
        objective=TipsV2ObjectiveConfig(**HEAD),
        model=ModelConfig(vision="vit_test", text="text_test", max_text_len=16),
        optim="adafactor",
        lr=1e-2,
        accum=2,
    ),
}
CLIP = 0.5  # small enough that every step clips: the norm must agree
MOMENTUM = 0.9
# fp32 sums in another order (reduce-scatter, gathered negatives) over 3-4 optimizer steps
ATOL, RTOL = 2e-5, 1e-4


def _batch(step: int, micro: int) -> dict[str, torch.Tensor]:
    """Fixed samples for one (step, micro-batch), [WORLD * PER_RANK, ...]; see ``_micro``."""
    b = WORLD * PER_RANK
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(1, VOCAB, (b, 16), generator=g)
    ids[:, 10:] = 0
    return {
        "global_crops": torch.randint(0, 256, (b, 1, 3, 32, 32), generator=g, dtype=torch.uint8),
        "local_crops": torch.randint(0, 256, (b, 2, 3, 16, 16), generator=g, dtype=torch.uint8),
        "masks": torch.rand(b, 1, 4, 4, generator=g) < 0.3,
        "alt_ids": ids,
        "syn_ids": torch.roll(ids, 1, dims=1),
    }


def _micro(step: int, micro: int, accum: int, rank: int | None) -> dict[str, torch.Tensor]:
    """Micro-batch ``micro`` of ``step``: rank r takes rows [r*n, (r+1)*n) of it; None all."""
    whole = _batch(step, micro)
    n = PER_RANK // accum
    if rank is None:
        return {k: v[: WORLD * n] for k, v in whole.items()}
    return {k: v[rank * n : (rank + 1) * n] for k, v in whole.items()}


def _build(case: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_objective(case["objective"], case["model"], vocab_size=VOCAB)


def _cfg(case: dict) -> SimpleNamespace:
    optim = SimpleNamespace(
        name=case["optim"], lr=case["lr"], weight_decay=0.04, betas=[0.9, 0.999]
    )
    return SimpleNamespace(
        optim=optim,
        scaling=SimpleNamespace(strategy="fsdp"),
        train=SimpleNamespace(precision="fp32", mixed_precision="autocast"),
    )


def _train_step(objective, optimizer, strategy, step: int, accum: int, rank: int | None):
    """One optimizer step as train.py takes it; returns (loss, clip norm)."""
    total = 0.0
    for micro in range(accum):
        final = micro == accum - 1
        with strategy.micro_batch(final) if strategy else contextlib.nullcontext():
            out = objective(_micro(step, micro, accum, rank), StepState(step, teacher_temp=0.05))
            (out.loss / accum).backward()
        total += out.loss.item() / accum
    if strategy:
        strategy.finish_grads()
        norm = strategy.clip_grad_norm_(list(objective.student.parameters()), CLIP)
    else:
        norm = torch.nn.utils.clip_grad_norm_(objective.student.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.update_teacher(MOMENTUM)
    return total, float(norm)


def _eval_forwards(objective) -> dict[str, torch.Tensor]:
    """What periodic evaluation runs: the towers' forwards, outside the student's."""
    batch = _batch(99, 0)
    images = batch["global_crops"][:, 0].float() / 255
    vision = objective.student.vision
    with torch.no_grad():
        return {
            "cls": vision(images).cls_alt,
            "dense": vision.forward_value_only_last(images),
            "text": objective.student.text(batch["alt_ids"]),
        }


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    from orchestrator.train.parallel import wrap_for_distributed
    from tips_model.ema import ema_update_

    for name, case in CASES.items():
        cfg, accum = _cfg(case), case["accum"]
        objective = _build(case)
        strategy = wrap_for_distributed(objective, cfg, torch.device("cpu"), WORLD)
        optimizer = build_optimizer(objective, cfg)
        steps = [_train_step(objective, optimizer, strategy, s, accum, rank) for s in range(STEPS)]
        with strategy.evaluating():  # on every rank, as the loop does under FSDP
            evals = _eval_forwards(objective)
        try:  # an unsharded teacher for a sharded student is refused, not mixed up
            ema_update_(_build(case).student.dino_head, objective.student.dino_head, 0.5)
            refused = False
        except ValueError:
            refused = True
        model_sd, optim_sd = strategy.full_state_dicts(objective, optimizer, rank)
        ckpt = Path(out_dir) / f"{name}_ckpt.pt"
        if rank == 0:
            torch.save({"model": model_sd, "optim": optim_sd}, ckpt)
        dist.barrier()
        # resume from the gathered checkpoint: model before sharding, optimizer after
        saved = torch.load(ckpt, weights_only=True)
        resumed = _build(case)
        resumed.load_state_dict(saved["model"])
        strategy = wrap_for_distributed(resumed, cfg, torch.device("cpu"), WORLD)
        optimizer = build_optimizer(resumed, cfg)
        strategy.load_optimizer_state(resumed, optimizer, saved["optim"])
        steps.append(_train_step(resumed, optimizer, strategy, STEPS, accum, rank))
        final, _ = strategy.full_state_dicts(resumed, optimizer, rank)
        result = {"steps": steps, "final": final, "evals": evals, "refused": refused}
        torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")
    _other_objectives(rank, out_dir)


def _other_objectives(rank: int, out_dir: str) -> None:
    """CLOC and MUG (blocks-only units) train a step, evaluate and gather under FSDP."""
    from orchestrator.train.parallel import wrap_for_distributed

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for name, module in (("cloc", test_cloc), ("mug", test_mug)):
        objective = module.build()
        cfg = _cfg({"optim": "adafactor", "lr": 1e-2})
        strategy = wrap_for_distributed(objective, cfg, torch.device("cpu"), WORLD)
        optimizer = build_optimizer(objective, cfg)
        out = objective(module.make_batch(b=4, seed=rank), StepState(0))
        out.loss.backward()
        strategy.finish_grads()
        norm = strategy.clip_grad_norm_(list(objective.student.parameters()), CLIP)
        optimizer.step()
        with strategy.evaluating(), torch.no_grad():
            cls = objective.student.vision(images).cls_alt
        model_sd, _ = strategy.full_state_dicts(objective, optimizer, rank)
        result = {"loss": out.loss.item(), "norm": float(norm), "cls": cls, "model": model_sd}
        torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    run_gloo(_worker, WORLD, out, str(out))
    return out


def _reference(case: dict) -> tuple[list, dict, dict, dict, dict]:
    """One process on the concatenated batches: steps, state at STEPS, optim, final state."""
    objective = _build(case)
    optimizer = build_optimizer(objective, _cfg(case))
    step = lambda s: _train_step(objective, optimizer, None, s, case["accum"], None)  # noqa: E731
    steps = [step(s) for s in range(STEPS)]
    evals = _eval_forwards(objective)
    model = {k: v.clone() for k, v in objective.state_dict().items()}
    optim = copy.deepcopy(optimizer.state_dict())  # state_dict() holds the live tensors
    steps.append(step(STEPS))
    return steps, model, optim, objective.state_dict(), evals


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_on_two_ranks_equals_one_process(fsdp_runs: Path, name: str):
    case = CASES[name]
    ranks = [torch.load(fsdp_runs / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    saved = torch.load(fsdp_runs / f"{name}_ckpt.pt", weights_only=True)
    ref_steps, ref_model, ref_optim, ref_final, ref_evals = _reference(case)
    for s, (loss, norm) in enumerate(ref_steps):
        # 1. loss: the mean of the ranks' losses; clip norm: the whole gradient's, on every rank
        mean_loss = sum(r["steps"][s][0] for r in ranks) / WORLD
        assert mean_loss == pytest.approx(loss, rel=RTOL, abs=ATOL), (s, mean_loss, loss)
        for r in ranks:
            assert r["steps"][s][1] == pytest.approx(norm, rel=RTOL), (s, r["steps"][s][1], norm)
        assert norm > CLIP  # the clip acted
    # 2. the gathered checkpoint is the unsharded state dict, same keys, same values
    assert list(saved["model"]) == list(ref_model)
    torch.testing.assert_close(saved["model"], ref_model, atol=ATOL, rtol=RTOL)
    teacher = [k for k in ref_model if k.startswith("teacher.")]
    assert teacher and any(
        not torch.equal(ref_model[k], _build(case).state_dict()[k]) for k in teacher
    )  # the EMA teacher moved, and moved the same under FSDP (compared above)
    # 3. optimizer state in torch's layout (integer ids), same values
    assert saved["optim"]["param_groups"] == ref_optim["param_groups"]
    torch.testing.assert_close(saved["optim"]["state"], ref_optim["state"], atol=ATOL, rtol=RTOL)
    # 4. the resumed step equals the uninterrupted one
    torch.testing.assert_close(ranks[0]["final"], ref_final, atol=ATOL, rtol=RTOL)
    assert ranks[1]["final"] is None  # only rank 0 holds the gathered state
    # 5. evaluation forwards of the sharded towers, on both ranks
    for r in ranks:
        torch.testing.assert_close(r["evals"], ref_evals, atol=ATOL, rtol=RTOL)
        assert r["refused"]


@pytest.mark.parametrize("name", ["cloc", "mug"])
def test_other_objectives_train_evaluate_and_gather_under_fsdp(fsdp_runs: Path, name: str):
    ranks = [torch.load(fsdp_runs / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    fresh = {"cloc": test_cloc, "mug": test_mug}[name].build().state_dict()
    assert all(math.isfinite(r["loss"]) for r in ranks)
    assert ranks[0]["norm"] == pytest.approx(ranks[1]["norm"], rel=1e-6)  # one global norm
    torch.testing.assert_close(ranks[0]["cls"], ranks[1]["cls"])  # same gathered weights
    assert list(ranks[0]["model"]) == list(fresh) and ranks[1]["model"] is None
    moved = [k for k, v in fresh.items() if not torch.equal(ranks[0]["model"][k], v)]
    assert moved  # the step reached the gathered state


# --------------------------------------------- train.mixed_precision=fsdp_params, a world of 1

BF16_STEPS = 4


def _fsdp_params_worker(rank: int, out_dir: str) -> None:
    """On a world of one: (a) ``fsdp_params`` on the CPU (fp32) under ``scaling.strategy=ddp``
    shards with FSDP2 on a mesh of one and trains as one plain process; (b) the bf16 policy
    (CUDA's) under CPU bf16 autocast trains with fp32 master weights and bf16 compute."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, init_device_mesh

    from orchestrator.train.parallel import (
        FsdpStrategy,
        mixed_precision_policy,
        wrap_for_distributed,
    )

    case = CASES["tipsv2_head_ema"]  # Adafactor: its grouped step on DTensors of a mesh of one
    cfg = _cfg(case)
    cfg.scaling.strategy, cfg.train.mixed_precision = "ddp", "fsdp_params"
    objective = _build(case)
    strategy = wrap_for_distributed(objective, cfg, torch.device("cpu"), 1)
    wrapped = isinstance(strategy, FsdpStrategy) and isinstance(objective.student, FSDPModule)
    optimizer = build_optimizer(objective, cfg)
    fp32 = [_train_step(objective, optimizer, strategy, s, case["accum"], 0) for s in range(2)]
    fp32_model, _ = strategy.full_state_dicts(objective, optimizer, rank)

    cfg.train.precision = "bf16"
    policy = mixed_precision_policy(cfg, torch.device("cuda"))  # what CUDA gets (no CUDA used)
    objective = _build(case)
    strategy = FsdpStrategy(objective, init_device_mesh("cpu", (1,)), policy, reshard=False)
    optimizer = build_optimizer(objective, cfg)
    seen: list[torch.dtype] = []
    block = objective.student.vision.blocks[0]
    # on the attention module: it projects q, k, v from views of qkv.weight (no qkv forward)
    block.attn.register_forward_pre_hook(lambda m, args: seen.append(m.qkv.weight.dtype))
    grads: set[str] = set()  # what the optimizer steps on (grads are dropped after)
    optimizer.register_step_pre_hook(
        lambda opt, *_: grads.update(str(p.grad.dtype) for p in _with_grad(opt))
    )
    losses = []
    for _ in range(BF16_STEPS):  # one batch again and again: the loss must fall
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(_train_step(objective, optimizer, strategy, 0, 1, 0)[0])
    params = list(objective.student.parameters())
    result = {
        "wrapped": wrapped,
        "fp32_steps": fp32,
        "fp32_model": fp32_model,
        "bf16_losses": losses,
        "forward_dtypes": sorted({str(d) for d in seen}),
        "master_dtypes": sorted({str(p.dtype) for p in params}),
        "sharded": all(isinstance(p, DTensor) for p in params if p.ndim > 0),
        "grad_dtypes": sorted(grads),
        "bf16_model": strategy.full_state_dicts(objective, optimizer, rank)[0],
    }
    torch.save(result, Path(out_dir) / "fsdp_params.pt")


def _with_grad(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


@pytest.fixture(scope="module")
def fsdp_params_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fsdp_params")
    run_gloo(_fsdp_params_worker, 1, out, str(out))
    return torch.load(out / "fsdp_params.pt", weights_only=True)


def test_fsdp_params_shards_a_world_of_one_and_trains_as_one_process(fsdp_params_run: dict):
    case = CASES["tipsv2_head_ema"]
    assert fsdp_params_run["wrapped"]  # FSDP2 although the strategy says ddp, on one rank
    objective = _build(case)
    optimizer = build_optimizer(objective, _cfg(case))
    ref = [_train_step(objective, optimizer, None, s, case["accum"], 0) for s in range(2)]
    for (loss, norm), (ref_loss, ref_norm) in zip(fsdp_params_run["fp32_steps"], ref):
        assert loss == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
        assert norm == pytest.approx(ref_norm, rel=RTOL)
    model = fsdp_params_run["fp32_model"]
    assert list(model) == list(objective.state_dict())
    torch.testing.assert_close(model, objective.state_dict(), atol=ATOL, rtol=RTOL)


def test_bf16_params_policy_trains_with_fp32_master_weights(fsdp_params_run: dict, tmp_path):
    r = fsdp_params_run
    losses = r["bf16_losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert r["forward_dtypes"] == ["torch.bfloat16"]  # the forward ran on bf16 copies
    assert r["master_dtypes"] == ["torch.float32"] and r["sharded"]  # the optimizer's
    assert r["grad_dtypes"] == ["torch.float32"]  # reduced in fp32 onto the fp32 shards
    model = r["bf16_model"]
    floats = [k for k, v in model.items() if v.is_floating_point()]
    assert floats and all(model[k].dtype == torch.float32 for k in floats)
    torch.save(model, tmp_path / "model.pt")  # model.pt keeps the fp32 weights and loads
    fresh = _build(CASES["tipsv2_head_ema"])
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    moved = fresh.student.vision.blocks[0].attn.qkv.weight
    assert moved.dtype == torch.float32
    assert not torch.equal(
        moved, _build(CASES["tipsv2_head_ema"]).student.vision.blocks[0].attn.qkv.weight
    )


def test_mixed_precision_policy_is_bf16_only_where_the_loop_runs_bf16():
    cfg = SimpleNamespace(train=SimpleNamespace(precision="bf16"))
    cuda = mixed_precision_policy(cfg, torch.device("cuda"))
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    cpu = mixed_precision_policy(cfg, torch.device("cpu"))  # the CPU runs fp32
    assert cpu.param_dtype is None and cpu.reduce_dtype is None
    cfg.train.precision = "fp32"
    assert mixed_precision_policy(cfg, torch.device("cuda")).param_dtype is None
