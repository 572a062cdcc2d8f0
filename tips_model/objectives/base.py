"""The seam between the science and the machinery: what every objective is and returns.

An objective owns its trainable modules (``student``), its frozen EMA side (``teacher``,
possibly only heads), and its loss state (centres, temperature). The training loop only
knows this contract:

    out = objective(batch, step_state)      # ObjectiveOutput(loss, losses, metrics)
    out.loss.backward(); optimizer.step()   # the loop, never the objective, calls backward
    objective.update_teacher(momentum)      # explicit EMA / centre updates after the step

``batch`` follows docs/design.md, "Batch contract" (uint8 pixels, int64 token ids);
objectives convert pixels to float in [0, 1] themselves, on the device.

Config dataclasses for the model and for each objective live next to the code that reads
them (here and in each objective's file) so that ``tips_model`` stays importable without
the orchestrator; ``orchestrator/config.py`` assembles them into the run schema.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tips_model.ema import check_momentum, ema_apply_, ema_pairs
from tips_model.registry import OBJECTIVES


@dataclass(frozen=True)
class ModelConfig:
    """Encoders and tokenizer. Names go through the registries in ``tips_model.registry``."""

    vision: str = "vit_b14"  # registered vision factory (docs/method.md, "Vision encoder")
    text: str = "text_b"  # registered text factory (docs/method.md, "Text encoder")
    img_size: int | None = None  # native size of the stored pos grid: v1 224 (16x16), v2 448
    tokenizer: str = "bpe"  # "bpe" (bundled with open_clip, offline) | "sentencepiece"
    tokenizer_path: str | None = None  # the released tokenizer.model for "sentencepiece"
    max_text_len: int = 64  # 64 tokens, right-padded with 0 (docs/method.md, "Tokenizer")
    drop_path_rate: float = 0.0  # stochastic depth in the vision tower [open]; DINOv2 uses 0.3-0.4
    # None: no LayerScale, as the released Scenic architecture (docs/method.md, "Vision encoder")
    layerscale_init: float | None = None
    grad_checkpointing: bool = False  # recompute blocks in backward to save activation memory
    # CLIP's initial temperature [open]; the released ones end near 0.005; a learned scalar
    # that divides the cosine (docs/method.md, "Similarity and temperature")
    temperature_init: float = 0.07
    learn_temperature: bool = True  # a learned scalar, divided by
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


def build_towers(
    model_cfg: ModelConfig, vocab_size: int, why_same_width: str
) -> tuple[nn.Module, nn.Module]:
    """The vision and text towers of a two-tower objective (TIPS, CLOC), of one width D.

    ``model.grad_checkpointing`` applies to the blocks of both towers.

    Args:
        model_cfg: encoders, tokenizer length, checkpointing.
        vocab_size: the tokenizer's vocabulary.
        why_same_width: the end of the error raised when the widths differ.

    Returns:
        ``(vision, text)``.
    """
    from tips_model.text import build_text

    vision = build_vision_tower(model_cfg)
    text = build_text(model_cfg.text, vocab_size=vocab_size, max_len=model_cfg.max_text_len)
    d = vision.embed_dim
    text_width = text.token_embedding.weight.shape[1]
    if text_width != d:
        raise ValueError(
            f"model.text={model_cfg.text} has width {text_width} but model.vision="
            f"{model_cfg.vision} has {d}: {why_same_width}"
        )
    if model_cfg.grad_checkpointing:
        text.set_grad_checkpointing(True)
    return vision, text


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

    Subclasses set ``student`` (trained, wrapped for DDP/FSDP by the loop through
    ``wrap_student``, called in ``forward`` through ``run_student``) and ``teacher`` (frozen EMA
    side or None) and implement ``forward``, ``required_batch_keys`` and ``update_teacher``.
    """

    student: nn.Module
    teacher: nn.Module | None
    # ``[wrap(student)]`` once the loop called ``wrap_student``: a list, so that the wrapper
    # is no registered submodule and state dicts keep clean names (docs/design-changes.md 2).
    _runner: list[nn.Module] | None = None

    def wrap_student(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Run the student through ``wrap(student)`` (e.g. DDP); parameters stay shared."""
        self._runner = [wrap(self.student)]

    def run_student(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward, through the ``wrap_student`` wrapper once there is one."""
        runner = self._runner[0] if self._runner else self.student
        return runner(*args, **kwargs)

    def required_batch_keys(self) -> set[str]:
        """Batch keys this objective reads; the data pipeline makes only these."""
        raise NotImplementedError

    def update_teacher(self, momentum: float) -> None:
        """EMA update of the teacher side after an optimizer step (no-op without one)."""

    # ``ema_apply_``, or its compiled form after ``compile_step`` (a plain attribute, never
    # a submodule or state).
    _ema_apply: Callable[..., None] = staticmethod(ema_apply_)
    _compiled: bool = False

    @torch.no_grad()
    def ema_update(self, pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
        """``ema_update_(teacher, student, momentum)`` over ``(teacher, student)`` module pairs
        in one fused update (compiled after ``compile_step``, the momentum then a tensor)."""
        check_momentum(momentum)
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [])
        for teacher, student in pairs:
            for acc, part in zip(lists, ema_pairs(teacher, student)):
                acc.extend(part)
        if self._compiled:
            device = lists[0][0].device if lists[0] else None
            # torch.full fills on the device: torch.tensor(momentum, device=) would copy from
            # the host and wait for the GPU every step (orchestrator/train/guard.py)
            self._ema_apply(*lists, torch.full((), momentum, device=device))
        else:
            self._ema_apply(*lists, momentum)

    def compile_step(self, backend: str = "inductor") -> None:
        """``train.compile``: ``torch.compile`` this objective's call (forward + losses, the
        student's wrapper included) and the EMA update. The call keeps torch's automatic
        dynamic mode: batch shapes are fixed (static-shape objectives), and a schedule scalar
        that changes (the teacher temperature in its warm-up) becomes a graph input after one
        recompile, where ``dynamic=False`` would compile a graph per value. The EMA update
        takes its momentum as a tensor and is compiled with ``dynamic=False``. The first call
        of each compiles (tens of seconds at ViT-B); tests/tips_model/test_compile.py holds
        every objective's forward at 0 graph breaks and the graph counts.

        Args:
            backend: ``torch.compile`` backend; tests use ``"aot_eager"`` (the same graphs,
                forward and backward, without code generation).
        """
        self.compile(backend=backend)
        self._ema_apply = torch.compile(ema_apply_, dynamic=False, backend=backend)
        self._compiled = True

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
