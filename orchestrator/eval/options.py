"""Settings shared by the evaluation tasks (``tips eval key=value`` sets any of them).

Defaults follow the protocols the tasks cite: TIPS zero-shot segmentation
(docs/method.md, "Evaluation protocols": 9 TCL templates, window 448 / stride 336 at a 448 short
side, i.e. window = the model's input size and stride = 3/4 of it), DINO k-NN (k = 20, T = 0.07),
DINOv2-style linear probes (BatchNorm + 1x1 conv on frozen last-layer patch tokens, logits upsampled
bilinearly). The probe budget (steps, lr) is a fixed small default so that runs are comparable and
cheap; the papers train probes far longer, so absolute numbers are lower bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATE_SETS = ("tcl", "default", "plain")


@dataclass
class EvalOptions:
    """Task settings; 0 means "derive it" where the comment says so."""

    batch_size: int = 32  # images per forward pass
    image_size: int = 0  # square input side; 0 = the vision tower's native size
    cls: str = "alt"  # global embedding: "alt" (TIPS's zero-shot choice) or "syn"
    templates: str = "tcl"  # prompt set: tcl (9, TIPS notebook) | default (3) | plain ("{}")
    max_images: int = 0  # cap on the evaluated split (evenly spaced); 0 = all
    max_train_images: int = 0  # cap on probe / k-NN training splits; 0 = all
    knn_k: int = 20  # DINO k-NN neighbours
    knn_temperature: float = 0.07  # DINO k-NN vote temperature
    zs_window: int = 0  # zero-shot seg sliding window; 0 = image_size (TIPS: 448)
    zs_stride: int = 0  # 0 = 3/4 of the window (TIPS: 336)
    zs_short_side: int = 0  # resize the short side to this first; 0 = the window
    probe_steps: int = 300  # optimizer steps of a linear probe
    probe_lr: float = 1e-3  # AdamW learning rate of a linear probe (cosine to 0)
    probe_batch_size: int = 16  # images per probe step
    depth_bins: int = 256  # depth probe bins, uniform over the dataset's depth range
    seed: int = 0  # probe init and batch order
    plot_images: int = 4  # images per dense-task figure
    progress: bool = True  # tqdm bars over images

    def check(self) -> None:
        """Raise ValueError naming the bad key."""
        if self.cls not in ("alt", "syn"):
            raise ValueError(f"cls={self.cls!r}: must be 'alt' or 'syn'")
        if self.templates not in TEMPLATE_SETS:
            raise ValueError(f"templates={self.templates!r}: must be one of {TEMPLATE_SETS}")
        for key in ("batch_size", "probe_batch_size", "knn_k", "depth_bins"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)}: must be > 0")


def templates_for(name: str) -> tuple[str, ...]:
    """The prompt templates of a set name (see ``EvalOptions.templates``)."""
    from tips_model.zero_shot import DEFAULT_TEMPLATES, TCL_TEMPLATES

    return {"tcl": TCL_TEMPLATES, "default": DEFAULT_TEMPLATES, "plain": ("{}",)}[name]
