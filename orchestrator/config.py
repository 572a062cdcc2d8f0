"""The run schema: typed defaults, recipe + override merging, validation, derived plan.

Merge order (docs/design.md, "Config"): schema defaults <- ``base:`` recipe (one level) <-
recipe YAML <- ``key=value`` overrides <- Tune trial overrides. Struct mode is on, so an
unknown key is refused with its dotted path; a wrong type is refused with key and value.
``validate`` checks cross-field rules. All of this runs before ``ray.init``; every error is a
``ConfigError`` naming the dotted key and, when there is one, the recipe file.

``objective.name`` picks the objective's own dataclass (registered in ``tips_model``), so a
key that belongs to another objective is an error too.

World-size-dependent numbers (per-worker batch, accumulation) come from
``derive(cfg, world_size)`` at every worker (re)start; ``train.global_batch_size`` is the
invariant across elastic resizes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tips_model.objectives.base import ModelConfig
from tips_model.vision import INPUT_NORMS

logger = logging.getLogger(__name__)
_OBJECTIVE_CONFIGS: dict[str, type] | None = None


class ConfigError(ValueError):
    """A recipe, override or cross-field rule is wrong; the message names the key."""


def objective_configs() -> dict[str, type]:
    """Objective name -> its config dataclass (imports tips_model.objectives lazily)."""
    global _OBJECTIVE_CONFIGS
    if _OBJECTIVE_CONFIGS is None:
        from tips_model import objectives

        _OBJECTIVE_CONFIGS = {n: objectives.objective_config_class(n) for n in objectives.names()}
    return _OBJECTIVE_CONFIGS


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto); else AWS_ENDPOINT_URL
    region: str = "us-east-1"  # credentials come from the standard AWS env vars / profiles


@dataclass(frozen=True)
class DataConfig:
    train_uri: str = "???"  # directory or s3://bucket/prefix of Parquet or WebDataset shards
    eval_uri: str | None = None  # synthetic or user eval split for periodic evaluation
    format: str = "auto"  # auto (by file extension) | parquet | webdataset
    seed: int = 0  # base seed for file order, crops, masks and caption sampling
    # [open] docs/method.md, "Open questions", item 7: v2 sampling probabilities unknown;
    # kinds as named in the shards.
    caption_ratios: dict[str, float] = field(default_factory=lambda: {"short": 0.5, "long": 0.5})
    shuffle_files: bool = True  # seeded per-epoch shuffle of the file order
    local_shuffle_buffer_size: int = 0  # rows; 0 = off (keeps exact resume trivially ordered)
    read_parallelism: int | None = None  # override_num_blocks of the reader
    map_batch_size: int = 32  # rows per decode/augment call
    decode_draft: bool = True  # JPEG draft-mode decode at the smallest size covering all crops
    # The stream covers train.total_steps batches while at most this fraction of the records
    # is skipped as bad (corrupt image, no caption, unreadable): it reads 1 / (1 - f) times
    # the positions it needs. More ends the run with the skip counts (no retry).
    max_skipped_fraction: float = 0.5
    num_cpus_per_map_task: float = 1.0  # CPU reserved per decode/augment task
    # extra custom resources per read/decode task, e.g. {data_node: 0.01}: Ray Data work only
    # on nodes that offer it (CPU-only data nodes, docs/clusters.md)
    resources_per_map_task: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AugmentConfig:
    """Multi-crop: TIPS uses 1 global crop at 224 and M=6 local crops at 98 [paper]."""

    num_global_crops: int = 1  # [paper] docs/method.md, "Crops and augmentation"
    global_crop_size: int = 224  # [paper]
    global_crop_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # [open] DINOv2
    num_local_crops: int = 6  # [paper] M
    local_crop_size: int = 98  # [paper]
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])  # [open] DINOv2
    hflip_prob: float = 0.5  # [paper] random-resized crops and flips are TIPS's only ops
    interpolation: str = "bilinear"  # bilinear | bicubic (DINOv2 uses bicubic)
    color_jitter_prob: float = 0.0  # off: TIPS uses no photometric ops [paper]
    grayscale_prob: float = 0.0  # off [paper]


@dataclass(frozen=True)
class MaskingConfig:
    """Block-wise iBOT masks; TIPS's own values are [open]: DINOv2's.

    docs/method.md, "Masking".
    """

    mask_probability: float = 0.5  # fraction of images that get a mask
    ratio_min: float = 0.1  # masked fraction of patches ~ U[ratio_min, ratio_max]
    ratio_max: float = 0.5
    min_num_patches: int = 4  # smallest block
    min_aspect: float = 0.3  # block aspect ratio in [min_aspect, 1/min_aspect]


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adafactor"  # [paper] Adafactor | adamw
    lr: float = 5e-4  # [paper] peak lr at global batch 16k
    lr_schedule: str = "linear"  # [paper] linear warm-up then linear decay to final_lr
    warmup_steps: int = 0  # [paper] 1.4 epochs; recipes set it in steps
    final_lr: float = 0.0  # [paper]
    weight_decay: float = 0.0  # [open] Adafactor default; DINOv2 AdamW uses 0.04 -> 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW only
    grad_clip_norm: float = 3.0  # [open] DINOv2 clip 3.0; 0 = off
    freeze_last_layer_steps: int = 0  # [open] DINOv2 freezes the prototypes for 1 epoch


@dataclass(frozen=True)
class TeacherConfig:
    """EMA momentum and teacher temperature schedules (values [open]).

    docs/method.md, "Teacher EMA and schedules".
    """

    momentum_start: float = 0.992  # DINOv2 (0.994 for L/g)
    momentum_end: float = 1.0  # DINOv2 cosine to 1.0; SILC keeps it fixed (set end = start)
    momentum_schedule: str = "cosine"  # cosine | linear | constant
    temp_warmup_start: float = 0.04  # DINOv2
    temp: float = 0.07  # DINOv2
    temp_warmup_steps: int = 0  # DINOv2: 30 epochs


@dataclass(frozen=True)
class TrainConfig:
    total_steps: int = 1000  # optimizer steps; epochs are only ever derived
    global_batch_size: int = 16384  # [paper] invariant across elastic resizes
    batch_size_per_worker: int = 256  # largest micro-batch a worker runs at once
    precision: str = "bf16"  # bf16 autocast on GPU | fp32 (CPU always runs fp32)
    # How bf16 reaches the weights on CUDA (orchestrator/train/parallel.py): autocast casts
    # every fp32 weight at each use; fsdp_params keeps bf16 compute copies of fp32 master
    # weights through FSDP2's MixedPrecisionPolicy, on any world size (one GPU: a mesh of
    # one; scaling.strategy=ddp: FSDP2 without resharding after forward). autocast is the
    # default because it is what the README's H200 step measured; fsdp_params removes the
    # per-weight casts that profile showed (issue 22, item 4) and awaits its GPU measurement.
    mixed_precision: str = "autocast"  # autocast | fsdp_params
    # torch.compile the objective's forward + loss and the EMA update (Objective.compile_step,
    # static shapes: issue 22, item 3); off by default because the first steps then compile
    # (tens of seconds); the GPU recipes turn it on. Not on XLA, which traces its own graphs.
    compile: bool = False
    seed: int = 0
    log_every_steps: int = 10  # progress line, TensorBoard, metrics.jsonl (rank 0)
    # Logging intervals in a row with collapsed self-distillation targets (near-uniform or
    # near-one-hot, after the warm-ups) before a warning line; 0 = no check
    # (orchestrator/train/metrics.py CollapseMonitor).
    collapse_patience: int = 2
    # Ray's controller takes one report per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s) and
    # a report blocks until the previous one was taken: metrics-only reports are sent at most
    # this often (checkpoints, evaluations and the last step always are). 0 = every log step.
    report_min_interval_s: float = 2.0
    checkpoint_every_steps: int = 500
    # full: rank 0 writes one model.pt + optim.pt (under FSDP every rank joins a gather of
    # the whole state first); sharded: every rank writes its own shards through
    # torch.distributed.checkpoint, no gather, reshardable to any world size on load
    # (orchestrator/train/checkpoint.py; issue 21: the gather and rank 0's write stalled every
    # worker and needed rank 0's host memory for a ViT-g's 11 GB). full stays the default so
    # small runs keep the one-file layout `tips eval` and Tune read; the GPU recipes use
    # sharded, and `tips export` turns a sharded checkpoint into the full layout.
    checkpoint_format: str = "full"  # full | sharded
    # sharded only: copy the state to host memory (the only stall), write in the background,
    # and report the checkpoint to Ray once written (benchmarks/checkpoint_io.py)
    async_checkpoint: bool = False
    eval_every_steps: int = 0  # 0 = no periodic evaluation (rank 0, on data.eval_uri)
    eval_tasks: list[str] = field(
        default_factory=lambda: ["zero_shot_seg", "retrieval", "zero_shot_cls"]
    )
    eval_max_images: int = 32  # images per periodic evaluation (a quick signal, not a benchmark)
    # stop after this many non-finite losses in a row; the skips are counted on the device
    # and read at log steps, so the run stops at the next one (orchestrator/train/guard.py)
    max_nonfinite_steps: int = 10
    torch_threads: int = 0  # intra-op threads per worker; 0 = the worker's CPU reservation
    preemption_check_every_steps: int = 5  # ray.train.get_preemption_info() is a barrier
    # after a drain notice: checkpoint at once, and again this long (plus twice that first
    # checkpoint's duration) before the node's deadline; a spot notice gives 120 s on EC2
    preemption_margin_s: float = 15.0
    # what the group does once that first checkpoint is written: "checkpoint" = restart at
    # once on the nodes that are not draining (the run goes on without the drained node
    # before its deadline: README "Elastic recovery"); "deadline" = Ray's default, the
    # group trains on, saves again near the deadline and restarts when the node is gone
    preemption_restart: str = "checkpoint"


@dataclass(frozen=True)
class ScalingSection:
    min_workers: int = 1  # elastic lower bound; 0 with max_workers 0 = Ray Train local mode
    max_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    accelerator_type: str | None = None  # e.g. "A100", "H100": pins workers to a GPU type
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 sharding, large models) | none; README, Training
    # Ray Train backend (orchestrator/train/driver.py backend_config): auto = gpu with use_gpu,
    # else cpu; tpu = torch_xla through orchestrator/train/xla.py's TorchXLAConfig, one
    # worker per chip (resources_per_worker TPU: 1), gradients all-reduced by XLA, not DDP
    accelerator: str = "auto"  # auto | cpu | gpu | tpu
    pjrt_device: str = "TPU"  # tpu only: TPU, or CPU (the CPU XLA device standing in: tests)
    placement_strategy: str = "PACK"
    resize_check_interval_s: float = 60.0  # how often an elastic run looks for more capacity
    # Elastic runs (min_workers < max_workers) only: how long a new worker group waits for
    # its placement group before the controller decides the size again. Ray's default
    # (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) is 60 s; a restart right after a node loss can
    # still count the lost node, ask for a size that cannot be placed and lose the whole
    # timeout (docs/ray.md, "Recovery time"). Placing on live nodes took < 0.1 s
    # (benchmarks/elastic_recovery.py). RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, when set, wins.
    worker_group_start_timeout_s: float = 5.0


@dataclass(frozen=True)
class RunSection:
    name: str = "tips"  # stable name: rerunning with the same name + storage resumes
    storage_uri: str = "runs"  # local directory or s3://bucket/prefix
    max_failures: int = 3  # worker-group failures before the run errors (-1 = infinite)
    max_preemption_failures: int = -1  # preemptions, counted apart (-1 = infinite)
    num_checkpoints_to_keep: int = 3
    resume_from: str | None = None  # explicit checkpoint URI to start from
    # Ray's own console lines (Ray Train's per-report and start-up lines, Ray Data's plans):
    # hidden below this level; ours (progress, checkpoints, warnings) always show. `-v` = info
    ray_log_level: str = "warning"
    tensorboard: bool = True  # false drops "tensorboard" from run.loggers
    # Where rank 0 writes every metrics row (orchestrator/train/loggers.py): any of
    # tensorboard (<run>/tensorboard), mlflow, wandb; the last two need their extra:
    # pip install tips-orchestrator[mlflow] / tips-orchestrator[wandb].
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    experiment: str | None = None  # MLflow experiment, W&B group; None: "tips" (tune: sweep)
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<run.storage_uri>/mlflow.db (local storage)
    mlflow_tracking_uri: str | None = None
    wandb_project: str | None = None  # None: the experiment name
    wandb_mode: str = "online"  # online | offline (files in <run>/wandb; `wandb sync` uploads)


@dataclass(frozen=True)
class TipsConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Any = None  # the dataclass registered for objective.name (default "tips")
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    storage: StorageConfig = field(default_factory=StorageConfig)


# --------------------------------------------------------------------------- loading

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


def _thaw(node: DictConfig) -> DictConfig:
    """Undo the read-only flag frozen dataclasses put on every node, and open free-form
    dict fields (``caption_ratios``, ``resources_per_worker``) to new keys."""
    node._set_flag("readonly", None)
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _thaw(child)
            if not dataclasses.is_dataclass(child._metadata.object_type):
                OmegaConf.set_struct(child, False)
        elif isinstance(child, ListConfig):
            child._set_flag("readonly", None)
    return node


def _schema(objective_name: str) -> DictConfig:
    configs = objective_configs()
    if objective_name not in configs:
        raise ConfigError(
            f"objective.name={objective_name!r} is not a registered objective; "
            f"registered: {sorted(configs)}"
        )
    root = _thaw(OmegaConf.structured(TipsConfig))
    root.objective = _thaw(OmegaConf.structured(configs[objective_name]))
    OmegaConf.set_struct(root, True)
    return root


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        from orchestrator.recipes import list_recipes

        names = ", ".join(n for n, _ in list_recipes())
        raise ConfigError(f"recipe file not found: {path} (packaged recipes: {names})")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: name the file
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of config sections")
    return loaded


def _recipe_layers(recipe: str | Path) -> list[tuple[str, DictConfig]]:
    """The recipe and at most one ``base:`` recipe under it (no chains)."""
    path = Path(recipe).expanduser().resolve()
    layer = _read_yaml(path)
    layers: list[tuple[str, DictConfig]] = []
    if "base" in layer:
        base_path = (path.parent / str(layer.pop("base"))).resolve()
        base = _read_yaml(base_path)
        if "base" in base:
            raise ConfigError(f"{base_path}: a base recipe cannot have its own base: (one level)")
        layers.append((str(base_path), base))
    layers.append((str(path), layer))
    return layers


def _objective_name(layers: list[tuple[str, DictConfig]]) -> str:
    name = "tips"
    for _, layer in layers:
        value = OmegaConf.select(layer, "objective.name", default=None)
        if value is not None:
            name = str(value)
    return name


def _merge(layers: list[tuple[str, DictConfig]]) -> Any:
    cfg = _schema(_objective_name(layers))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            msg = str(e).splitlines()[0]
            raise ConfigError(f"{source}: key '{key}': {msg}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        where = layers[-1][0] if layers else "defaults"
        raise ConfigError(f"{where}: required keys have no value: {', '.join(missing)}")
    try:
        obj = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"{layers[-1][0] if layers else 'config'}: {e}") from None
    return obj


def load(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Recipe YAML + ``key=value`` overrides -> validated, frozen ``TipsConfig``.

    Raises:
        ConfigError: unknown key, wrong type, missing value or a broken cross-field rule;
            the message names the dotted key and the file or "overrides".
    """
    layers = _recipe_layers(recipe) if recipe else []
    layers.append(("overrides", parse_overrides(overrides)))
    cfg = _merge(layers)
    source = str(layers[-2][0]) if recipe else "overrides"
    try:
        validate(cfg, source=source)
    except ConfigError as e:  # name the layer that set the offending key, not just the recipe
        detail = getattr(e, "detail", None)
        match = _KEY_RE.match(detail or "")
        if not match:
            raise
        raise ConfigError(f"{_origin(layers, match.group(1), source)}: {detail}") from None
    return cfg


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """``key=value`` strings -> one DictConfig, the way ``tips train``, ``tips tune`` and
    ``tips eval`` all read their command lines (values are YAML: ``[a,b]``, ``0.5``, ``true``).

    Raises:
        ConfigError: an argument without ``=``, or one whose value YAML cannot parse.
    """
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must be key=value, got: {bad}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:  # OmegaConf errors and yaml's parser errors ("key=[1")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        bad_key = next((o for o in overrides if _parses(o) is False), None)
        where = f" in {bad_key!r}" if bad_key else ""
        raise ConfigError(f"overrides: cannot parse{where}: {first}") from None


def _parses(override: str) -> bool:
    try:
        OmegaConf.from_dotlist([override])
    except Exception:  # noqa: BLE001 (any parse failure)
        return False
    return True


def parse_yaml_dict(text: str) -> dict[str, Any]:
    """A saved ``config.yaml`` as a plain dict (no schema: old files may lack new keys)."""
    loaded = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    return loaded if isinstance(loaded, dict) else {}


def from_dict(d: dict[str, Any]) -> Any:
    """Rebuild (and re-validate) a config from ``to_dict`` output, e.g. on a Ray worker."""
    cfg = _merge([("config dict", OmegaConf.create(d))])
    validate(cfg, source="config dict")
    return cfg


def to_dict(cfg: TipsConfig) -> dict[str, Any]:
    """A plain, picklable dict (what crosses into Ray as ``train_loop_config``)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TipsConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def with_overrides(cfg: TipsConfig, overrides: dict[str, Any]) -> Any:
    """Apply dotted-key overrides (e.g. a Tune trial's) to a config and re-validate."""
    layer = OmegaConf.create({})
    for key, value in overrides.items():
        OmegaConf.update(layer, key, value, force_add=True)
    out = _merge([("config", OmegaConf.create(to_dict(cfg))), ("trial overrides", layer)])
    validate(out, source="trial overrides")
    return out


# --------------------------------------------------------------------------- validation


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


_KEY_RE = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+)+)")


def _origin(layers: list[tuple[str, DictConfig]], key: str, default: str) -> str:
    """The layer ("overrides" or a recipe file) that last set ``key``; else ``default``."""
    missing = object()
    for source, layer in reversed(layers):
        if OmegaConf.select(layer, key, default=missing) is not missing:
            return source
    return default


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


# --------------------------------------------------------------------------- derived plan


@dataclass(frozen=True)
class Plan:
    """World-size-dependent numbers, recomputed at every worker (re)start."""

    world_size: int
    global_batch_size: int
    per_rank_batch: int  # samples each rank contributes to one optimizer step
    micro_batch: int  # samples per forward/backward
    accum_steps: int  # micro-batches per optimizer step
    total_steps: int


def derive(cfg: TipsConfig, world_size: int) -> Plan:
    """Split the global batch over ``world_size`` workers and accumulation steps.

    Every rank gets the same batch (the gathered contrastive loss needs it). When the world
    size divides ``train.global_batch_size`` the global batch is exact; otherwise it is the
    largest multiple of the world size below it (fewer than ``world_size`` samples short,
    logged). The micro-batch is the largest divisor of the per-rank batch that fits in
    ``train.batch_size_per_worker``.
    """
    ws = max(1, world_size)
    g = cfg.train.global_batch_size
    per_rank = g // ws
    if g % ws:
        logger.warning(
            "train.global_batch_size=%d does not divide over %d workers: using %d per step",
            g,
            ws,
            per_rank * ws,
        )
    accum = next(
        a
        for a in range(1, per_rank + 1)
        if per_rank % a == 0 and per_rank // a <= cfg.train.batch_size_per_worker
    )
    return Plan(
        world_size=ws,
        global_batch_size=per_rank * ws,
        per_rank_batch=per_rank,
        micro_batch=per_rank // accum,
        accum_steps=accum,
        total_steps=cfg.train.total_steps,
    )
