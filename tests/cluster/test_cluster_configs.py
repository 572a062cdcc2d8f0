"""Every cluster file loads and is what Ray's cluster launcher and KubeRay expect, names real
recipes with valid overrides, and has the capacity its recipes' scaling.min/max_workers need.

Capacity rule (docs/clusters.md, "Sizing"): workers that fit one node = the smallest
node_resource // per_worker_resource over the recipe's resources_per_worker (TPU node types
multiply by their hosts per slice); the non-spot floor (min_workers of on-demand node types)
must hold scaling.min_workers, and all node types at max_workers must hold max_workers.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from orchestrator.config import load
from orchestrator.recipes import find_recipe

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = sorted((ROOT / "cluster/kuberay").glob("*.yaml"))
FILL = {"data.train_uri": "s3://bucket/shards", "model.tokenizer_path": "/tmp/tokenizer.model"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Custom resources that docs/clusters.md tells jobs to request, per launcher file.
RESOURCES_USED = {"aws-spot.yaml": {"data_node", "train_driver"}, "gcp-tpu.yaml": {"train_driver"}}


def _yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path}: not a mapping"
    return doc


def _load_recipe(recipe: str, overrides: list[str] = ()) -> Any:
    given = {o.split("=", 1)[0] for o in overrides}
    fill = [f"{k}={v}" for k, v in FILL.items() if k not in given]
    return load(find_recipe(recipe), [*overrides, *fill])


def _fits(node_resources: dict[str, float], per_worker: dict[str, float]) -> int:
    """Workers of ``per_worker`` that fit in ``node_resources``."""
    need = {k: v for k, v in per_worker.items() if v > 0}
    return int(min(node_resources.get(k, 0) // v for k, v in need.items())) if need else 0


def _commands(path: Path) -> list[list[str]]:
    """``python -m orchestrator train ...`` commands in a file, comments included, with
    shell line continuations joined."""
    text = re.sub(r"\\\n\s*#?", " ", path.read_text())
    text = re.sub(r"\n\s*(?=[a-z]+\.[a-z_]+=)", " ", text)  # YAML folded entrypoint lines
    found = []
    for match in re.finditer(r"python -m orchestrator train ([^\n]*)", text):
        found.append(shlex.split(match.group(1).split(";")[0]))
    return found


def _check_command(path: Path, args: list[str]) -> Any:
    recipes = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
    assert len(recipes) == 1, f"{path}: command without one recipe=: {args}"
    assert find_recipe(recipes[0]).is_file(), f"{path}: names missing recipe {recipes[0]}"
    overrides = [a for a in args if "=" in a and not a.startswith("recipe=")]
    cfg = _load_recipe(recipes[0], overrides)  # unknown keys / bad values fail here
    assert cfg.run.storage_uri.startswith("s3://"), f"{path}: multi-node runs need s3:// storage"
    return cfg


# ------------------------------------------------------------------ cluster launcher


def test_launcher_files_on_disk_are_the_ones_tested():
    assert {p.name for p in LAUNCHER} == {"aws-spot.yaml", "gcp-tpu.yaml"}
    assert {p.name for p in KUBERAY} == {"ray-cluster.tips.yaml", "ray-job.tips-b14.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_file_passes_rays_schema_and_launcher_checks(path):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler.sdk import fillout_defaults

    config = _yaml(path)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # What `ray up` checks before touching the cloud, through the public SDK: the file merged
    # with its provider's defaults still passes the schema, and the node types are consistent.
    filled = fillout_defaults(config)
    jsonschema.validate(filled, schema)
    assert "cluster_synced_files" in filled, "defaults from another Ray version"
    assert filled["head_node_type"] in filled["available_node_types"]
    assert filled["max_workers"] >= sum(
        t.get("min_workers", 0) for t in filled["available_node_types"].values()
    )
    types = config["available_node_types"]
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no training or data work on the head"
    used = {k for t in types.values() for k in t["resources"]}
    assert RESOURCES_USED[path.name] <= used, f"{path}: node types lack {RESOURCES_USED[path.name]}"


def _market(node_type: dict[str, Any]) -> str:
    options = node_type["node_config"].get("InstanceMarketOptions", {})
    scheduling = node_type["node_config"].get("schedulingConfig", {})
    spot = (
        options.get("MarketType") == "spot"
        or scheduling.get("spot")
        or scheduling.get("preemptible")
    )
    return "spot" if spot else "on-demand"


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_recipes_fit_the_node_types(path):
    config = _yaml(path)
    types = config["available_node_types"]
    meta = config.get("metadata", {})
    head = config["head_node_type"]
    assert _market(types[head]) == "on-demand", "drivers and Train controllers must not be spot"
    for name, t in types.items():
        label = t.get("labels", {}).get("tips.io/market")
        assert label in (None, _market(t)), f"{path}: {name} labelled {label}, is {_market(t)}"
    assert meta.get("tips_recipes"), f"{path}: metadata.tips_recipes names the sized recipes"
    for recipe in meta["tips_recipes"]:
        s = _load_recipe(recipe).scaling
        per = dict(s.resources_per_worker)
        hosts = meta.get("tpu_hosts_per_slice", 1)
        fits = {
            n: _fits(t["resources"], per) * (hosts if "TPU" in t["resources"] else 1)
            for n, t in types.items()
            if n != head
        }
        safe = [n for n in fits if _market(types[n]) == "on-demand"]
        floor = sum(types[n].get("min_workers", 0) * fits[n] for n in safe)
        total = sum(types[n].get("max_workers", 0) * k for n, k in fits.items())
        assert floor >= s.min_workers, f"{path}: on-demand floor {floor} < {recipe} min_workers"
        assert total >= s.max_workers, f"{path}: capacity {total} < {recipe} max_workers"


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_setup_installs_the_project_and_the_spot_watcher(path):
    config = _yaml(path)
    setup = " ".join(config["setup_commands"])
    for requirements in re.findall(r"(requirements[-\w]*\.txt)", setup):
        assert (ROOT / requirements).is_file(), f"{path}: installs missing {requirements}"
    assert "pip install -q --no-deps -e ~/tips-orchestrator" in setup
    assert config["file_mounts"]["~/tips-orchestrator"] == "."
    workers = " ".join(config["worker_start_ray_commands"])
    spot = any(_market(t) == "spot" for t in config["available_node_types"].values())
    if spot:
        assert "-m orchestrator.cluster.spot_watcher --address=$RAY_HEAD_IP:6379" in workers
        help_text = _spot_watcher_help()
        assert "--address" in help_text and "--imds-endpoint" in help_text


def _spot_watcher_help() -> str:
    from orchestrator.cluster import spot_watcher

    return spot_watcher.build_parser().format_help()


# ------------------------------------------------------------------ KubeRay


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _start_resources(params: dict[str, str]) -> dict[str, float]:
    raw = params.get("resources")
    return json.loads(raw.strip("'").strip('"').replace('\\"', '"')) if raw else {}


def _group_capacity(group: dict[str, Any]) -> dict[str, float]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = float(str(limits.get("cpu", "0")).rstrip("m") or 0)
    out = {"CPU": cpu, "GPU": float(limits.get("nvidia.com/gpu", 0))}
    return out | _start_resources(group.get("rayStartParams", {}))


def _group_market(group: dict[str, Any]) -> str:
    env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
    selector = group["template"]["spec"].get("nodeSelector", {})
    market = env.get("RAY_NODE_MARKET_TYPE")
    assert selector.get("karpenter.sh/capacity-type") == market, group.get("groupName", "head")
    return market


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_the_v1_required_fields(path):
    doc = _yaml(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob")
    assert DNS_1123.match(doc["metadata"]["name"]), "metadata.name must be a DNS-1123 label"
    stem = path.name.removesuffix(".yaml")
    prefix = {"RayCluster": "ray-cluster.", "RayJob": "ray-job."}[doc["kind"]]
    assert stem.startswith(prefix), f"{path.name}: KubeRay files are {prefix}<name>.yaml"
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert _group_market(head) == "on-demand"
    containers = head["template"]["spec"]["containers"]
    assert containers[0]["name"] and containers[0]["image"]
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)) and all(DNS_1123.match(n) for n in names)
    resources = set(_start_resources(head["rayStartParams"]))
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert g["template"]["spec"]["containers"][0]["image"]
        _group_market(g)
        resources |= set(_start_resources(g["rayStartParams"]))
    assert "data_node" in resources, "a CPU-only data group advertises data_node"


def _kuberay_recipes(doc: dict[str, Any], path: Path) -> list[tuple[str, Any]]:
    if doc["kind"] == "RayJob":
        commands = _commands(path)
        entry = shlex.split(doc["spec"]["entrypoint"])
        assert entry[:4] == ["python", "-m", "orchestrator", "train"], "entrypoint: tips train"
        cfg = _check_command(path, entry[4:])
        recipe = next(a.split("=", 1)[1] for a in entry if a.startswith("recipe="))
        stem = Path(recipe).stem.replace("_", "-")
        assert path.name == f"ray-job.{stem}.yaml", "KubeRay job files are ray-job.<recipe>.yaml"
        assert commands, f"{path}: no tips train command found"
        return [(recipe, cfg)]
    recipes = doc["metadata"]["annotations"]["tips.io/recipes"].split(",")
    return [(r, _load_recipe(r)) for r in recipes]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_groups_cover_the_recipes_min_and_max_workers(path):
    doc = _yaml(path)
    groups = _cluster_spec(doc)["workerGroupSpecs"]
    for recipe, cfg in _kuberay_recipes(doc, path):
        per = dict(cfg.scaling.resources_per_worker)
        fits = [(g, _fits(_group_capacity(g), per)) for g in groups]
        floor = sum(g["minReplicas"] * k for g, k in fits if _group_market(g) == "on-demand")
        total = sum(g["maxReplicas"] * k for g, k in fits)
        assert floor >= cfg.scaling.min_workers, f"{path}: floor {floor} < {recipe} min_workers"
        assert total >= cfg.scaling.max_workers, f"{path}: {total} < {recipe} max_workers"


# ------------------------------------------------------------------ commands in files and docs

DOCUMENTED = [*LAUNCHER, *KUBERAY, ROOT / "docs/clusters.md"]


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: p.name)
def test_every_train_command_names_a_real_recipe_with_valid_overrides(path):
    commands = _commands(path)
    assert commands, f"{path}: shows no `python -m orchestrator train` command"
    for args in commands:
        recipe = next((a.split("=", 1)[1] for a in args if a.startswith("recipe=")), "")
        if recipe == "tiny_cpu":  # local examples: local storage is shared
            overrides = [a for a in args if "=" in a and not a.startswith("recipe=")]
            _load_recipe(recipe, overrides)
            continue
        _check_command(path, args)
