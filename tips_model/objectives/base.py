"""The seam between the science and the machinery: what every objective is and returns.

An objective owns its trainable modules (``student``), its frozen EMA side (``teacher``,
possibly only heads), and its loss state (centres, temperature). The training loop only
knows this contract:

    out = objective(batch, step_state)      # ObjectiveOutput(loss, losses, metrics)
    out.loss.backward(); optimizer.step()   # the loop, never the objective, calls backward
    objective.update_teacher(momentum)      # explicit EMA / centre updates after the step

``batch`` follows the batch contract in shared/DESIGN.md (uint8 pixels, int64 token ids);
objectives convert pixels to float in [0, 1] themselves, on the device.

Config dataclasses for the model and for each objective live next to the code that reads
them (here and in each objective's file) so that ``tips_model`` stays importable without
the orchestrator; ``orchestrator/config.py`` assembles them into the run schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tips_model.registry import OBJECTIVES


@dataclass(frozen=True)
class ModelConfig:
    """Encoders and tokenizer. Names go through the registries in ``tips_model.registry``."""

    vision: str = "vit_b14"  # registered vision factory (TIPS_NOTES 1.1)
    text: str = "text_b"  # registered text factory (TIPS_NOTES 1.4)
    img_size: int | None = None  # native size of the stored pos grid: v1 224 (16x16), v2 448
    tokenizer: str = "bpe"  # "bpe" (bundled with open_clip, offline) | "sentencepiece"
    tokenizer_path: str | None = None  # the released tokenizer.model for "sentencepiece"
    max_text_len: int = 64  # TIPS_NOTES 2: 64 tokens, right-padded with 0
    drop_path_rate: float = 0.0  # stochastic depth in the vision tower [open]; DINOv2 uses 0.3-0.4
    layerscale_init: float | None = None  # None: no LayerScale, as the released Scenic arch (1.1)
    grad_checkpointing: bool = False  # recompute blocks in backward to save activation memory
    temperature_init: float = 0.07  # CLIP's initial temperature [open]; released ends ~0.005 (1.5)
    learn_temperature: bool = True  # TIPS_NOTES 1.5: a learned scalar, divided by
    # What the vision tower does to [0, 1] pixels (tips_model.vision.INPUT_NORMS): "none" is
    # the released TIPS contract (docs/method.md "Input pixels"); "imagenet" is DINOv2's and
    # what the tiny recipes need for self-distillation to learn (docs/method.md, section
    # "Self-distillation at small scale"). Stored in the checkpoint's config.yaml.
    input_norm: str = "none"


def build_vision_tower(model_cfg: ModelConfig) -> nn.Module:
    """The vision tower a model config asks for (every objective builds it here)."""
    from tips_model.vision import build_vision

    overrides: dict = {
        "drop_path_rate": model_cfg.drop_path_rate,
        "input_norm": model_cfg.input_norm,
    }
    if model_cfg.img_size is not None:
        overrides["img_size"] = model_cfg.img_size
    if model_cfg.layerscale_init is not None:
        overrides["layerscale_init"] = model_cfg.layerscale_init
    vision = build_vision(model_cfg.vision, **overrides)
    if model_cfg.grad_checkpointing:
        vision.set_grad_checkpointing(True)
    return vision


@dataclass(frozen=True)
class StepState:
    """Per-step values from the schedules, computed by the loop from the global step."""

    step: int
    teacher_temp: float = 0.07
    # Fraction of training done; objectives may use it (e.g. to freeze a last layer).
    progress: float = 0.0


@dataclass
class ObjectiveOutput:
    """What ``forward`` returns.

    Attributes:
        loss: scalar weighted total; only the loop calls ``backward`` on it.
        losses: unweighted terms, e.g. ``{"contrastive_alt", "contrastive_syn", "dino", "ibot"}``.
        metrics: detached diagnostics (entropies, accuracies, weights in use).
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class for objectives: a thin nn.Module with the contract's hooks.

    Subclasses set ``student`` (trained, wrapped for DDP/FSDP by the loop) and ``teacher``
    (frozen EMA side or None) and implement ``forward``, ``required_batch_keys`` and
    ``update_teacher``.
    """

    student: nn.Module
    teacher: nn.Module | None

    def required_batch_keys(self) -> set[str]:
        """Batch keys this objective reads; the data pipeline makes only these."""
        raise NotImplementedError

    def update_teacher(self, momentum: float) -> None:
        """EMA update of the teacher side after an optimizer step (no-op without one)."""

    def shard_units(self) -> list[str]:
        """Submodules of ``student`` that a sharding wrapper (FSDP) may make units of their own.

        Dotted names relative to ``student``, innermost first. A unit gathers its parameters
        only around its own ``forward`` (the wrapper also registers the vision tower's
        ``forward_value_only_last`` and ``get_intermediate_layers``), so a name belongs here
        only if this objective and evaluation reach that module through those alone, never
        through its other methods or parameters; a unit may then be called outside the
        student's ``forward``. The teacher's submodules of the same names are sharded alike.
        Everything else stays in the student's root unit. Default: the transformer blocks of
        ``student.vision`` and ``student.text`` (MUG, for one, calls the vision tower's
        ``prepare_tokens`` directly, so the tower itself cannot be a unit there).
        """
        names = []
        for tower, blocks in (("vision", "blocks"), ("text", "transformer.resblocks")):
            if getattr(self.student, tower, None) is None:
                continue
            for i, _ in enumerate(self.student.get_submodule(f"{tower}.{blocks}")):
                names.append(f"{tower}.{blocks}.{i}")
        return names

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters split into decayed and non-decayed groups.

        Biases, norms, LayerScale gammas, tokens, position embeddings and the temperature
        get no weight decay (DINOv2 / open_clip convention).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or name.startswith("teacher."):
                continue
            if p.ndim <= 1 or name.endswith((".bias", "_token", "pos_embed", "tokens")):
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def images_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 in [0, 1]; the vision tower applies ``input_norm``."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def build_objective(objective_cfg: object, model_cfg: ModelConfig, vocab_size: int) -> Objective:
    """Build the objective named by ``objective_cfg.name`` through the registry."""
    return OBJECTIVES.build(
        objective_cfg.name, cfg=objective_cfg, model_cfg=model_cfg, vocab_size=vocab_size
    )


def objective_config_class(name: str) -> type:
    """The config dataclass registered with objective ``name`` (its ``CONFIG`` attribute)."""
    return OBJECTIVES.get(name).CONFIG


def list_objectives() -> list[str]:
    return OBJECTIVES.names()
