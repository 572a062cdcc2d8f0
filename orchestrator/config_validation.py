"""Cross-field rules of a merged config: ``validate`` and the helpers behind it.

The schema (orchestrator/config_schema.py) refuses unknown keys and wrong types while a config
is merged (orchestrator/config.py); ``validate`` then checks the allowed values and the rules
between fields (crops against the patch size, batch against the world size, accelerator
against resources, ...). Every failure is a ``ConfigError`` that starts with the source and
names the dotted key; ``load`` reads that key to name the layer that set it.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config_schema import ConfigError, RunSection, ScalingSection, TipsConfig
from tips_model.objectives.base import ModelConfig
from tips_model.vision import INPUT_NORMS

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("auto", "parquet", "webdataset"),
    "augment.interpolation": ("bilinear", "bicubic"),
    "optim.name": ("adafactor", "adamw"),
    "optim.lr_schedule": ("linear", "cosine", "constant"),
    "teacher.momentum_schedule": ("cosine", "linear", "constant"),
    "train.precision": ("bf16", "fp32"),
    "train.mixed_precision": ("autocast", "fsdp_params"),
    "train.checkpoint_format": ("full", "sharded"),
    "scaling.strategy": ("ddp", "fsdp", "none"),
    "scaling.accelerator": ("auto", "cpu", "gpu", "tpu"),
    "scaling.pjrt_device": ("TPU", "CPU"),
    "scaling.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "model.tokenizer": ("bpe", "sentencepiece"),
    "model.input_norm": tuple(INPUT_NORMS),
    "run.wandb_mode": ("online", "offline"),
    "run.ray_log_level": ("debug", "info", "warning", "error"),
}


def patch_size(model: ModelConfig) -> int:
    """Patch size of the configured vision tower (built on the meta device: no memory)."""
    import torch

    from tips_model.vision import build_vision

    with torch.device("meta"):
        return int(build_vision(model.vision).patch_size)


def tower_widths(model: ModelConfig) -> tuple[int, int]:
    """(vision width, text width) of the configured towers, built on the meta device."""
    import torch

    from tips_model.text import build_text
    from tips_model.vision import build_vision

    with torch.device("meta"):
        vision = build_vision(model.vision)
        text = build_text(model.text, vocab_size=8, max_len=max(2, model.max_text_len))
    return int(vision.embed_dim), int(text.token_embedding.weight.shape[1])


def _get(cfg: TipsConfig, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _require(ok: bool, where: str, msg: str) -> None:
    if not ok:
        err = ConfigError(f"{where}: {msg}")
        err.detail = msg
        raise err


def validate(cfg: TipsConfig, source: str = "config") -> None:
    """Cross-field rules; raises ConfigError naming the dotted key and the source."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        _require(value in allowed, source, f"{key}={value!r}: must be one of {list(allowed)}")
    _validate_model(cfg, source)
    _validate_crops(cfg, source)
    _validate_data(cfg, source)
    _validate_schedule(cfg, source)
    _validate_run(cfg, source)
    _validate_accelerator(cfg.scaling, source)
    _validate_loggers(cfg.run, source)


def _validate_model(cfg: TipsConfig, source: str) -> None:
    from tips_model.registry import TEXT, VISION

    m = cfg.model
    _require(m.vision in VISION, source, f"model.vision={m.vision!r}: known {VISION.names()}")
    _require(m.text in TEXT, source, f"model.text={m.text!r}: known {TEXT.names()}")
    _require(
        m.tokenizer != "sentencepiece" or bool(m.tokenizer_path),
        source,
        "model.tokenizer_path must name the released tokenizer.model for sentencepiece",
    )
    _require(m.max_text_len >= 2, source, f"model.max_text_len={m.max_text_len} must be >= 2")
    if cfg.objective.name != "mug":  # MUG has no text tower; the others share one space
        vw, tw = tower_widths(m)
        _require(
            vw == tw,
            source,
            f"model.vision={m.vision} (width {vw}) and model.text={m.text} (width {tw}) must "
            "have the same width: the image and text embeddings share one space, with no "
            "projection head (docs/method.md)",
        )


def _validate_crops(cfg: TipsConfig, source: str) -> None:
    """Crops against the patch size, masking, and distillation's need for student crops."""
    m = cfg.model
    p = patch_size(m)
    a = cfg.augment
    _require(
        a.global_crop_size >= p,
        source,
        f"augment.global_crop_size={a.global_crop_size} must be at least the patch size {p}",
    )
    if a.num_local_crops:
        _require(
            a.local_crop_size >= p,
            source,
            f"augment.local_crop_size={a.local_crop_size} must be at least the patch size {p}",
        )
    _require(a.num_global_crops >= 1, source, "augment.num_global_crops must be >= 1")
    _require(a.num_local_crops >= 0, source, "augment.num_local_crops must be >= 0")
    _require(
        a.global_crop_size % p == 0,
        source,
        f"augment.global_crop_size={a.global_crop_size} is not divisible by the patch size {p}"
        f" of model.vision={m.vision}",
    )
    if a.num_local_crops:
        _require(
            a.local_crop_size % p == 0,
            source,
            f"augment.local_crop_size={a.local_crop_size} is not divisible by the patch size {p}"
            f" of model.vision={m.vision}",
        )
    for key in ("augment.global_crop_scale", "augment.local_crop_scale"):
        lo_hi = _get(cfg, key)
        _require(
            len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1,
            source,
            f"{key}={list(lo_hi)} must be [lo, hi] with 0 < lo <= hi <= 1",
        )
    obj = cfg.objective
    if getattr(obj, "alpha", 0) > 0:
        _require(
            a.num_local_crops > 0 or a.num_global_crops > 1,
            source,
            f"objective.alpha={obj.alpha} needs student crops for distillation: set "
            "augment.num_local_crops > 0 (TIPS: 6) or objective.alpha=0",
        )
    mk = cfg.masking
    _require(0 <= mk.mask_probability <= 1, source, "masking.mask_probability must be in [0, 1]")
    _require(
        0 <= mk.ratio_min <= mk.ratio_max <= 1,
        source,
        "masking.ratio_min <= masking.ratio_max must lie in [0, 1]",
    )
    cap = getattr(obj, "mim_masked_capacity", None)
    _require(
        cap is None or cap >= mk.ratio_max,
        source,
        f"objective.mim_masked_capacity={cap} must be >= masking.ratio_max={mk.ratio_max}: a "
        "crop masked beyond the capacity would lose masked tokens from the iBOT loss",
    )


def _validate_data(cfg: TipsConfig, source: str) -> None:
    d = cfg.data
    _require(bool(d.train_uri), source, "data.train_uri is empty")
    _require(
        not d.train_uri.startswith("s3://") or len(d.train_uri[5:].split("/")[0]) >= 3,
        source,
        f"data.train_uri={d.train_uri!r}: s3:// URIs need a bucket name",
    )
    _require(
        0 <= d.max_skipped_fraction < 1,
        source,
        f"data.max_skipped_fraction={d.max_skipped_fraction} must be in [0, 1)",
    )
    ratios = d.caption_ratios
    _require(
        bool(ratios) and all(v >= 0 for v in ratios.values()) and sum(ratios.values()) > 0,
        source,
        f"data.caption_ratios={dict(ratios)} must be non-negative with a positive sum",
    )


def _validate_schedule(cfg: TipsConfig, source: str) -> None:
    """Steps, batch against the world size, optimizer and teacher schedules."""
    t = cfg.train
    for key in ("total_steps", "batch_size_per_worker", "log_every_steps"):
        _require(_get(t, key) >= 1, source, f"train.{key} must be >= 1")
    _require(t.checkpoint_every_steps >= 1, source, "train.checkpoint_every_steps must be >= 1")
    _require(
        not t.async_checkpoint or t.checkpoint_format == "sharded",
        source,
        "train.async_checkpoint=true needs train.checkpoint_format=sharded",
    )
    _require(
        t.checkpoint_format == "full" or accelerator(cfg.scaling) != "tpu",
        source,
        "train.checkpoint_format=sharded is not supported on scaling.accelerator=tpu "
        "(the XLA strategy copies the state to the host itself): use full",
    )
    _require(t.report_min_interval_s >= 0, source, "train.report_min_interval_s must be >= 0")
    _require(t.preemption_margin_s >= 0, source, "train.preemption_margin_s must be >= 0")
    _require(
        t.preemption_poll_interval_s > 0, source, "train.preemption_poll_interval_s must be > 0"
    )
    _require(
        t.preemption_restart in ("checkpoint", "deadline"),
        source,
        f"train.preemption_restart={t.preemption_restart!r} must be checkpoint or deadline",
    )
    s = cfg.scaling
    _require(
        0 <= s.min_workers <= s.max_workers,
        source,
        f"scaling.min_workers={s.min_workers} must be <= scaling.max_workers={s.max_workers}",
    )
    _require(
        s.min_workers > 0 or s.max_workers == 0,
        source,
        "scaling.min_workers=0 is only allowed with max_workers=0 (Ray Train local mode)",
    )
    _require(
        s.worker_group_start_timeout_s > 0,
        source,
        f"scaling.worker_group_start_timeout_s={s.worker_group_start_timeout_s} must be > 0",
    )
    _require(
        t.global_batch_size >= max(1, s.max_workers),
        source,
        f"train.global_batch_size={t.global_batch_size} is smaller than "
        f"scaling.max_workers={s.max_workers}",
    )
    o = cfg.optim
    _require(o.lr > 0, source, f"optim.lr={o.lr} must be > 0")
    _require(o.final_lr >= 0, source, f"optim.final_lr={o.final_lr} must be >= 0")
    _require(o.warmup_steps >= 0, source, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    tc = cfg.teacher
    for key in ("temp", "temp_warmup_start"):
        value = getattr(tc, key)
        _require(value > 0, source, f"teacher.{key}={value} must be > 0")
    _require(
        0 <= tc.momentum_start <= 1 and 0 <= tc.momentum_end <= 1,
        source,
        "teacher.momentum_start/momentum_end must be in [0, 1]",
    )


def _validate_run(cfg: TipsConfig, source: str) -> None:
    _require(
        cfg.train.mixed_precision != "fsdp_params"
        or (cfg.scaling.strategy != "none" and accelerator(cfg.scaling) != "tpu"),
        source,
        "train.mixed_precision=fsdp_params wraps the model in FSDP2: it needs "
        f"scaling.strategy ddp or fsdp (not {cfg.scaling.strategy}) and a CUDA/CPU "
        "accelerator (XLA casts in its own graph)",
    )
    _require(
        not cfg.train.compile or accelerator(cfg.scaling) != "tpu",
        source,
        "train.compile=true is torch.compile (CUDA/CPU); on scaling.accelerator=tpu XLA "
        "compiles the step itself: set train.compile=false",
    )
    _require(
        cfg.run.num_checkpoints_to_keep >= 1,
        source,
        f"run.num_checkpoints_to_keep={cfg.run.num_checkpoints_to_keep} must be >= 1 (the "
        "latest checkpoint is what a restart resumes from)",
    )
    _require(
        bool(cfg.run.name) and "/" not in cfg.run.name,
        source,
        f"run.name={cfg.run.name!r} must be non-empty and contain no '/'",
    )


def accelerator(scaling: ScalingSection) -> str:
    """``scaling.accelerator`` resolved: ``auto`` is gpu with ``use_gpu``, else cpu."""
    if scaling.accelerator != "auto":
        return scaling.accelerator
    return "gpu" if scaling.use_gpu else "cpu"


def _validate_accelerator(s: ScalingSection, source: str) -> None:
    """The resources each accelerator implies (Ray places workers by them)."""
    kind, res = accelerator(s), s.resources_per_worker
    key = f"scaling.accelerator={s.accelerator}"
    if kind == "gpu":
        _require(s.use_gpu, source, f"{key} needs scaling.use_gpu=true")
        return
    _require(not s.use_gpu, source, f"{key} runs no CUDA: set scaling.use_gpu=false")
    if kind != "tpu":
        return
    _require(
        res.get("GPU", 0) == 0,
        source,
        f"{key}: scaling.resources_per_worker asks for GPU {res.get('GPU')}: set GPU: 0",
    )
    _require(
        s.pjrt_device == "TPU" or s.max_workers <= 1,
        source,
        f"{key} with scaling.pjrt_device=CPU runs one worker (max_workers={s.max_workers}): "
        "each process has its own PJRT CPU client, so two cannot rendezvous "
        "(orchestrator/train/xla.py)",
    )
    _require(
        s.pjrt_device == "CPU" or res.get("TPU", 0) == 1,
        source,
        f"{key} with scaling.pjrt_device=TPU needs scaling.resources_per_worker TPU: 1 "
        f"(one worker per chip), not {res.get('TPU', 0)}",
    )
    _require(
        s.strategy != "fsdp",
        source,
        f"{key}: scaling.strategy=fsdp is CUDA/CPU only; XLA replicas all-reduce their "
        "gradients (set scaling.strategy=ddp)",
    )


def _validate_loggers(run: RunSection, source: str) -> None:
    """``run.loggers``: known names, each once, each one's package installed."""
    from orchestrator.train.loggers import BACKENDS, missing_extra

    names = list(run.loggers)
    unknown = [n for n in names if n not in BACKENDS]
    _require(not unknown, source, f"run.loggers={names}: {unknown} not in {list(BACKENDS)}")
    _require(len(set(names)) == len(names), source, f"run.loggers={names}: a name repeats")
    missing = missing_extra(names)
    _require(missing is None, source, f"run.loggers={names}: {missing}")
