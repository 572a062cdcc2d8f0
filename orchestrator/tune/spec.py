"""Sweep files: schema, search-space translation and validation before any trial starts.

    sweep = load_sweep("orchestrator/recipes/sweeps/loss_weights.yaml", ["num_samples=8"])
    sweep.base          # the validated base TipsConfig (recipe + the sweep's overrides)
    sweep.space         # {dotted config key: Sampler}
    sweep.param_space() # the Tune param_space: {"overrides": {key: tune domain}}

A sweep file (docs/design.md, "Config") names a base recipe, fixed overrides for every
trial, the metric and mode, a search space over dotted config keys, the scheduler and the
trial resources:

    recipe: tiny_cpu.yaml
    overrides: [train.total_steps=60, train.eval_every_steps=20]
    metric: eval/zero_shot_seg/miou
    mode: max
    space:
      objective.alpha: {loguniform: [0.25, 4.0]}
      objective.beta: {choice: [1.0, 2.0, 4.0]}
    num_samples: 4
    scheduler: {name: asha, grace_period: 20, reduction_factor: 2}

Samplers map one to one onto ``ray.tune``: ``choice``, ``grid`` (``grid_search``),
``uniform``, ``loguniform``, ``randint`` (upper bound exclusive, as in Tune). Every key is
checked against the config schema by applying each sampler's extreme or listed values to
the base config (so an unknown key, a wrong type or a broken cross-field rule is refused
with the key and the file before Ray starts); the metric must be one the trials report.

Scheduler time is counted in optimizer steps (``train/step``): ASHA's ``grace_period`` and
``max_t`` and PBT's ``perturbation_interval`` are steps, as every other count in a recipe.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator import config as config_lib

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("fifo", "asha", "pbt")
TIME_ATTR = "train/step"
METRIC_PREFIXES = ("loss/", "eval/", "metric/", "perf/", "data/", "sched/", "train/")


class SweepError(ValueError):
    """A sweep file or override is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class Sampler:
    """One search-space entry: a Tune sampler name and its arguments."""

    kind: str  # one of SAMPLERS
    args: tuple[Any, ...]  # choice/grid: the values; uniform/loguniform/randint: (lo, hi)

    def domain(self) -> Any:
        """The ``ray.tune`` search domain."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        lo, hi = self.args
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[
            self.kind
        ](lo, hi)

    def mutation(self) -> Any:
        """What PBT resamples from on explore (a list for discrete spaces, else the domain)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        return self.domain()

    def probe_values(self) -> list[Any]:
        """Values that exercise the config check: every listed value, or both bounds."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        lo, hi = self.args
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]


@dataclass  # not frozen: OmegaConf makes frozen ones read-only
class SchedulerSpec:
    name: str = "fifo"  # fifo | asha | pbt
    # ASHA (Li et al. 2020): time in optimizer steps
    grace_period: int = 1  # steps before the first rung
    reduction_factor: float = 3.0  # keep the top 1/reduction_factor at each rung
    max_t: int | None = None  # default: train.total_steps
    # PBT (Jaderberg et al. 2017)
    perturbation_interval: int = 0  # steps between exploit/explore decisions
    quantile_fraction: float = 0.25  # bottom fraction copies the top fraction
    resample_probability: float = 0.25  # explore: resample instead of perturbing
    perturbation_factors: list[float] = field(default_factory=lambda: [1.2, 0.8])


@dataclass  # not frozen: OmegaConf makes frozen ones read-only
class TrialSpec:
    # The trial driver hosts the Train controller: keep it on safe (on-demand) nodes, e.g.
    # {CPU: 0.25, TRAIN_DRIVER: 0.01} with that custom resource on the head
    # (docs/ray.md, "Tune with Train V2").
    driver_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.25})
    max_failures: int = 1  # Tune-level retries of a failed trial


@dataclass  # not frozen: OmegaConf makes frozen ones read-only
class SweepFile:
    """The schema of a sweep YAML (unknown keys are refused)."""

    recipe: str = "???"  # base recipe: a path, or a packaged recipe's name
    overrides: list[str] = field(default_factory=list)  # key=value for every trial
    metric: str = "???"  # e.g. eval/zero_shot_seg/miou, loss/contrastive_syn
    mode: str = "???"  # max | min
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {sampler: args}
    num_samples: int = 1  # samples of the space (grids are crossed, then repeated)
    seed: int | None = 0  # search seed (None: unseeded)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    trial: TrialSpec = field(default_factory=TrialSpec)
    max_concurrent_trials: int = 0  # 0 = derived from cluster resources per trial
    name: str = "sweep"  # stable: `resume=true` continues the sweep with this name
    storage_uri: str = "runs/sweeps"  # local directory or s3://bucket/prefix


@dataclass(frozen=True)
class Sweep:
    """A validated sweep, ready to build a Tuner from."""

    source: str  # the sweep file
    spec: SweepFile
    base: Any  # TipsConfig: recipe + sweep overrides (+ command-line overrides)
    space: dict[str, Sampler]

    @property
    def uri(self) -> str:
        """The sweep's directory: ``storage_uri/name``."""
        return f"{self.spec.storage_uri.rstrip('/')}/{self.spec.name}"

    def param_space(self) -> dict[str, Any]:
        return {"overrides": {k: s.domain() for k, s in self.space.items()}}

    def mutations(self) -> dict[str, Any]:
        return {"overrides": {k: s.mutation() for k, s in self.space.items()}}

    def max_t(self) -> int:
        return int(self.spec.scheduler.max_t or self.base.train.total_steps)


# --------------------------------------------------------------------------- loading


def _flatten_space(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested or dotted space mappings -> {dotted key: {sampler: args}}."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SAMPLERS:
            out[dotted] = value
        elif isinstance(value, dict) and value:
            out.update(_flatten_space(value, dotted + "."))
        else:
            raise SweepError(
                f"space.{dotted}: expected {{sampler: args}} with sampler one of "
                f"{list(SAMPLERS)}, got {value!r}"
            )
    return out


def _sampler(key: str, entry: dict[str, Any]) -> Sampler:
    kind, args = next(iter(entry.items()))
    where = f"space.{key}.{kind}"
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SweepError(f"{where}: needs a non-empty list of values, got {args!r}")
        return Sampler(kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise SweepError(f"{where}: needs [low, high], got {args!r}")
    lo, hi = args
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)):
        raise SweepError(f"{where}: bounds must be numbers, got {args!r}")
    if not lo < hi:
        raise SweepError(f"{where}: needs low < high, got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise SweepError(f"{where}: loguniform needs low > 0, got {args!r}")
    if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise SweepError(f"{where}: randint needs integer bounds, got {args!r}")
    if kind == "randint":
        return Sampler(kind, (int(lo), int(hi)))
    return Sampler(kind, (float(lo), float(hi)))


def _read(path: Path, overrides: list[str]) -> SweepFile:
    if not path.is_file():
        from orchestrator.recipes import list_sweeps

        names = ", ".join(n for n, _ in list_sweeps())
        raise SweepError(f"sweep file not found: {path} (packaged sweeps: {names})")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors: name the file
        raise SweepError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, DictConfig):
        raise SweepError(f"{path}: a sweep file must be a mapping")
    schema = OmegaConf.structured(SweepFile)
    for layer, source in ((raw, str(path)), (OmegaConf.from_dotlist(overrides), "overrides")):
        try:
            schema = OmegaConf.merge(schema, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise SweepError(f"{source}: key '{key}': {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(schema))
    if missing:
        raise SweepError(f"{path}: required keys have no value: {', '.join(missing)}")
    spec = OmegaConf.to_object(schema)
    space = OmegaConf.to_container(schema.space) if isinstance(schema.space, DictConfig) else {}
    return dataclasses.replace(spec, space=space)


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line ``k=v`` -> (sweep-file overrides, base-recipe overrides).

    A key whose first part is a sweep-file field (``num_samples``, ``scheduler.grace_period``,
    ``name`` ...) sets the sweep; anything else (``train.total_steps`` ...) is added to the
    base recipe's overrides.
    """
    fields = {f.name for f in dataclasses.fields(SweepFile)}
    sweep, recipe = [], []
    for arg in args:
        key = arg.split("=", 1)[0]
        (sweep if key.split(".", 1)[0] in fields else recipe).append(arg)
    return sweep, recipe


def load_sweep(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    recipe_overrides: list[str] | tuple[str, ...] = (),
    resolve_recipe: Any = None,
) -> Sweep:
    """Read, merge and validate a sweep file; nothing touches Ray.

    Args:
        path: the sweep YAML.
        overrides: ``k=v`` for sweep-file fields (``num_samples=8``).
        recipe_overrides: ``k=v`` added after the file's own ``overrides`` for every trial.
        resolve_recipe: ``name -> Path`` (the CLI's recipe lookup); default: relative to the
            sweep file, then as given.

    Raises:
        SweepError: a bad sweep field, sampler, metric or scheduler setting.
        ConfigError: the base recipe (with the sweep's overrides) is invalid.
    """
    path = Path(path).expanduser().resolve()
    bad = [o for o in (*overrides, *recipe_overrides) if "=" not in o]
    if bad:
        raise SweepError(f"overrides must be key=value, got: {bad}")
    spec = _read(path, list(overrides))
    recipe = _recipe_path(spec.recipe, path, resolve_recipe)
    try:
        base = config_lib.load(recipe, [*spec.overrides, *recipe_overrides])
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"{path}: base recipe {recipe}: {e}") from None
    flat = _flatten_space(spec.space)
    space = {k: _sampler(k, v) for k, v in flat.items()}
    sweep = Sweep(source=str(path), spec=spec, base=base, space=space)
    check(sweep)
    return sweep


def _recipe_path(recipe: str, sweep_path: Path, resolve_recipe: Any) -> Path:
    candidates = [sweep_path.parent / recipe, sweep_path.parent.parent / recipe]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if resolve_recipe is not None:
        return Path(resolve_recipe(recipe))
    return Path(recipe).expanduser().resolve()


# --------------------------------------------------------------------------- validation


def _need(ok: bool, source: str, msg: str) -> None:
    if not ok:
        raise SweepError(f"{source}: {msg}")


def check(sweep: Sweep) -> None:
    """Every rule a sweep must meet before its first trial (raises SweepError)."""
    s, src, base = sweep.spec, sweep.source, sweep.base
    _need(s.mode in ("max", "min"), src, f"mode={s.mode!r}: must be max or min")
    _need(s.num_samples >= 1, src, "num_samples must be >= 1")
    _need(s.max_concurrent_trials >= 0, src, "max_concurrent_trials must be >= 0 (0 = derive)")
    _need(bool(s.name) and "/" not in s.name, src, f"name={s.name!r}: non-empty, no '/'")
    _need(bool(sweep.space), src, "space is empty: nothing to sweep")
    for key, sampler in sweep.space.items():
        for value in sampler.probe_values():
            try:
                config_lib.with_overrides(base, {key: _plain(value)})
            except (config_lib.ConfigError, ValueError) as e:
                raise SweepError(f"{src}: space.{key}={value!r} is refused: {e}") from None
    _check_metric(sweep)
    _check_scheduler(sweep)
    res = s.trial.driver_resources
    _need(
        all(isinstance(v, int | float) and v >= 0 for v in res.values()),
        src,
        f"trial.driver_resources={dict(res)}: amounts must be numbers >= 0",
    )


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value)
    return value


def _check_metric(sweep: Sweep) -> None:
    s, src, t = sweep.spec, sweep.source, sweep.base.train
    _need(
        s.metric.startswith(METRIC_PREFIXES),
        src,
        f"metric={s.metric!r}: trials report keys starting with {list(METRIC_PREFIXES)}",
    )
    if s.metric.startswith("loss/"):
        terms = ("total", *sweep.base.objective.loss_terms())
        _need(
            s.metric[5:] in terms,
            src,
            f"metric={s.metric!r}: objective {sweep.base.objective.name} reports "
            f"{[f'loss/{t}' for t in terms]}",
        )
    if s.metric.startswith("eval/"):
        parts = s.metric.split("/")
        _need(len(parts) == 3, src, f"metric={s.metric!r}: eval metrics are eval/<task>/<name>")
        _need(
            t.eval_every_steps > 0,
            src,
            f"metric={s.metric!r} needs periodic evaluation: set train.eval_every_steps > 0",
        )
        _need(
            parts[1] in t.eval_tasks,
            src,
            f"metric={s.metric!r}: task {parts[1]!r} is not in train.eval_tasks="
            f"{list(t.eval_tasks)}",
        )
        from orchestrator.eval.tasks import get_task

        known = [f"eval/{parts[1]}/{n}" for n in get_task(parts[1]).METRICS]
        _need(s.metric in known, src, f"metric={s.metric!r}: task {parts[1]} reports {known}")


def first_metric_step(sweep: Sweep) -> int:
    """The first step at which every trial has reported the metric."""
    t = sweep.base.train
    if sweep.spec.metric.startswith("eval/"):
        return min(t.eval_every_steps, t.total_steps)
    return min(t.log_every_steps, t.total_steps)


def _check_scheduler(sweep: Sweep) -> None:
    sc, src, t = sweep.spec.scheduler, sweep.source, sweep.base.train
    _need(sc.name in SCHEDULERS, src, f"scheduler.name={sc.name!r}: one of {list(SCHEDULERS)}")
    first = first_metric_step(sweep)
    if sc.name == "asha":
        _need(sc.reduction_factor > 1, src, "scheduler.reduction_factor must be > 1")
        _need(
            sc.grace_period >= first,
            src,
            f"scheduler.grace_period={sc.grace_period} is before step {first}, the first report "
            f"of {sweep.spec.metric}",
        )
        _need(
            sweep.max_t() >= sc.grace_period,
            src,
            f"scheduler.max_t={sweep.max_t()} must be >= grace_period={sc.grace_period}",
        )
    if sc.name == "pbt":
        p = sc.perturbation_interval
        _need(p >= first, src, f"scheduler.perturbation_interval={p} must be >= {first}")
        _need(
            t.checkpoint_every_steps <= p,
            src,
            f"train.checkpoint_every_steps={t.checkpoint_every_steps} must be <= "
            f"scheduler.perturbation_interval={p}: PBT exploits checkpoints",
        )
        _need(0 < sc.quantile_fraction <= 0.5, src, "scheduler.quantile_fraction in (0, 0.5]")
        # A grid gives PBT its starting points; explore then moves along the listed values.


def max_concurrent(sweep: Sweep, cluster: dict[str, float]) -> int:
    """Trials that fit at once: cluster resources / what one trial holds at its largest.

    A trial holds its driver's resources, ``scaling.max_workers`` workers' resources (and a
    GPU each with ``use_gpu``) and at least one Ray Data map task. An explicit
    ``max_concurrent_trials`` wins.
    """
    if sweep.spec.max_concurrent_trials > 0:
        return sweep.spec.max_concurrent_trials
    need: dict[str, float] = {}

    def add(res: dict[str, float], times: float = 1.0) -> None:
        for k, v in res.items():
            need[k] = need.get(k, 0.0) + float(v) * times

    b = sweep.base
    workers = max(1, b.scaling.max_workers)
    add(dict(sweep.spec.trial.driver_resources))
    add(dict(b.scaling.resources_per_worker), workers)
    if b.scaling.use_gpu and "GPU" not in b.scaling.resources_per_worker:
        add({"GPU": 1.0}, workers)
    add({"CPU": b.data.num_cpus_per_map_task, **dict(b.data.resources_per_map_task)})
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min(fits) if fits else 1)
