"""The common result type of every evaluation task, and its table / JSON / Markdown forms.

Contract: each task returns ``EvalResult(task, dataset, metrics, num_images)``; metric values
are plain floats in the units the task names (percent for accuracies, recalls and mIoU;
metres for depth errors). ``flat_metrics`` turns a list of results into the flat namespaced
keys used with training metrics (``eval/zero_shot_seg/miou``,
docs/design.md, "Metric keys").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalResult:
    """One task on one dataset.

    Attributes:
        task: task name, e.g. ``"zero_shot_seg"``.
        dataset: dataset name, e.g. ``"synthetic"``, ``"ade20k"``.
        metrics: metric name -> value (percent or metres, see the task's docstring).
        num_images: images evaluated (the evaluated split only, not a probe's train split).
        extra: free-form details (settings used) that go into results.json, not the table.
        examples: a few (image, truth, prediction) dicts of numpy arrays from dense tasks,
            for ``plots.py``; never serialised.
    """

    task: str
    dataset: str
    metrics: dict[str, float]
    num_images: int
    extra: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("examples")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        return cls(
            task=d["task"],
            dataset=d["dataset"],
            metrics={k: float(v) for k, v in d["metrics"].items()},
            num_images=int(d["num_images"]),
            extra=dict(d.get("extra", {})),
        )


def flat_metrics(results: list[EvalResult], prefix: str = "eval") -> dict[str, float]:
    """``[EvalResult]`` -> ``{"eval/<task>/<metric>": value}`` (NaNs kept as NaN)."""
    return {
        f"{prefix}/{r.task}/{name}": float(value)
        for r in results
        for name, value in r.metrics.items()
    }


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _rows(results: list[EvalResult]) -> list[list[str]]:
    return [
        [r.task, r.dataset, str(r.num_images), name, _fmt(v)]
        for r in results
        for name, v in r.metrics.items()
    ]


_HEADER = ["task", "dataset", "images", "metric", "value"]


def format_table(results: list[EvalResult]) -> str:
    """A fixed-width text table (what ``tips eval`` prints)."""
    rows = [_HEADER, *_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_markdown(results: list[EvalResult], title: str = "Evaluation", source: str = "") -> str:
    """A Markdown report: a title, the model source and one table row per metric."""
    lines = [f"# {title}", ""]
    if source:
        lines += [f"Model: `{source}`", ""]
    lines.append("| " + " | ".join(_HEADER) + " |")
    lines.append("|" + "|".join("---" for _ in _HEADER) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None, recursively, so results.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(
    results: list[EvalResult], out_dir: str | Path, source: str, settings: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``results.json`` (strict JSON: NaN metrics, e.g. an mIoU with no labelled
    class, become null) and ``results.md`` into ``out_dir``.

    Returns:
        (json_path, md_path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "source": source,
        "settings": settings,
        "results": [r.to_dict() for r in results],
        "metrics": flat_metrics(results),
    }
    json_path = out / "results.json"
    text = json.dumps(_json_safe(payload), indent=2, default=str, allow_nan=False)
    json_path.write_text(text + "\n")
    md_path = out / "results.md"
    md_path.write_text(to_markdown(results, source=source))
    return json_path, md_path
