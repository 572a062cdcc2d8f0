"""The run schema: one frozen dataclass per config section, each default with its unit and
source, and ``TipsConfig`` holding them all (docs/design.md, "Config").

The ``model`` and ``objective`` sections' dataclasses live in ``tips_model`` beside the code
that reads them; ``objective.name`` picks the objective's own dataclass when a config is
loaded (orchestrator/config.py), so a key that belongs to another objective is an error.
``ConfigError`` is what every config step raises, naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tips_model.objectives.base import ModelConfig


class ConfigError(ValueError):
    """A recipe, override or cross-field rule is wrong; the message names the key."""


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
    # sharded only: DCP's save-plan cache (DefaultSavePlanner(enable_plan_caching=True)): from
    # the second save on, a rank whose plan is unchanged sends none and rank 0 reuses the
    # global plan and metadata; rank 0's planning CPU -40-70 % at 2-8 ranks, and it grows with
    # the ranks (docs/scaling.md, "Checkpoints"); false: plan every save afresh
    checkpoint_plan_cache: bool = True
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
    # how often Ray Train's PreemptionWatcher asks the GCS for draining nodes
    # (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S, Ray's default 5 s): one small GCS call per run
    preemption_poll_interval_s: float = 1.0


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
