"""The torch_xla path: TorchXLAConfig wiring (main venv) and a real training step of the tiny
TIPS objective on the CPU XLA device through Ray Train (the .venv-xla of `make test-xla`)."""

from __future__ import annotations

import math
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


def _xla_train_fn() -> dict:
    """Worker: 3 SGD steps of the tiny TIPS objective, eagerly on CPU and on the XLA device."""
    import os

    import torch
    import torch.distributed as dist

    from orchestrator.train import xla as tpu
    from tips_model.objectives import ModelConfig, StepState, TipsObjectiveConfig, build_objective

    def make_objective() -> torch.nn.Module:
        torch.manual_seed(0)
        model = ModelConfig(vision="vit_test", text="text_test", max_text_len=16)
        head = TipsObjectiveConfig(head_out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
        return build_objective(head, model, vocab_size=100)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (8, 16), generator=g)
    ids[:, 10:] = 0
    batch = {
        "global_crops": torch.randint(0, 256, (8, 1, 3, 32, 32), generator=g, dtype=torch.uint8),
        "local_crops": torch.randint(0, 256, (8, 2, 3, 16, 16), generator=g, dtype=torch.uint8),
        "masks": torch.rand(8, 1, 4, 4, generator=g) < 0.3,
        "alt_ids": ids,
        "syn_ids": torch.roll(ids, 1, dims=1),
    }
    state = StepState(step=0, teacher_temp=0.05)
    eager, objective = [], make_objective()
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.01)
    for _ in range(3):  # the same steps, eagerly on the CPU
        optimizer.zero_grad()
        out = objective(batch, state)
        out.loss.backward()
        optimizer.step()
        eager.append(float(out.loss))

    device = tpu.xla_device()
    objective = make_objective().to(device)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.01)
    losses = [float(tpu.train_step(objective, optimizer, batch, state, device)) for _ in range(3)]
    return {
        "eager": eager,
        "losses": losses,
        "device": str(device),
        "pg_backend": dist.get_backend() if dist.is_initialized() else None,
        "pjrt": os.environ.get("PJRT_DEVICE"),
        "world": int(os.environ["WORLD_SIZE"]),
    }


@pytest.mark.slow
def test_training_step_runs_on_the_cpu_xla_device(tmp_path):
    pytest.importorskip("torch_xla", reason="needs torch_xla: `make test-xla` (.venv-xla)")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            _xla_train_fn,
            torch_config=TorchXLAConfig(pjrt_device="CPU"),
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="xla_step", storage_path=str(tmp_path)),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    m = result.return_value  # rank 0's return
    assert m["device"].startswith("xla")
    assert (m["pg_backend"], m["pjrt"], m["world"]) == ("xla", "CPU", 1)
    losses = m["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses == pytest.approx(m["eager"], rel=1e-3)  # XLA steps == eager steps
    assert losses[-1] != pytest.approx(losses[0], rel=1e-4)  # the optimizer did step
