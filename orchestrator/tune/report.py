"""Sweep outputs: the results table (CSV, Markdown), the best config as a recipe, plots.

    rows = collect(grid, sweep)      # one row per trial, sorted by the metric
    paths = write(grid, sweep)       # into the sweep directory (local or S3)

Files written under ``storage_uri/name/``:
    results.csv, results.md   trials best first (finished ones by their final metric, then
                              early-stopped ones, then failed ones): swept values, the
                              metric at the last report and its best, steps reached, whether
                              the scheduler stopped the trial early, number of incarnations
                              (PBT exploits and restarts)
    best_recipe.yaml          the best trial's full config: ``tips train recipe=best_recipe.yaml``
    plot_params.png           metric vs each swept parameter (one panel per key)
    plot_curves.png           metric over steps, one line per trial
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from orchestrator import config as config_lib
from orchestrator.storage import join_uri, write_bytes, write_text
from orchestrator.tune.driver import INCARNATIONS_FILE, trial_config
from orchestrator.tune.spec import TIME_ATTR, Sweep


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(float(x))


def _history(result: Any) -> list[dict[str, Any]]:
    df = result.metrics_dataframe
    if df is None or df.empty:
        return [result.metrics] if result.metrics else []
    return df.to_dict("records")


def _incarnations(result: Any) -> int:
    try:
        path = Path(result.path) / INCARNATIONS_FILE
        return len(path.read_text().splitlines()) if path.is_file() else 0
    except (OSError, TypeError):
        return 0


def _error_line(error: BaseException | None) -> str:
    """A failed trial's root cause in one line (the worker's exception, not Ray's wrappers)."""
    if error is None:
        return ""
    from orchestrator.train.driver import failure_line

    line = failure_line(error)
    # the trial driver re-raises the run's error as "trial <id>: training failed: <error>"
    head, sep, rest = line.partition("training failed: ")
    return rest.splitlines()[0] if sep else line


def collect(grid: Any, sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial, sorted best first (trials without the metric last)."""
    metric, mode = sweep.spec.metric, sweep.spec.mode
    rows = []
    for result in grid:
        history = _history(result)
        values = [h[metric] for h in history if _finite(h.get(metric))]
        last = result.metrics or {}
        step = int(last.get(TIME_ATTR, 0) or 0)
        overrides = (result.config or {}).get("overrides", {})
        rows.append(
            {
                "trial": f"trial-{last.get('trial_id', '?')}",
                **{k: overrides.get(k) for k in sweep.space},
                "metric_last": values[-1] if values else float("nan"),
                "metric_best": (max(values) if mode == "max" else min(values))
                if values
                else float("nan"),
                "steps": step,
                "stopped_early": step < sweep.max_t() and result.error is None,
                "error": type(result.error).__name__ if result.error is not None else "",
                "incarnations": _incarnations(result),
                "_history": history,
                "_overrides": overrides,
                "_error_line": _error_line(result.error),
                "_path": getattr(result, "path", None),
            }
        )
    # Trials that ran the whole budget first, ranked by their final metric; then the ones a
    # scheduler stopped early (each was below its rung's cutoff when it stopped, so its
    # earlier, noisier value must not outrank a finished trial); trials without the metric
    # last.
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(
        key=lambda r: (
            not _finite(r["metric_last"]),
            r["stopped_early"] or bool(r["error"]),
            sign * _num(r["metric_last"]),
        )
    )
    return rows


def _num(x: Any) -> float:
    return float(x) if _finite(x) else 0.0


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_public(rows[0])))
    writer.writeheader()
    for r in rows:
        writer.writerow(_public(r))
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], sweep: Sweep) -> str:
    title = f"Sweep `{sweep.spec.name}`: {sweep.spec.metric} ({sweep.spec.mode}), best first"
    if not rows:
        return f"{title}\n\n(no trials)\n"
    cols = list(_public(rows[0]))
    header = [c.replace("metric_", f"{sweep.spec.metric.split('/')[-1]} ") for c in cols]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def best_recipe_yaml(rows: list[dict[str, Any]], sweep: Sweep) -> str:
    """The best trial's config as a recipe that ``config.load`` accepts."""
    best = rows[0]
    cfg = trial_config(config_lib.to_dict(sweep.base), best["_overrides"])
    picked = ", ".join(f"{k}={_fmt(v)}" for k, v in best["_overrides"].items())
    header = (
        f"# Best trial of sweep {sweep.spec.name!r} ({sweep.source})\n"
        f"# {sweep.spec.metric} = {_fmt(best['metric_last'])} ({sweep.spec.mode}); "
        f"{best['trial']}: {picked}\n"
        "# Train it: tips train recipe=best_recipe.yaml [key=value ...]\n"
    )
    return header + config_lib.to_yaml(cfg)


def _log_axis(ax: Any) -> None:
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plot_params(rows: list[dict[str, Any]], sweep: Sweep) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r[key], r["metric_last"], r["stopped_early"]) for r in rows]
        pts = [p for p in pts if _finite(p[1])]
        labels = sorted({json.dumps(p[0], sort_keys=True) for p in pts})
        numeric = all(_finite(p[0]) for p in pts)
        for stopped in (False, True):
            sel = [p for p in pts if p[2] == stopped]
            xs = [p[0] if numeric else labels.index(json.dumps(p[0], sort_keys=True)) for p in sel]
            ax.scatter(
                xs,
                [p[1] for p in sel],
                facecolors="none" if stopped else "C0",
                edgecolors="C0",
                label="stopped early" if stopped else "finished",
            )
        if numeric and sweep.space[key].kind == "loguniform":
            _log_axis(ax)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.spec.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{sweep.spec.name}: {sweep.spec.metric} at each trial's last report")
    return _png(fig)


def _measured(history: list[dict[str, Any]], sweep: Sweep) -> list[tuple[float, float]]:
    """(step, value) where the metric was measured; eval metrics are carried forward between
    evaluations in the reports (driver.py), so only evaluation steps count for them."""
    metric, t = sweep.spec.metric, sweep.base.train
    pts = []
    for h in history:
        step, value = h.get(TIME_ATTR), h.get(metric)
        if not (_finite(step) and _finite(value)):
            continue
        if metric.startswith("eval/") and step % t.eval_every_steps and step < t.total_steps:
            continue
        pts.append((step, value))
    return pts


def _plot_curves(rows: list[dict[str, Any]], sweep: Sweep) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        pts = _measured(r["_history"], sweep)
        if pts:
            label = r["trial"] + (" (stopped)" if r["stopped_early"] else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(sweep.spec.metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_title(f"{sweep.spec.name}: {sweep.spec.metric} per trial")
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write(grid: Any, sweep: Sweep) -> dict[str, str]:
    """Write every output into the sweep directory; returns {kind: URI}."""
    rows = collect(grid, sweep)
    storage = sweep.base.storage
    uri = sweep.uri
    out = {
        "csv": join_uri(uri, "results.csv"),
        "markdown": join_uri(uri, "results.md"),
        "best_recipe": join_uri(uri, "best_recipe.yaml"),
        "plot_params": join_uri(uri, "plot_params.png"),
        "plot_curves": join_uri(uri, "plot_curves.png"),
    }
    write_text(out["csv"], to_csv(rows), storage)
    write_text(out["markdown"], to_markdown(rows, sweep), storage)
    if rows and _finite(rows[0]["metric_last"]):
        write_text(out["best_recipe"], best_recipe_yaml(rows, sweep), storage)
    else:
        del out["best_recipe"]
    write_bytes(out["plot_params"], _plot_params(rows, sweep), storage)
    write_bytes(out["plot_curves"], _plot_curves(rows, sweep), storage)
    return out
