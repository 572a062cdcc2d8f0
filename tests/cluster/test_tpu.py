"""The torch_xla path: TorchXLAConfig wiring and the accelerator setting (main venv), and
`tips train` itself on the CPU XLA device through Ray Train (the .venv-xla of `make test-xla`):
the same worker loop as CPU/GPU runs (orchestrator/train/loop.py with xla.py's XlaStrategy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import load
from orchestrator.recipes import RECIPES_DIR
from orchestrator.train.xla import TorchXLAConfig, _XLABackend

ROOT = Path(__file__).resolve().parents[2]


def test_config_selects_the_xla_backend_and_serializes():
    cfg = TorchXLAConfig(pjrt_device="CPU")
    assert cfg.backend_cls is _XLABackend
    assert cfg.backend == "xla"
    assert cfg.to_dict() == {
        "backend": "xla",
        "init_method": "env",
        "timeout_s": 1800,
        "pjrt_device": "CPU",
        "init_process_group": True,
    }
    with pytest.raises(ValueError, match="pjrt_device"):
        TorchXLAConfig(pjrt_device="GPU")


def test_module_imports_without_torch_xla():
    code = "import sys, orchestrator.train.xla; assert 'torch_xla' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_tpu_recipe_validates_with_one_worker_per_chip_of_the_slice():
    import yaml

    fill = ["data.train_uri=s3://bucket/shards", "model.tokenizer_path=/tmp/tokenizer.model"]
    cfg = load(RECIPES_DIR / "tips_b14_tpu.yaml", fill)
    meta = yaml.safe_load((ROOT / "cluster/gcp-tpu.yaml").read_text())["metadata"]
    chips = meta["tpu_hosts_per_slice"] * meta["tpu_chips_per_host"]
    assert cfg.scaling.min_workers == cfg.scaling.max_workers == chips  # a slice is all-or-none
    assert cfg.scaling.resources_per_worker["TPU"] == 1
    assert cfg.scaling.resources_per_worker.get("GPU", 0) == 0 and not cfg.scaling.use_gpu
    assert cfg.train.global_batch_size == 16384  # the GPU recipe's invariant, unchanged
    assert cfg.run.name == "tips_b14_tpu"


def test_accelerator_selects_the_backend_and_implies_its_resources(tmp_path):
    from ray.train.torch import TorchConfig

    from orchestrator.config import ConfigError, accelerator
    from orchestrator.recipes import find_recipe
    from orchestrator.train.driver import backend_config, describe_backend

    tiny = find_recipe("tiny_cpu")
    base = [f"data.train_uri={tmp_path}"]
    cfg = load(tiny, base)
    assert accelerator(cfg.scaling) == "cpu" and type(backend_config(cfg)) is TorchConfig
    cfg = load(tiny, [*base, *TPU_ON_CPU])
    assert backend_config(cfg).pjrt_device == "CPU"
    assert describe_backend(cfg) == "accelerator: tpu (TorchXLAConfig, PJRT_DEVICE=CPU)"
    fill = ["data.train_uri=s3://bucket/shards", "model.tokenizer_path=/tmp/tokenizer.model"]
    tpu = load(RECIPES_DIR / "tips_b14_tpu.yaml", fill)
    assert accelerator(tpu.scaling) == "tpu" and backend_config(tpu).pjrt_device == "TPU"
    refused = {
        "needs scaling.resources_per_worker TPU: 1": ["scaling.accelerator=tpu"],
        "cannot rendezvous": [*TPU_ON_CPU, "scaling.min_workers=2", "scaling.max_workers=2"],
        "scaling.strategy=fsdp is CUDA/CPU only": [*TPU_ON_CPU, "scaling.strategy=fsdp"],
        "set GPU: 0": [*TPU_ON_CPU, "scaling.resources_per_worker.GPU=1"],
        "needs scaling.use_gpu=true": ["scaling.accelerator=gpu"],
        "runs no CUDA": ["scaling.accelerator=cpu", "scaling.use_gpu=true"],
    }
    for message, overrides in refused.items():
        with pytest.raises(ConfigError, match=message):
            load(tiny, [*base, *overrides])


def test_dry_run_prints_the_backend_first(tmp_path, capsys):
    from orchestrator.cli.train import main

    assert main(["recipe=tiny_cpu", f"data.train_uri={tmp_path}", *TPU_ON_CPU, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# accelerator: tpu (TorchXLAConfig, PJRT_DEVICE=CPU)"
    assert main(["recipe=tiny_cpu", f"data.train_uri={tmp_path}", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("# accelerator: cpu (TorchConfig, gloo)\n")


# `tips train` itself on the CPU XLA device (the TPU recipe's path with PJRT_DEVICE=CPU
# standing in for the chips): the tiny recipe, one Ray Train worker. One, because each
# process has its own PJRT CPU client: two workers both claim rank 0 of the xla:// rendezvous
# (measured: EADDRINUSE on its TCPStore), so config.py refuses pjrt_device=CPU with more.
# The recipe's iBOT (mim_tokens=masked) with objective.mim_fixed_shapes=true, as tips_b14_tpu
# sets it: every token weighted by the mask instead of x[masks], whose varying number of
# selected tokens compiled new graphs at almost every step.
XLA_RUN = [
    "recipe=tiny_cpu",
    "train.total_steps=12",
    "train.log_every_steps=2",
    "train.checkpoint_every_steps=6",
    "train.eval_every_steps=12",
    "objective.mim_fixed_shapes=true",
]
TPU_ON_CPU = ["scaling.accelerator=tpu", "scaling.pjrt_device=CPU"]


def _tips(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(run: Path) -> dict[int, dict]:
    import json

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {int(r["train/step"]): r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_tips_train_runs_on_the_cpu_xla_device_and_resumes_exactly(tmp_path):
    """The real command on torch_xla: XLA losses follow the CPU backend's, no graph is
    compiled once warm, a resumed run repeats the uninterrupted one exactly, and the
    checkpoints are the CPU format (a TPU checkpoint loads on CPU)."""
    pytest.importorskip("torch_xla", reason="needs torch_xla: `make test-xla` (.venv-xla)")
    import os

    env = {**os.environ, "PJRT_DEVICE": "CPU", "RAY_AUTH_MODE": "disabled"}
    _tips("data", "synth", "--out", str(tmp_path / "synth"), "--n", "512", env=env)
    runs = tmp_path / "runs"
    common = [*XLA_RUN, f"data.train_uri={tmp_path / 'synth/train'}", f"run.storage_uri={runs}"]
    _tips("train", *common, "run.name=cpu", "scaling.accelerator=cpu", env=env)
    _tips("train", *common, *TPU_ON_CPU, "run.name=xla", env=env)
    resume = f"run.resume_from={runs / 'xla/checkpoint_00000006'}"
    _tips("train", *common, *TPU_ON_CPU, "run.name=xla_resumed", resume, env=env)
    cpu, xla, resumed = _rows(runs / "cpu"), _rows(runs / "xla"), _rows(runs / "xla_resumed")

    assert sorted(xla) == sorted(cpu) == [2, 4, 6, 8, 10, 12]
    assert "eval/retrieval/t2i_r5" in xla[12]  # periodic evaluation ran (on a host copy)
    compiles = [xla[s]["perf/xla_compiles"] for s in sorted(xla)]
    print("perf/xla_compiles per 2-step interval:", compiles)
    assert compiles[0] > 0 and compiles[3:] == [0, 0, 0]  # warm after the first checkpoint
    # Same batches, init and seeds; XLA fuses and orders float32 ops differently, so the
    # terms differ by float32 rounding, which 12 AdamW steps carry along: measured at most
    # 7e-7 relative (docs/clusters.md, "TPUs"); 1e-5 leaves a 10x margin and still fails on
    # any real divergence (a skipped step, another batch, a missing all-reduce).
    for step in sorted(xla):
        for key in ("loss/total", "loss/contrastive_syn", "loss/dino", "loss/ibot"):
            assert xla[step][key] == pytest.approx(cpu[step][key], rel=1e-5), (step, key)
    # Exact resume: the XLA steps 7-12 after a restore equal the uninterrupted ones.
    for step in (8, 10, 12):
        for key in ("loss/total", "loss/dino", "loss/ibot"):
            assert resumed[step][key] == xla[step][key], (step, key)

    # The checkpoint format is the CPU run's: host tensors, same names, shapes and dtypes,
    # and it restores strictly into a CPU objective and optimizer.
    from orchestrator import config as config_lib
    from orchestrator.train.optim import build_optimizer
    from orchestrator.train.state import restore_checkpoint_dir
    from tips_model.checkpoints import load_state_dict
    from tips_model.objectives import build_objective
    from tips_model.tokenizer import build_tokenizer

    ckpt_xla, ckpt_cpu = runs / "xla/checkpoint_00000012", runs / "cpu/checkpoint_00000012"
    sd_xla, sd_cpu = load_state_dict(ckpt_xla / "model.pt"), load_state_dict(ckpt_cpu / "model.pt")
    assert {k: (v.device.type, v.shape, v.dtype) for k, v in sd_xla.items()} == {
        k: (v.device.type, v.shape, v.dtype) for k, v in sd_cpu.items()
    }
    cfg = config_lib.from_dict(config_lib.parse_yaml_dict((ckpt_xla / "config.yaml").read_text()))
    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.tokenizer_path, cfg.model.max_text_len)
    objective = build_objective(cfg.objective, cfg.model, tok.vocab_size)
    optimizer = build_optimizer(objective, cfg)
    state = restore_checkpoint_dir(ckpt_xla, objective, optimizer)
    assert state.step == 12 and state.data_position == 12 * 32
    assert all(v.device.type == "cpu" for s in optimizer.state.values() for v in s.values())


@pytest.mark.slow
def test_xla_strategy_skips_a_non_finite_step_on_the_device():
    """The loop's non-finite check on XLA (orchestrator/train/guard.py StepGuard): a NaN loss
    undoes the step's parameter and optimizer updates inside the same graph as a finite
    step (no new compilation, no host read), and device counters count it."""
    pytest.importorskip("torch_xla", reason="needs torch_xla: `make test-xla` (.venv-xla)")
    import torch

    from orchestrator.train.guard import StepGuard
    from orchestrator.train.xla import XlaStrategy, compile_count, xla_device

    device = xla_device()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    strategy = XlaStrategy(model, 1, device)
    guard = StepGuard(device, skipped_before=5)
    good = torch.randn(8, 4)
    bad = good.clone()
    bad[3, 1] = float("nan")  # a NaN in the data, as a bad record would bring
    inputs = {False: good.to(device), True: bad.to(device)}  # device data: one graph

    def step(nan: bool = False) -> None:
        loss = model(inputs[nan]).square().mean()
        loss.backward()
        saved = guard.before_update(loss, model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        guard.keep_if_finite(saved)
        strategy.end_step()

    def host() -> tuple[dict, dict]:
        model_sd, optim_sd = strategy.full_state_dicts(model, optimizer, rank=0)
        return model_sd, {i: s["exp_avg"] for i, s in optim_sd["state"].items()}

    step()  # creates the optimizer state
    step()  # the first step with it (its state came from the previous graph): a graph of its own
    step()  # the steady graph (measured: compiles 1, 2, 3, then none)
    params, moments = host()
    assert all(v.device.type == "cpu" for v in [*params.values(), *moments.values()])
    compiled = compile_count()
    step(nan=True)
    assert guard.read() == (1, 6)  # in a row, total (5 before this worker)
    nan_params, nan_moments = host()
    for k in params:
        assert torch.equal(nan_params[k], params[k]), k
    for k in moments:
        assert torch.equal(nan_moments[k], moments[k]), k
    step()
    assert guard.read() == (0, 6)
    assert not torch.equal(host()[0]["weight"], params["weight"])
    assert compile_count() == compiled  # the NaN step and the next one: the same graph
