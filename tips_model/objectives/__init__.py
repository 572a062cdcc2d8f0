"""Training objectives, one file each, registered by name (``objective.name`` in recipes).

``build_objective(objective_cfg, model_cfg, vocab_size)`` builds one; ``names()`` lists them;
``objective_config_class(name)`` gives the dataclass its recipe section is checked against.
"""

from __future__ import annotations

from tips_model.objectives import cloc, mug, tips  # noqa: F401  (registers by name)
from tips_model.objectives.base import (
    ModelConfig,
    Objective,
    ObjectiveOutput,
    StepState,
    build_objective,
    list_objectives,
    objective_config_class,
)
from tips_model.objectives.cloc_config import ClocObjectiveConfig
from tips_model.objectives.mug_config import MugObjectiveConfig
from tips_model.objectives.tips_config import TipsObjectiveConfig, TipsV2ObjectiveConfig

names = list_objectives

__all__ = [
    "ClocObjectiveConfig",
    "MugObjectiveConfig",
    "ModelConfig",
    "Objective",
    "ObjectiveOutput",
    "StepState",
    "TipsObjectiveConfig",
    "TipsV2ObjectiveConfig",
    "build_objective",
    "list_objectives",
    "names",
    "objective_config_class",
]
