"""The run config's entry point: recipe + override merging, loading, and the derived plan.

The typed schema (the section dataclasses, ``TipsConfig``, ``ConfigError``) lives in
orchestrator/config_schema.py and the cross-field rules (``validate``, ``accelerator``,
``patch_size``) in orchestrator/config_validation.py; this module re-exports their public
names, so callers import everything from here (``from orchestrator import config``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config_schema import (
    AugmentConfig,
    ConfigError,
    DataConfig,
    MaskingConfig,
    OptimConfig,
    RunSection,
    ScalingSection,
    StorageConfig,
    TeacherConfig,
    TipsConfig,
    TrainConfig,
)
from orchestrator.config_validation import accelerator, patch_size, tower_widths, validate

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "MaskingConfig",
    "OptimConfig",
    "Plan",
    "RunSection",
    "ScalingSection",
    "StorageConfig",
    "TeacherConfig",
    "TipsConfig",
    "TrainConfig",
    "accelerator",
    "derive",
    "from_dict",
    "load",
    "objective_configs",
    "parse_overrides",
    "parse_yaml_dict",
    "patch_size",
    "to_dict",
    "to_yaml",
    "tower_widths",
    "validate",
    "with_overrides",
]

logger = logging.getLogger(__name__)
_OBJECTIVE_CONFIGS: dict[str, type] | None = None


def objective_configs() -> dict[str, type]:
    """Objective name -> its config dataclass (imports tips_model.objectives lazily)."""
    global _OBJECTIVE_CONFIGS
    if _OBJECTIVE_CONFIGS is None:
        from tips_model import objectives

        _OBJECTIVE_CONFIGS = {n: objectives.objective_config_class(n) for n in objectives.names()}
    return _OBJECTIVE_CONFIGS


# --------------------------------------------------------------------------- loading


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


_KEY_RE = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+)+)")


def _origin(layers: list[tuple[str, DictConfig]], key: str, default: str) -> str:
    """The layer ("overrides" or a recipe file) that last set ``key``; else ``default``."""
    missing = object()
    for source, layer in reversed(layers):
        if OmegaConf.select(layer, key, default=missing) is not missing:
            return source
    return default


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
