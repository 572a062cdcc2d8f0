"""Figures for dense tasks: a few images with their true and predicted masks / depth maps.

Contract: ``save_examples_figure(result, path)`` writes one PNG (matplotlib, Agg backend,
no display needed) with one row per example in ``result.examples``: the image, the truth
and the prediction. Segmentation uses a fixed qualitative colour map (255 = ignored drawn
black); depth uses one colour scale per row over the dataset's depth range (invalid
ground-truth pixels drawn black). Figures are drawn on an Agg canvas without pyplot.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from orchestrator.eval.result import EvalResult

logger = logging.getLogger(__name__)


def _seg_colours(num_classes: int) -> np.ndarray:
    """[num_classes, 3] float colours, repeatable (tab20 cycled, then a seeded spread)."""
    import matplotlib

    base = np.asarray(matplotlib.colormaps["tab20"].colors)  # [20, 3]
    if num_classes <= len(base):
        return base[:num_classes]
    rng = np.random.default_rng(0)
    return np.concatenate([base, rng.uniform(0.1, 0.95, (num_classes - len(base), 3))])


def colourise(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """int [H, W] class ids -> float [H, W, 3] RGB; ignored / out-of-range ids are black."""
    colours = _seg_colours(max(num_classes, 1))
    m = np.asarray(mask).astype(np.int64)
    valid = (m >= 0) & (m < num_classes) & (m != ignore_index)
    out = np.zeros(m.shape + (3,), dtype=np.float64)
    out[valid] = colours[m[valid]]
    return out


def save_examples_figure(result: EvalResult, path: str | Path) -> Path | None:
    """Write the examples of a dense-task result as a PNG grid.

    Args:
        result: an EvalResult whose ``examples`` hold "image", "truth", "pred" and "kind"
            ("segmentation" with "num_classes", or "depth" with "depth_range").
        path: output file (parents are created).

    Returns:
        The path written, or None when the result has no examples.
    """
    if not result.examples:
        return None
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(result.examples)
    fig = Figure(figsize=(9, 3 * rows))
    FigureCanvasAgg(fig)  # Agg canvas: no pyplot, no display, no global backend state
    axes = fig.subplots(rows, 3, squeeze=False)
    for r, ex in enumerate(result.examples):
        axes[r, 0].imshow(ex["image"])
        if ex["kind"] == "segmentation":
            c = ex["num_classes"]
            axes[r, 1].imshow(colourise(ex["truth"], c), interpolation="nearest")
            axes[r, 2].imshow(colourise(ex["pred"], c), interpolation="nearest")
        else:
            lo, hi = ex["depth_range"]
            cmap = matplotlib.colormaps["viridis"].with_extremes(bad="black")
            truth = np.ma.masked_where(~((ex["truth"] > lo) & (ex["truth"] <= hi)), ex["truth"])
            axes[r, 1].imshow(truth, cmap=cmap, vmin=lo, vmax=hi)
            im = axes[r, 2].imshow(ex["pred"], cmap=cmap, vmin=lo, vmax=hi)
            fig.colorbar(im, ax=axes[r, 2], fraction=0.046, pad=0.04, label="m")
        for c, title in enumerate(("image", "truth", "prediction")):
            axes[r, c].set_title(title if r == 0 else "")
            axes[r, c].axis("off")
    metric = ", ".join(f"{k}={v:.3g}" for k, v in list(result.metrics.items())[:3])
    fig.suptitle(f"{result.task} on {result.dataset}: {metric}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    logger.info("wrote %s", path)
    return path
