"""The per-worker training loop (the Ray Train function): the worker side, nothing else.

    train_loop_per_worker({"config": to_dict(cfg), ...})    # run by TorchTrainer

1. rebuild and re-validate the typed config; derive the world-size plan (micro-batch,
   accumulation) so ``train.global_batch_size`` is constant across elastic restarts;
2. build the objective; restore student, teacher, centres and step from
   ``ray.train.get_checkpoint()`` (a restart or a resubmitted run) or ``run.resume_from``;
   wrap it for ``scaling.strategy`` (DDP, or FSDP sharding: ``orchestrator/train/parallel.py``),
   build the optimizer and restore its state;
3. iterate the dataset shard (host batches; the bookkeeping columns stay on the host, the
   rest is copied to the device); per optimizer step: ``accum_steps`` micro-batches of
   forward + backward (bf16 autocast on GPU), clip, step, EMA teacher update, schedules
   indexed by the global step. Nothing in a step reads a tensor back to the host: a
   non-finite loss is found and its update undone on the device (``orchestrator/train/
   guard.py``), and metrics are summed there;
4. every ``log_every_steps`` (and at every checkpoint) read what the steps left on the
   device: the metrics, the skipped non-finite steps (``train.max_nonfinite_steps`` in a row
   stop the run here, so up to ``log_every_steps`` late) and the stream position all ranks
   agree on; report metrics on all ranks (``report`` is a barrier); every
   ``checkpoint_every_steps``, at the end, and once when a node is being drained for
   preemption, a checkpoint: ``train.checkpoint_format=full``: rank 0 writes a complete,
   unsharded one (under FSDP every rank joins the gather first) and hands it to Ray;
   ``sharded``: every rank writes its own shards into the run directory
   (orchestrator/train/checkpoint.py; in the background with ``train.async_checkpoint``,
   the last and preemption checkpoints waited for) and the first report after it is
   complete registers it with Ray (orchestrator/train/reporting.py); a node drain:
   orchestrator/train/preemption.py.

Randomness inside a step (drop-path, masks are made by the pipeline) is seeded from
(seed, step, rank), so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestrator import config as config_lib
from orchestrator.data.pipeline import STAT_COLUMNS, pop_data_stats
from orchestrator.train.checkpoint import ShardedCheckpointer
from orchestrator.train.guard import StepGuard
from orchestrator.train.loggers import Loggers, open_loggers
from orchestrator.train.metrics import (
    IntervalMeter,
    MetricsHistory,
    Throughput,
    collapse_monitor,
    progress_line,
)
from orchestrator.train.optim import build_optimizer, build_schedules, set_lr
from orchestrator.train.parallel import wrap_for_distributed
from orchestrator.train.preemption import PreemptionWatch, restart_marker
from orchestrator.train.reporting import report, report_due, save_checkpoint
from orchestrator.train.state import (
    CheckpointError,
    TrainState,
    read_optimizer_state,
    restore_checkpoint_dir,
    step_seed,
)
from tips_model.objectives import StepState, build_objective
from tips_model.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


class DataExhaustedError(RuntimeError):
    """The stream ended before train.total_steps: too many records were skipped as bad."""


def _threads(cfg: config_lib.TipsConfig) -> int:
    if cfg.train.torch_threads > 0:
        return cfg.train.torch_threads
    cpus = cfg.scaling.resources_per_worker.get("CPU", 1.0)
    return max(1, math.ceil(cpus))


def _restore(
    cfg: config_lib.TipsConfig, objective: torch.nn.Module, run_uri: str
) -> tuple[TrainState, str | None, Callable[..., None] | None]:
    """The newest complete and loadable checkpoint of this run on storage (a restart, a
    resize, a resubmission), else ``run.resume_from``; the driver's data stream starts from
    the same one (``state.newest_checkpoint``).

    Returns the train state and what loads the rest once wrapped and with an optimizer,
    ``finish(strategy, optimizer, group)``: a full checkpoint's model is loaded here
    (unsharded, before any wrapping) and ``finish`` hands its optimizer state to
    ``Strategy.load_optimizer_state``; a sharded one is loaded by ``finish`` into the wrapped
    model and optimizer (DCP reads each rank's shards: orchestrator/train/checkpoint.py).
    """
    from orchestrator.storage import checkpoint_from_uri
    from orchestrator.train.checkpoint import is_sharded, load_sharded
    from orchestrator.train.state import latest_train_state, newest_checkpoint

    source = newest_checkpoint(run_uri, cfg.storage) or cfg.run.resume_from
    if not source:
        return TrainState(seed=cfg.train.seed), None, None
    if is_sharded(source, cfg.storage):
        state = latest_train_state(source, cfg.storage, is_checkpoint=True)
        if state is None:
            raise CheckpointError(f"{source}: no train_state.json (incomplete checkpoint)")

        def finish(strategy: Any, optimizer: torch.optim.Optimizer, group: Any) -> None:
            load_sharded(source, cfg.storage, objective, optimizer, group)

    else:
        with checkpoint_from_uri(source, cfg.storage).as_directory() as directory:
            state = restore_checkpoint_dir(directory, objective, None)
            optim_state = read_optimizer_state(directory)

        def finish(strategy: Any, optimizer: torch.optim.Optimizer, group: Any) -> None:
            strategy.load_optimizer_state(objective, optimizer, optim_state)

    state.nonfinite_in_a_row = 0
    return state, source, finish


# Failures that repeat on every attempt: the workers stop without raising, so they do not
# consume run.max_failures, and rank 0 leaves the reason for the driver (FATAL_FILE).
DETERMINISTIC_FAILURES = (NonFiniteLossError, CheckpointError, DataExhaustedError)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module doc)."""
    try:
        _train_loop(loop_config)
    except DETERMINISTIC_FAILURES as e:
        from orchestrator.storage import join_uri, write_text
        from orchestrator.train.state import FATAL_FILE

        message = f"{type(e).__name__}: {e}"
        cfg = config_lib.from_dict(loop_config["config"])
        if ray.train.get_context().get_world_rank() == 0:
            write_text(join_uri(loop_config["run_uri"], FATAL_FILE), message, cfg.storage)
        logger.error("stopping without a retry (it would fail the same way): %s", message)


@dataclasses.dataclass
class Worker:
    """What one worker holds for the whole run (built by ``_setup``)."""

    cfg: config_lib.TipsConfig
    plan: Any
    rank: int
    world_size: int
    device: torch.device
    distributed: bool
    objective: torch.nn.Module
    tokenizer: Any
    strategy: Any
    optimizer: torch.optim.Optimizer
    schedules: Any
    state: TrainState
    run_uri: str
    persist_locally: bool  # Ray Train local mode keeps reported checkpoints in memory only
    use_bf16: bool
    config_yaml: str
    loggers: Loggers  # TensorBoard, MLflow, W&B (rank 0; orchestrator/train/loggers.py)
    history: MetricsHistory
    monitor: Any
    checkpointer: ShardedCheckpointer | None = None  # train.checkpoint_format=sharded
    guard: StepGuard | None = None  # made at the first step (orchestrator/train/guard.py)


def _train_loop(loop_config: dict[str, Any]) -> None:
    w = _setup(loop_config)
    try:
        _steps(w)
    except BaseException:
        w.loggers.close(failed=True)  # a restart reopens the same tracker runs
        raise  # a write in flight is abandoned: Ray ends this process, the next group cleans up
    if w.checkpointer is not None:  # the last save waited; frees its staging buffers and thread
        w.checkpointer.close()
    w.loggers.close()


def _steps(w: Worker) -> None:
    """Train from the restored step to ``train.total_steps``."""
    shard = ray.train.get_dataset_shard("train")
    batches = iter(
        shard.iter_torch_batches(
            batch_size=w.plan.micro_batch,
            drop_last=True,
            prefetch_batches=2,
            device="cpu",  # host batches: train_step keeps the bookkeeping columns here
            pin_memory=w.device.type == "cuda",  # and copies the rest without waiting
        )
    )
    meter, throughput = IntervalMeter(), Throughput()
    preemption = PreemptionWatch(w.cfg, w.rank, w.world_size)
    last_report = time.monotonic()
    first_step_unix = 0.0  # when this worker group finished its first step (start-up cost)
    while w.state.step < w.plan.total_steps:
        sched = w.schedules.at(w.state.step)
        position = train_step(w, batches, sched, meter, throughput)
        w.state.step += 1
        w.state.samples_seen += w.plan.global_batch_size
        first_step_unix = first_step_unix or time.time()
        w.state.data_position = position  # this rank's; all agree at log steps
        throughput.samples(w.plan.per_rank_batch)
        preempted = preemption.due(w.state.step, w.device, w.distributed)
        last = w.state.step >= w.plan.total_steps
        want_ckpt = last or preempted or w.state.step % w.cfg.train.checkpoint_every_steps == 0
        every = w.cfg.train.eval_every_steps
        want_eval = every > 0 and (w.state.step % every == 0 or last)
        if want_ckpt or want_eval or w.state.step % w.cfg.train.log_every_steps == 0:
            _read_deferred(w)
            metrics = _metrics(meter, throughput, w.state, sched, w.cfg, w.world_size)
            metrics["time/first_step_unix"] = first_step_unix
            metrics.update(w.strategy.perf_metrics())
            _log_metrics(w, metrics, want_eval)
            t_save = time.monotonic()
            directory = save_checkpoint(w, wait=last or preempted) if want_ckpt else None
            restart = restart_marker(preemption, preempted)  # before .saved(): first only
            if want_ckpt or want_eval or report_due(last_report, w.cfg, w.device, w.distributed):
                report(w, {**metrics, **restart}, directory, want_ckpt)
                last_report = time.monotonic()
            if preempted:
                preemption.saved(w.state.step, time.monotonic() - t_save, bool(restart))
            if restart:
                preemption.wait_for_restart()


def _setup(loop_config: dict[str, Any]) -> Worker:
    """Config and plan for this world size; model, optimizer, schedules and state, restored
    from the newest checkpoint when there is one."""
    cfg = config_lib.from_dict(loop_config["config"])
    _configure_worker_logging(cfg.run.ray_log_level)
    ctx = ray.train.get_context()
    world_size, rank = ctx.get_world_size(), ctx.get_world_rank()
    plan = config_lib.derive(cfg, world_size)
    device = _device(cfg)
    torch.set_num_threads(_threads(cfg))
    distributed = dist.is_available() and dist.is_initialized() and world_size > 1
    tokenizer = build_tokenizer(
        cfg.model.tokenizer, path=cfg.model.tokenizer_path, max_len=cfg.model.max_text_len
    )
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    objective = build_objective(cfg.objective, cfg.model, tokenizer.vocab_size).to(device)
    state, source, finish_restore = _restore(cfg, objective, loop_config["run_uri"])
    strategy = _strategy(cfg, objective, device, world_size if distributed else 1)
    if cfg.train.compile:  # after wrapping: the compiled call runs the DDP/FSDP student
        objective.compile_step()
    optimizer = build_optimizer(objective, cfg)  # after wrapping: FSDP replaces parameters
    checkpointer = None
    if cfg.train.checkpoint_format == "sharded":
        checkpointer = ShardedCheckpointer(
            loop_config["run_uri"],
            cfg.storage,
            rank,
            distributed,
            cfg.train.async_checkpoint,
            plan_cache=cfg.train.checkpoint_plan_cache,
        )
    if finish_restore is not None:
        finish_restore(strategy, optimizer, checkpointer.group if checkpointer else None)
    if source and rank == 0:
        logger.info(
            "resumed at step %d (%d samples) from %s (%s, world size %d)",
            state.step, state.samples_seen, source, strategy.name, world_size,
        )  # fmt: skip
    state.plan = {**plan.__dict__, "strategy": strategy.name}  # into train_state.json
    history = MetricsHistory(loop_config.get("metrics_path") if rank == 0 else None)
    history.drop_after(state.step)  # steps after the checkpoint are trained (and logged) again
    return Worker(
        cfg=cfg, plan=plan, rank=rank, world_size=world_size, device=device,
        distributed=distributed, objective=objective, tokenizer=tokenizer, strategy=strategy,
        optimizer=optimizer, schedules=build_schedules(cfg), state=state,
        run_uri=loop_config["run_uri"], persist_locally=bool(loop_config.get("local_mode")),
        use_bf16=cfg.train.precision == "bf16" and device.type in ("cuda", "xla"),
        config_yaml=config_lib.to_yaml(cfg),
        loggers=(
            open_loggers(loop_config.get("loggers"), loop_config["config"], cfg.storage)
            if rank == 0 else Loggers([])
        ),
        history=history, monitor=collapse_monitor(cfg), checkpointer=checkpointer,
    )  # fmt: skip


def _device(cfg: config_lib.TipsConfig) -> torch.device:
    """This worker's device: its XLA device on ``scaling.accelerator=tpu`` (Ray's
    ``get_device`` knows only cuda/cpu and torch_tpu: orchestrator/train/xla.py), else Ray's."""
    if config_lib.accelerator(cfg.scaling) == "tpu":
        from orchestrator.train.xla import xla_device

        return xla_device()
    return ray.train.torch.get_device()


def _strategy(
    cfg: config_lib.TipsConfig,
    objective: torch.nn.Module,
    device: torch.device,
    world_size: int,
) -> Any:
    """DDP / FSDP / none (orchestrator/train/parallel.py), or on XLA no wrapper: replicas
    all-reduce their gradients through XLA (orchestrator/train/xla.py XlaStrategy)."""
    if device.type == "xla":
        from orchestrator.train.xla import XlaStrategy

        return XlaStrategy(objective, world_size, device)
    return wrap_for_distributed(objective, cfg, device, world_size)


def train_step(
    w: Worker,
    batches: Any,
    sched: dict[str, float],
    meter: IntervalMeter,
    throughput: Throughput | None = None,
) -> int:
    """One optimizer step: ``accum_steps`` micro-batches of forward + backward (bf16 autocast
    on GPU and XLA), then ``optimizer_step``; on XLA the step is one graph closed by
    ``strategy.end_step``. No host read (``orchestrator/train/guard.py``). Returns the
    furthest stream position consumed."""
    state, plan = w.state, w.plan
    seed = step_seed(w.cfg.train.seed, state.step, w.rank)
    torch.manual_seed(seed)
    w.strategy.begin_step(seed)
    step_state = StepState(
        step=state.step, teacher_temp=sched["teacher_temp"], progress=state.step / plan.total_steps
    )
    if w.guard is None:
        w.guard = StepGuard(w.device, skipped_before=state.nonfinite_total)
    w.guard.begin_step(w.objective)  # the forward updates the loss centres
    total = torch.zeros((), device=w.device)
    position = 0
    for micro in range(plan.accum_steps):
        t0 = time.perf_counter()
        batch, position = _next_batch(w, batches)
        if throughput is not None:
            throughput.data_wait(time.perf_counter() - t0)
        grad_sync = w.strategy.micro_batch(final=micro == plan.accum_steps - 1)
        autocast = torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.use_bf16)
        with grad_sync, autocast:
            out = w.objective(batch, step_state)
            (out.loss / plan.accum_steps).backward()
        total = total + out.loss.detach() / plan.accum_steps
        meter.add("loss", out.losses)
        meter.add("metric", out.metrics)
    optimizer_step(w, total, sched, meter)
    w.strategy.end_step()
    return position


def _next_batch(w: Worker, batches: Any) -> tuple[dict[str, torch.Tensor], int]:
    """The next host batch's tensors on the device, and the stream position after it.

    The bookkeeping columns (``sample_index``, ``epoch``, the data stats) are read on the
    host as numpy views, never from the device; the rest is copied without waiting (pinned
    memory on CUDA)."""
    try:
        batch = next(batches)
    except StopIteration:
        skipped = {
            k.removeprefix("data/"): int(v)
            for k, v in w.state.data_stats.items()
            if k.startswith("data/skipped_") and v
        }
        raise DataExhaustedError(
            f"the data stream ended at step {w.state.step} of {w.plan.total_steps} "
            f"(skipped records: {skipped or 'none'}; data.max_skipped_fraction="
            f"{w.cfg.data.max_skipped_fraction}): fix the data at {w.cfg.data.train_uri} "
            "or raise data.max_skipped_fraction"
        ) from None
    host = {k: batch.pop(k).numpy() for k in (*STAT_COLUMNS, "sample_index", "epoch") if k in batch}
    for key, value in pop_data_stats(host).items():
        w.state.data_stats[key] = w.state.data_stats.get(key, 0.0) + value
    non_blocking = w.device.type == "cuda"
    batch = {k: v.to(w.device, non_blocking=non_blocking) for k, v in batch.items()}
    return batch, int(host["sample_index"].max()) + 1


def optimizer_step(
    w: Worker, total: torch.Tensor, sched: dict[str, float], meter: IntervalMeter
) -> None:
    """Clip, freeze the last layer early, set the LR, step, and update the EMA teacher; a
    step whose loss is not finite on some rank is undone on the device (weights, teacher,
    loss centres, optimizer state: ``orchestrator/train/guard.py``; ``train_step`` has
    called ``w.guard.begin_step``) and counted there, read at the next log step
    (``_read_deferred``)."""
    state, cfg = w.state, w.cfg
    w.strategy.finish_grads()
    if cfg.optim.grad_clip_norm > 0:
        params = list(w.objective.student.parameters())
        w.strategy.clip_grad_norm_(params, cfg.optim.grad_clip_norm)
    if state.step < cfg.optim.freeze_last_layer_steps:
        _zero_last_layer_grads(w.objective)
    if _creates_state(w.optimizer):
        # The update would create optimizer state the guard could not put back: read the
        # flag this once (a fresh run's first step, the first after the last-layer freeze).
        saved, finite = None, w.guard.count_on_host(total, w.distributed)
    else:
        saved = w.guard.before_update(total, w.objective, w.optimizer, w.distributed)
        finite = saved[0]
    if saved is not None or finite:  # guarded, or read as finite: update
        set_lr(w.optimizer, sched["lr"])
        w.optimizer.step()
        w.objective.update_teacher(sched["ema_momentum"])
    w.optimizer.zero_grad(set_to_none=True)
    if saved is not None:
        w.guard.keep_if_finite(saved)
    meter.add("loss", {"total": total}, keep=finite)


def _creates_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` would create state: a parameter with a gradient and none."""
    return any(
        p.grad is not None and not optimizer.state.get(p)
        for group in optimizer.param_groups
        for p in group["params"]
    )


def _too_many_nonfinite(state: TrainState, cfg: config_lib.TipsConfig) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss "
        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}) at step "
        f"{state.step}; lower optim.lr or check the data"
    )


def _read_deferred(w: Worker) -> None:
    """At log and checkpoint steps, what no step reads: the stream position all ranks agree
    on, and the non-finite steps the device counted (the run stops here, up to
    ``log_every_steps`` after ``train.max_nonfinite_steps`` were reached; every rank reads
    the same agreed counts, so all raise together)."""
    state = w.state
    state.data_position = _agree_position(state.data_position, w.device, w.distributed)
    if w.guard is None:  # no step taken by this worker yet
        return
    in_a_row, total = w.guard.read()
    if total > state.nonfinite_total:
        logger.warning(
            "step %d: %d step(s) with a non-finite loss skipped since the previous log step "
            "(%d in a row)",
            state.step, total - state.nonfinite_total, in_a_row,
        )  # fmt: skip
    state.nonfinite_in_a_row, state.nonfinite_total = in_a_row, total
    if in_a_row >= w.cfg.train.max_nonfinite_steps:
        raise _too_many_nonfinite(state, w.cfg)


def _log_metrics(w: Worker, metrics: dict[str, Any], want_eval: bool) -> None:
    """Collapse check, periodic evaluation, then (rank 0) the progress line, TensorBoard and
    the history row: before the checkpoint is handed over, so a kill right after it resumes
    from that checkpoint with its step already in the history."""
    warning = w.monitor.update(metrics) if w.monitor is not None else None
    # Only rank 0's metrics are kept by Ray; under FSDP every rank runs the towers.
    if want_eval and (w.rank == 0 or w.strategy.collective_eval):
        with w.strategy.evaluating() as student:  # XLA: a host copy of the student
            eval_metrics = _periodic_eval(w.objective, w.tokenizer, w.cfg, student)
        if w.rank == 0:
            metrics.update(eval_metrics)
    if w.rank != 0:
        return
    _configure_worker_logging(w.cfg.run.ray_log_level)
    logger.info(progress_line(metrics, w.plan.total_steps))
    if warning:
        logger.warning(warning)
    w.loggers.write(metrics, w.state.step)
    w.history.write({**metrics, "warning": warning} if warning else metrics)


def _periodic_eval(
    objective: torch.nn.Module,
    tokenizer: Any,
    cfg: config_lib.TipsConfig,
    student: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Quick evaluation of the student towers (``student``, else ``objective.student``) on
    the eval split (``eval/<task>/<metric>``)."""
    from orchestrator.eval.periodic import evaluate_during_training
    from orchestrator.eval.suite import VISION_TASKS

    student = objective.student if student is None else student
    text = getattr(student, "text", None)
    tasks = tuple(t for t in cfg.train.eval_tasks if text is not None or t in VISION_TASKS)
    if not tasks:  # a vision-only objective (MUG) with only text tasks configured
        return {}
    temp = getattr(student, "temperature", None)
    return evaluate_during_training(
        student.vision,
        text,
        tokenizer,
        float(temp().detach()) if temp is not None else 1.0,
        cfg.data.eval_uri,
        tasks=tasks,
        max_images=cfg.train.eval_max_images,
    )


def _configure_worker_logging(ray_log_level: str = "warning") -> None:
    """Ray workers start with Python's default WARNING level: show our INFO progress lines,
    and hold Ray's own INFO lines logged through the root logger (Ray Train names some of its
    loggers by file path, e.g. the per-report "Reporting training result" line) to
    ``run.ray_log_level``."""
    # Ray Data applies a logging dictConfig when a dataset first runs in this process, which
    # disables loggers that already exist: re-enable ours each time we are called.
    level = getattr(logging, ray_log_level.upper())
    for name, other in list(logging.root.manager.loggerDict.items()):
        if not isinstance(other, logging.Logger):
            continue
        if name.startswith(("orchestrator", "tips_model")):
            other.disabled = False
        elif f"{os.sep}ray{os.sep}" in name:  # a logger named by a Ray source file's path
            other.setLevel(level)
    log = logging.getLogger("orchestrator")
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)


def _agree_position(position: int, device: torch.device, distributed: bool) -> int:
    """The stream position to resume from: the furthest input position any rank consumed.

    With one worker and ordered execution this is exact. With several, Ray's streaming split
    hands blocks to ranks dynamically, so a few rows prefetched by another rank may be
    skipped on resume (never repeated); docs/design-changes.md, item 4.
    """
    if not distributed:
        return position
    t = torch.tensor([position], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _metrics(
    meter: IntervalMeter,
    throughput: Throughput,
    state: TrainState,
    sched: dict[str, float],
    cfg: config_lib.TipsConfig,
    world_size: int,
) -> dict[str, float]:
    metrics: dict[str, float] = meter.pop()
    metrics.update(throughput.pop())
    o = cfg.objective
    metrics.update(
        {
            "train/step": state.step,
            "time/unix": time.time(),
            "train/world_size": world_size,
            "data/samples_seen": state.samples_seen,
            "sched/lr": sched["lr"],
            "sched/ema_momentum": sched["ema_momentum"],
            "sched/teacher_temp": sched["teacher_temp"],
            "train/nonfinite_steps": state.nonfinite_total,
            "data/position": state.data_position,
        }
    )
    metrics.update(state.data_stats)
    for f in dataclasses.fields(o):  # every objective's loss weights, next to its terms
        if f.name in ("alpha", "beta") or f.name.endswith("_weight"):
            metrics[f"weight/{f.name}"] = float(getattr(o, f.name))
    return metrics


def _zero_last_layer_grads(objective: torch.nn.Module) -> None:
    """DINOv2's ``freeze_last_layer``: keep the prototypes fixed early in training."""
    for name, p in objective.student.named_parameters():
        if "last_layer" in name and p.grad is not None:
            p.grad = None
