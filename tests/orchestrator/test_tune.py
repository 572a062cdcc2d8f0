"""`tips tune`: sweep files, validation before any trial, and real sweeps on a local Ray.

Fast tests check the sweep schema and its translation to Ray Tune without starting Ray.
The ``slow`` ones run real sweeps of the tiny recipe (each trial a full Ray Train run fed by
the Ray Data pipeline) on ``ray.init(num_cpus=2)`` with the dashboard on, because Train's
placement-group cleanup after an early stop needs the State API
(docs/ray.md, "Early stopping needs the dashboard").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator import config as config_lib
from orchestrator.cli.tune import main as main_tune
from orchestrator.recipes import RECIPES_DIR, SWEEPS_DIR
from orchestrator.tune import driver, report
from orchestrator.tune.spec import Sampler, SweepError, load_sweep, max_concurrent, split_overrides

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = SWEEPS_DIR
FILL = ["data.train_uri=/tmp/shards"]


def _write_sweep(tmp_path: Path, body: str, name: str = "s.yaml") -> Path:
    """Write a sweep file; later top-level keys in ``body`` replace earlier ones."""
    import yaml

    merged: dict = {}
    for chunk in body.split("\n\n"):
        if chunk.strip():
            merged.update(yaml.safe_load(chunk) or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


BASE_SWEEP = f"""
recipe: {RECIPES_DIR / "tiny_cpu.yaml"}
overrides: [train.total_steps=30, train.log_every_steps=10, train.checkpoint_every_steps=10]
metric: loss/total
mode: min
space:
  objective.alpha: {{loguniform: [0.25, 4.0]}}
num_samples: 2
"""


# --------------------------------------------------------------------------- the sweep files


def test_every_shipped_sweep_validates_and_the_count_matches_disk():
    files = sorted(SWEEPS.rglob("*.yaml"))
    assert {p.name for p in files} == {
        "caption_ratios.yaml",
        "ema_schedules.yaml",
        "loss_weights.yaml",
        "pbt_schedules.yaml",
    }
    for path in files:
        sweep = load_sweep(path, [], FILL)
        assert sweep.space, path
        assert sweep.spec.name == path.stem  # results land under a stable, predictable name
        assert "tips tune sweep=" in path.read_text(), f"{path.name}: header shows the command"
    ema = load_sweep(SWEEPS / "ema_schedules.yaml", [], FILL)
    assert ema.space["objective.teacher"] == Sampler("choice", ("full_ema", "head_ema"))
    weights = load_sweep(SWEEPS / "loss_weights.yaml", [], FILL)
    assert set(weights.space) == {"objective.alpha", "objective.beta"}
    assert weights.spec.scheduler.name == "asha"


def test_overrides_split_between_sweep_and_recipe(tmp_path):
    sweep_args, recipe_args = split_overrides(
        ["num_samples=8", "scheduler.grace_period=10", "train.total_steps=50", "name=x"]
    )
    assert sweep_args == ["num_samples=8", "scheduler.grace_period=10", "name=x"]
    assert recipe_args == ["train.total_steps=50"]
    path = _write_sweep(tmp_path, BASE_SWEEP)
    sweep = load_sweep(path, ["num_samples=5"], [*FILL, "train.total_steps=40"])
    assert sweep.spec.num_samples == 5
    assert sweep.base.train.total_steps == 40  # the command line comes after the file


# --------------------------------------------------------------------------- refused early


@pytest.mark.parametrize(
    "edit, message",
    [
        ("space: {objective.gamma: {uniform: [0.0, 1.0]}}", "objective.gamma"),
        ("space: {optim.lr: {uniform: [1.0, 0.5]}}", "low < high"),
        ("space: {optim.lr: {normal: [0.0, 1.0]}}", "sampler one of"),
        ("space: {optim.name: {choice: [adamw, lamb]}}", "optim.name"),
        ("space: {augment.global_crop_size: {choice: [32, 30]}}", "augment.global_crop_size"),
        ("metric: accuracy", "metric='accuracy'"),
        ("metric: eval/depth/rmse", "train.eval_tasks"),
        ("metric: loss/contrastive", "reports ['loss/total', 'loss/contrastive_alt'"),
        ("metric: loss/region_contrastive", "objective tips reports"),
        ("metric: eval/retrieval/t2i_r50", "task retrieval reports ['eval/retrieval/i2t_r1'"),
        ("mode: maximize", "mode='maximize'"),
        ("scheduler: {name: hyperband}", "scheduler.name"),
        ("scheduler: {name: asha, grace_period: 5}", "grace_period=5"),
        ("scheduler: {name: pbt, perturbation_interval: 5}", "perturbation_interval=5"),
        ("trials_per_node: 3", "trials_per_node"),
    ],
)
def test_bad_sweeps_are_refused_with_the_key_and_the_file(tmp_path, edit, message):
    path = _write_sweep(tmp_path, BASE_SWEEP + "\n\n" + edit + "\n")
    with pytest.raises((SweepError, config_lib.ConfigError)) as err:
        load_sweep(path, [], FILL)
    assert message in str(err.value)
    assert str(path) in str(err.value) or "space." in str(err.value) or "key" in str(err.value)


def test_pbt_refuses_sparse_checkpoints_and_bad_quantiles(tmp_path):
    path = _write_sweep(
        tmp_path, BASE_SWEEP + "\n\nscheduler: {name: pbt, perturbation_interval: 10}"
    )
    with pytest.raises(SweepError, match="checkpoint_every_steps=20"):
        load_sweep(path, [], [*FILL, "train.checkpoint_every_steps=20"])
    with pytest.raises(SweepError, match="quantile_fraction"):
        load_sweep(path, ["scheduler.quantile_fraction=0.75"], FILL)
    grid = BASE_SWEEP.replace("{loguniform: [0.25, 4.0]}", "{grid: [0.5, 1.0]}")
    path = _write_sweep(tmp_path, grid + "\n\nscheduler: {name: pbt, perturbation_interval: 10}")
    assert load_sweep(path, [], FILL).mutations() == {"overrides": {"objective.alpha": [0.5, 1.0]}}


def test_cli_refuses_an_unknown_key_before_ray_starts(tmp_path, capsys):
    import ray

    storage = tmp_path / "sweeps"
    path = _write_sweep(
        tmp_path,
        BASE_SWEEP + f"\n\nstorage_uri: {storage}\nspace: {{objective.nope: {{choice: [1]}}}}",
    )
    assert main_tune([f"sweep={path}", *FILL]) == 2
    err = capsys.readouterr().err
    assert "objective.nope" in err and str(path) in err
    assert not ray.is_initialized() and not storage.exists()  # no trial, no sweep directory
    assert main_tune([f"sweep={path}", *FILL, "no_equals_sign"]) == 2


def test_dry_run_prints_the_space_and_the_base_recipe(tmp_path, capsys):
    path = _write_sweep(tmp_path, BASE_SWEEP)
    assert main_tune([f"sweep={path}", *FILL, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "objective.alpha: loguniform [0.25, 4.0]" in out
    assert "total_steps: 30" in out


# --------------------------------------------------------------------------- translation


def test_samplers_become_tune_domains_and_pbt_mutations():
    from ray.tune.search.sample import Categorical, Float, Integer

    assert isinstance(Sampler("choice", (1, 2)).domain(), Categorical)
    assert Sampler("grid", (1, 2)).domain() == {"grid_search": [1, 2]}
    log = Sampler("loguniform", (0.1, 10.0)).domain()
    assert isinstance(log, Float) and (log.lower, log.upper) == (0.1, 10.0)
    assert isinstance(Sampler("randint", (1, 5)).domain(), Integer)
    assert Sampler("choice", ("a", "b")).mutation() == ["a", "b"]
    assert Sampler("randint", (1, 5)).probe_values() == [1, 4]  # upper bound exclusive


def test_concurrency_is_derived_from_cluster_resources(tmp_path):
    path = _write_sweep(tmp_path, BASE_SWEEP)
    # 1 worker at 0.5 CPU + driver 0.25 + one map task at 0.25 = 1 CPU per trial
    sweep = load_sweep(
        path,
        [],
        [*FILL, "scaling.resources_per_worker={CPU: 0.5}", "data.num_cpus_per_map_task=0.25"],
    )
    assert max_concurrent(sweep, {"CPU": 2.0}) == 2
    assert max_concurrent(sweep, {"CPU": 16.0}) == 16
    gpu = load_sweep(
        path,
        [],
        [*FILL, "scaling.use_gpu=true", "scaling.min_workers=1", "scaling.max_workers=4"],
    )
    # 4 GPUs per trial at its largest: an 8-GPU node fits 2, whatever its CPUs
    assert max_concurrent(gpu, {"CPU": 96.0, "GPU": 8.0}) == 2
    fixed = load_sweep(path, ["max_concurrent_trials=3"], FILL)
    assert max_concurrent(fixed, {"CPU": 64.0}) == 3


def test_trial_config_and_incarnation_names():
    base = config_lib.to_dict(config_lib.load(RECIPES_DIR / "tiny_cpu.yaml", FILL))
    import numpy as np

    cfg = driver.trial_config(base, {"objective.alpha": np.float64(0.5), "optim.lr": 2e-3})
    assert cfg.objective.alpha == 0.5 and cfg.optim.lr == 2e-3
    assert driver.incarnation_name("abc_00001", None) == "trial-abc_00001"
    a = driver.incarnation_name("abc_00001", "/s/train/trial-abc_00000/checkpoint_00000020")
    b = driver.incarnation_name("abc_00001", "/s/train/trial-abc_00000/checkpoint_00000040")
    assert a.startswith("trial-abc_00001-") and a != b


def test_resume_clears_the_repeating_errors_so_fixed_trials_train_again(tmp_path):
    from orchestrator.tune.tuner import clear_fatal

    sweep = load_sweep(_write_sweep(tmp_path, BASE_SWEEP + f"storage_uri: {tmp_path}\n"), [], FILL)
    assert clear_fatal(sweep) == []  # no folder: nothing to clear
    fatal = Path(sweep.uri) / driver.FATAL_DIR
    fatal.mkdir(parents=True)
    for trial_id in ("t_00001", "t_00000"):
        (fatal / f"{trial_id}.txt").write_text("NonFiniteLossError: 2 steps in a row")
    assert clear_fatal(sweep) == ["t_00000", "t_00001"]
    assert not fatal.exists() and Path(sweep.uri).is_dir()
    assert clear_fatal(sweep) == []


def test_best_recipe_loads_as_a_recipe(tmp_path):
    path = _write_sweep(tmp_path, BASE_SWEEP)
    sweep = load_sweep(path, [], FILL)
    rows = [
        {"trial": "trial-a", "metric_last": 1.5, "_overrides": {"objective.alpha": 0.7}},
        {"trial": "trial-b", "metric_last": 2.5, "_overrides": {"objective.alpha": 3.0}},
    ]
    text = report.best_recipe_yaml(rows, sweep)
    out = tmp_path / "best_recipe.yaml"
    out.write_text(text)
    cfg = config_lib.load(out, [])
    assert cfg.objective.alpha == 0.7 and cfg.train.total_steps == 30
    assert text.startswith("# Best trial of sweep")


# --------------------------------------------------------------------------- real sweeps


@pytest.fixture(scope="module")
def tune_runtime(s3_endpoint: str):
    """Ray with the dashboard (State API) on: Train's PG cleanup after early stops needs it."""
    import ray
    import ray.data

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, object_store_memory=300 * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def sweep_file(tmp_path: Path, synth: Path, body: str) -> Path:
    common = f"""
recipe: {RECIPES_DIR / "tiny_cpu.yaml"}
storage_uri: {tmp_path / "sweeps"}
overrides:
  - data.train_uri={synth / "train"}
  - data.eval_uri={synth / "eval"}
  - augment.num_local_crops=2
  - train.global_batch_size=8
  - train.batch_size_per_worker=8
  - train.log_every_steps=5
  - train.checkpoint_every_steps=5
  - train.eval_every_steps=0
  - optim.warmup_steps=2
  - teacher.temp_warmup_steps=2
  - "scaling.resources_per_worker={{CPU: 0.5}}"
  - data.num_cpus_per_map_task=0.25
  - data.map_batch_size=8
  - run.tensorboard=false
trial: {{driver_resources: {{CPU: 0.25}}, max_failures: 0}}
"""
    return _write_sweep(tmp_path, common + body)


@pytest.mark.slow
def test_asha_stops_the_worst_trial_and_writes_the_outputs(tune_runtime, synth_data, tmp_path):
    from orchestrator.tune.tuner import run_sweep

    # Trials run one at a time in grid order, so the rung comparisons are deterministic:
    # the third trial (lr 1e-6: nothing learns) is below both others at step 10 and stops.
    path = sweep_file(
        tmp_path,
        synth_data,
        """
name: asha
metric: loss/contrastive_syn
mode: min
space:
  optim.lr: {grid: [3.0e-3, 1.0e-3, 1.0e-6]}
scheduler: {name: asha, grace_period: 10, reduction_factor: 2, max_t: 20}
max_concurrent_trials: 1
""",
    )
    sweep = load_sweep(path, [], ["train.total_steps=20"])
    grid = run_sweep(sweep)
    assert not grid.errors
    rows = report.collect(grid, sweep)
    assert len(rows) == 3
    by_lr = {r["optim.lr"]: r for r in rows}
    assert by_lr[1e-6]["stopped_early"] and by_lr[1e-6]["steps"] == 10
    assert not by_lr[3e-3]["stopped_early"] and by_lr[3e-3]["steps"] == 20
    # finished trials by metric, early-stopped ones after (whether the 1e-3 trial survives
    # its rung depends on the recipe's learning curve, so the order is checked by group)
    stopped = [r["stopped_early"] for r in rows]
    assert stopped == sorted(stopped) and not stopped[0] and stopped[-1]
    finished = [r["metric_last"] for r in rows if not r["stopped_early"]]
    assert finished == sorted(finished)

    outputs = report.write(grid, sweep)
    sweep_dir = tmp_path / "sweeps" / "asha"
    csv_lines = (sweep_dir / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("trial,optim.lr,metric_last") and len(csv_lines) == 4
    assert "| trial | optim.lr |" in (sweep_dir / "results.md").read_text()
    for png in ("plot_params.png", "plot_curves.png"):
        assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = config_lib.load(sweep_dir / "best_recipe.yaml", [])
    assert best.optim.lr == rows[0]["optim.lr"]
    assert set(outputs) == {"csv", "markdown", "best_recipe", "plot_params", "plot_curves"}
    (sweep_dir / "results.csv").unlink()
    assert main_tune([f"sweep={path}", "train.total_steps=20", "--report"]) == 0  # no trial runs
    assert (sweep_dir / "results.csv").read_text().splitlines() == csv_lines
    # each trial is a real Train run with its own checkpoints under the sweep
    for r in rows:
        run = sweep_dir / "train" / r["trial"]
        assert (run / f"checkpoint_{r['steps']:08d}" / "model.pt").is_file()


@pytest.mark.slow
def test_pbt_exploits_a_better_trials_checkpoint(tune_runtime, synth_data, tmp_path):
    from orchestrator.tune.tuner import run_sweep

    # Two trials, one with a useless learning rate: at step 10 the worse one (bottom half)
    # must restart from the better one's step-10 checkpoint with perturbed values.
    path = sweep_file(
        tmp_path,
        synth_data,
        """
name: pbt
metric: loss/contrastive_syn
mode: min
space:
  optim.lr: {grid: [1.0e-6, 3.0e-3]}
scheduler: {name: pbt, perturbation_interval: 10, quantile_fraction: 0.5,
            resample_probability: 0.0}
max_concurrent_trials: 2
""",
    )
    sweep = load_sweep(path, [], ["train.total_steps=30"])
    grid = run_sweep(sweep)
    assert not grid.errors
    starts = {}
    for trial_dir in (tmp_path / "sweeps" / "pbt").glob("trial-*"):
        lines = (trial_dir / driver.INCARNATIONS_FILE).read_text().splitlines()
        starts[trial_dir.name] = [json.loads(line) for line in lines]
    assert len(starts) == 2
    exploited = 0
    for trial, records in starts.items():
        assert records[0]["resume_from"] is None  # every trial starts fresh
        for record in records[1:]:
            # later starts: an exploit (another trial's checkpoint) or Tune resuming a
            # paused trial from its own latest one; both are fresh Train runs
            donor = record["resume_from"]
            assert donor and "/checkpoint_000000" in donor, records
            assert Path(donor, "model.pt").is_file()  # kept: PBT may point at any of them
            assert record["train_run"] != trial
            exploited += not Path(donor).parent.name.startswith(trial)
    assert exploited >= 1, f"no trial exploited another's checkpoint: {starts}"


def test_expected_trials_counts_grids_times_samples(tmp_path):
    from orchestrator.tune.tuner import expected_trials

    grid = BASE_SWEEP.replace("{loguniform: [0.25, 4.0]}", "{grid: [0.5, 1.0, 2.0]}")
    path = _write_sweep(tmp_path, grid + "\n\nnum_samples: 2")
    assert expected_trials(load_sweep(path, [], FILL)) == 6
    assert expected_trials(load_sweep(_write_sweep(tmp_path, BASE_SWEEP), [], FILL)) == 2


@pytest.mark.slow
def test_a_trial_that_fails_the_same_way_every_time_is_an_error_with_its_cause(
    tune_runtime, synth_data, tmp_path, capsys
):
    """Workers that stop at a deterministic failure (here the non-finite-loss limit) raise
    nothing to Ray Train; the trial must still fail, and `tips tune` name its root cause.
    Tune retries it (trial.max_failures=1) without training again: one Train run only."""
    path = sweep_file(
        tmp_path,
        synth_data,
        """
name: fails
metric: loss/total
mode: min
space:
  model.temperature_init: {grid: [0.07, 1.0e-45]}
max_concurrent_trials: 1
""",
    )
    args = [f"sweep={path}", "train.total_steps=10", "train.max_nonfinite_steps=2"]
    args.append("trial.max_failures=1")
    assert main_tune(args) == 1
    err = capsys.readouterr().err
    failed = [x for x in err.splitlines() if " failed: " in x and x.startswith("tips tune: trial-")]
    assert len(failed) == 1, err[-3000:]
    assert "(not trained again: the error repeats" in failed[0], failed[0]
    fatal = list((tmp_path / "sweeps" / "fails" / driver.FATAL_DIR).iterdir())
    assert len(fatal) == 1 and fatal[0].stem in failed[0]
    runs = sorted(p.name for p in (tmp_path / "sweeps" / "fails" / "train").iterdir())
    assert runs == sorted(f"trial-{t}" for t in _trial_ids(tmp_path / "sweeps" / "fails")), runs
    # Found on the device and read at the next log step (orchestrator/train/guard.py): at
    # least the limit's 2 steps in a row, up to a log interval more.
    found = re.search(
        r"NonFiniteLossError: (\d+) steps in a row had a non-finite loss "
        r"\(train\.max_nonfinite_steps=2\)",
        failed[0],
    )
    assert found and int(found.group(1)) >= 2, failed[0]
    assert "tips tune: 1 of 2 trial(s) failed" in err


def _trial_ids(sweep_dir: Path) -> list[str]:
    """The ids of a sweep's trials, from Tune's trial directories (``trial-<id>``)."""
    return [p.name.removeprefix("trial-") for p in sweep_dir.glob("trial-*") if p.is_dir()]
