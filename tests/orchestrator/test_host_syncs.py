"""No host reads inside a training step (issue 22, item 2): the worker loop's own
``train_step`` (forward, backward, optimizer step, EMA teacher, non-finite guard, metrics) on
the CPU with a real ``Worker`` for the tips, tipsv2, cloc and mug objectives, counted by
``orchestrator/train/guard.py``'s ``count_host_reads`` (tensor reads, and the copies from
the host that wait for a GPU); a non-finite step is still skipped and counted, and the run
stops at the next log step. Not visible on the CPU: syncs inside an op, such as boolean-mask
indexing ``x[masks]`` (its output size), which only a GPU run can show."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import config as config_lib
from orchestrator.data.local import iter_local_batches
from orchestrator.recipes import RECIPES_DIR
from orchestrator.train.guard import count_host_reads, host_tensors
from orchestrator.train.loggers import Loggers
from orchestrator.train.loop import NonFiniteLossError, Worker, _read_deferred, train_step
from orchestrator.train.metrics import IntervalMeter, MetricsHistory
from orchestrator.train.optim import build_optimizer, build_schedules
from orchestrator.train.parallel import Strategy
from orchestrator.train.state import TrainState
from tips_model.objectives import build_objective
from tips_model.tokenizer import build_tokenizer

SMALL = [
    "train.global_batch_size=4",
    "augment.global_crop_size=32",
    "augment.local_crop_size=16",
    "augment.num_local_crops=2",
    "train.total_steps=20",
]


def _worker(data: Path, recipe: str, overrides: list[str]) -> tuple[Worker, Iterator[dict]]:
    """What ``loop._setup`` builds for one CPU worker (no Ray), and the stream of host
    batches ``iter_torch_batches(device="cpu")`` gives the loop: CPU tensors, every column."""
    cfg = config_lib.load(
        RECIPES_DIR / f"{recipe}.yaml", [f"data.train_uri={data}", *SMALL, *overrides]
    )
    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.tokenizer_path, cfg.model.max_text_len)
    torch.manual_seed(cfg.train.seed)
    objective = build_objective(cfg.objective, cfg.model, tok.vocab_size)
    plan = config_lib.derive(cfg, 1)
    w = Worker(
        cfg=cfg, plan=plan, rank=0, world_size=1, device=torch.device("cpu"),
        distributed=False, objective=objective, tokenizer=tok, strategy=Strategy(),
        optimizer=build_optimizer(objective, cfg), schedules=build_schedules(cfg),
        state=TrainState(seed=cfg.train.seed), run_uri=str(data), persist_locally=False,
        use_bf16=False, config_yaml="", loggers=Loggers([]), history=MetricsHistory(None),
        monitor=None,
    )  # fmt: skip
    keys = objective.required_batch_keys()
    stream = iter_local_batches(cfg, config_lib.patch_size(cfg.model), keys, plan.micro_batch)
    batches = ({k: torch.from_numpy(np.asarray(v)) for k, v in b.items()} for b in stream)
    return w, batches


def _step(w: Worker, batches: Iterator[dict], meter: IntervalMeter, **sched: float) -> None:
    """One optimizer step as ``loop._steps`` takes it, with schedule values overridden."""
    position = train_step(w, batches, {**w.schedules.at(w.state.step), **sched}, meter)
    w.state.step += 1
    w.state.data_position = position


def _snapshot(w: Worker) -> dict[str, torch.Tensor]:
    """Student, teacher, loss centres and every optimizer state tensor, copied."""
    out = {f"model/{k}": v.detach().clone() for k, v in w.objective.state_dict().items()}
    for i, st in enumerate(w.optimizer.state.values()):
        out.update({f"optim/{i}/{k}": v.clone() for k, v in st.items()})
    return out


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("tiny_cpu", []),  # tips: dual-CLS contrastive, DINO, iBOT (masked tokens), KoLeo
        ("tiny_cpu", ["objective.name=tipsv2"]),  # iBOT++ on all tokens, head-only EMA
        ("tiny_cpu", ["objective.centering=sinkhorn"]),
        ("tiny_cpu", ["optim.name=adafactor", "train.batch_size_per_worker=2"]),  # + accumulation
        ("cloc_tiny", []),
        ("mug_tiny", []),
    ],
)
def test_a_training_step_reads_nothing_back_to_the_host(synth_data, recipe, overrides):
    w, batches = _worker(synth_data / "train", recipe, overrides)
    meter = IntervalMeter()
    _step(w, batches, meter)  # creates the optimizer state: that step reads its flag once
    with count_host_reads(ignore=host_tensors(w.optimizer)) as reads:
        for _ in range(3):
            _step(w, batches, meter)
    assert reads.count == 0, dict(reads.sites)
    if "train.batch_size_per_worker=2" in overrides:
        assert w.plan.accum_steps == 2
    logged = meter.pop()  # the log step: the one read of the interval's sums
    assert np.isfinite(logged["loss/total"]) and len(logged) > 3
    assert w.state.data_position == 4 * w.cfg.train.global_batch_size


def test_the_counter_counts_each_kind_of_read_once_in_this_thread_only():
    t = torch.arange(4.0)
    other = torch.tensor(2.0)
    before = dict(torch.Tensor.__dict__)
    with count_host_reads(ignore=[other]) as reads:
        t.sum().item()
        bool(t[0])
        float(t[1])
        int(t[2])
        t.tolist()
        t.cpu()
        f"{t.max():.1f}"  # format() reads through item(): one read
        t.to("cpu")  # a host tensor stays: not a read
        t.numpy()  # CPU only: a device tensor reaches numpy through cpu()
        float(other)  # ignored by identity
        torch.stack([other, other + 1]).tolist()  # computed from ignored tensors alone
        (other * t).sum().item()  # mixed with a counted tensor: a read
        torch.tensor([0.5], device=t.device)  # on a GPU: a copy that waits for the stream
        torch.full((1,), 0.5, device=t.device)  # a fill on the device: not counted
        worker = threading.Thread(target=lambda: t.sum().item())
        worker.start()
        worker.join()
    assert reads.count == 9, dict(reads.sites)
    here = sum(n for site, n in reads.sites.items() if Path(__file__).name in site)
    assert here == 8  # and format()'s read, made in torch/_tensor.py
    assert dict(torch.Tensor.__dict__) == before  # every patched method put back
    t.sum().item()
    torch.tensor([0.5], device=t.device)
    assert reads.count == 9


def test_a_non_finite_step_is_undone_on_the_device_and_counted(synth_data):
    """A teacher temperature of 0 makes the step's loss non-finite: its update of the
    student, the teacher, the DINO/iBOT centres and the optimizer state is undone, with no
    host read; the counters say so at the log step, and the next step trains."""
    w, batches = _worker(synth_data / "train", "tiny_cpu", [])
    meter = IntervalMeter()
    _step(w, batches, meter)
    _step(w, batches, meter)
    before = _snapshot(w)
    assert any("center" in k for k in before)
    with count_host_reads(ignore=host_tensors(w.optimizer)) as reads:
        _step(w, batches, meter, teacher_temp=0.0)
    assert reads.count == 0, dict(reads.sites)
    after = _snapshot(w)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert w.guard.read() == (1, 1)
    _step(w, batches, meter)
    assert w.guard.read() == (0, 1)
    changed = _snapshot(w)
    key = "model/student.vision.cls_token"
    assert not torch.equal(changed[key], before[key])
    logged = meter.pop()  # the skipped step is left out of the loss average
    assert np.isfinite(logged["loss/total"])
    _read_deferred(w)
    assert (w.state.nonfinite_in_a_row, w.state.nonfinite_total) == (0, 1)


def test_the_run_stops_at_the_log_step_after_max_nonfinite_steps(synth_data, caplog):
    w, batches = _worker(synth_data / "train", "tiny_cpu", ["train.max_nonfinite_steps=3"])
    meter = IntervalMeter()
    _step(w, batches, meter)
    for _ in range(2):
        _step(w, batches, meter, teacher_temp=0.0)
    _read_deferred(w)  # a log step: 2 in a row, under the limit
    assert (w.state.nonfinite_in_a_row, w.state.nonfinite_total) == (2, 2)
    assert "2 step(s) with a non-finite loss skipped" in caplog.text
    for _ in range(2):  # the limit is reached between log steps: the steps go on
        _step(w, batches, meter, teacher_temp=0.0)
    with pytest.raises(NonFiniteLossError, match="^4 steps in a row had a non-finite loss"):
        _read_deferred(w)
    assert w.state.nonfinite_total == 4


def test_a_non_finite_first_step_creates_no_optimizer_state(synth_data):
    """The first step would create the optimizer state, which the device guard could not
    undo: its flag is read on the host once, and a non-finite one skips the update."""
    w, batches = _worker(synth_data / "train", "tiny_cpu", [])
    before = _snapshot(w)
    _step(w, batches, IntervalMeter(), teacher_temp=0.0)
    after = _snapshot(w)
    assert not w.optimizer.state and after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert w.guard.read() == (1, 1)
