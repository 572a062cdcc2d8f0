"""Config dataclasses of the TIPS and TIPSv2 objectives (every [open] value cited).

Kept apart from the objective code so the orchestrator can validate a recipe without
building a model. Sources are sections of docs/method.md, named by heading; "[paper]" values
are stated in the TIPS paper's setup text, "[open]" ones are fallbacks (mostly DINOv2's
defaults), and "[open] QN" is item N of docs/method.md, "Open questions".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TipsObjectiveConfig:
    """TIPS (ICLR 2025): L = L_contr + alpha * L_distill + beta * L_MIM.

    docs/method.md, "Loss weights".
    """

    name: str = "tips"
    # --- weights ---
    alpha: float = 1.0  # [paper] self-distillation weight
    beta: float = 2.0  # [paper] masked-image-modelling weight
    contrastive_alt_weight: float = 1.0  # [open] Q5: the two contrastive terms assumed 1:1
    contrastive_syn_weight: float = 1.0  # [open] Q5
    koleo_weight: float = 0.0  # [open] "KoLeo": DINOv2 uses 0.1; no evidence TIPS does
    # --- contrastive ---
    gather_negatives: bool = True  # [open] Q5: negatives from all workers (CLIP practice)
    contrastive_view: str = "masked"  # [open] Q4: "masked" student pass | "unmasked" extra pass
    # --- heads (docs/method.md, "DINO head and loss bookkeeping"; DINOv2 DINOHead) ---
    dino_cls: str = "alt"  # [open] Q4: which CLS feeds the DINO head: alt | syn
    head_out_dim: int = 65536  # [open] K prototypes; DINOv2 65536 (131072 for L/g)
    head_hidden_dim: int = 2048  # DINOv2
    head_bottleneck_dim: int = 256  # DINOv2 (384 for L/g)
    head_nlayers: int = 3  # DINOv2
    separate_ibot_head: bool = False  # [open] Q2: DINOv2 L/g configs use a separate head
    # --- targets ---
    centering: str = "softmax"  # "DINO CLS distillation" quotes softmax centering; or "sinkhorn"
    sinkhorn_iterations: int = 3  # DINOv2
    center_momentum: float = 0.9  # [open] DINOv2
    student_temp: float = 0.1  # [open] DINOv2
    # --- MIM (docs/method.md, "iBOT masked image modelling"; "TIPSv2 all-token iBOT") ---
    mim_tokens: str = "masked"  # "masked" = iBOT (TIPS); "all" = iBOT++ (TIPSv2)
    mim_masked_weight: float = 1.0  # [open] Q6: iBOT++ weight of masked tokens
    mim_visible_weight: float = 1.0  # [open] Q6: iBOT++ weight of visible tokens
    # iBOT (mim_tokens="masked") computed on every token with weights 0/1 instead of x[masks]:
    # the same loss, centre and diagnostics with shapes that do not depend on the masks, so
    # XLA compiles one graph (TPU recipes); the heads then run on every token (more compute)
    mim_fixed_shapes: bool = False
    # iBOT (mim_tokens="masked") on a fixed number of gathered token slots per image instead of
    # x[masks]: S = int(capacity * N) slots per global crop, its masked tokens first, the rest
    # padding of weight 0, so the heads run on B*G*S rows whatever the masks (CUDA graphs,
    # torch.compile). DINOv2 gathers its masked tokens into an upper bound the same way
    # (dinov2/data/collate.py "upperbound", dinov2/train/ssl_meta_arch.py). Exact (the x[masks]
    # loss) when capacity >= masking.ratio_max, which the run config enforces; 0.5 = DINOv2's
    # ratio max. None: off (x[masks], or every token with mim_fixed_shapes).
    mim_masked_capacity: float | None = None
    # --- teacher (docs/method.md, "Teacher EMA and schedules") ---
    teacher: str = "full_ema"  # "full_ema" (TIPS) | "head_ema" (TIPSv2 head-only EMA)

    def __post_init__(self) -> None:
        choices = {
            "contrastive_view": ("masked", "unmasked"),
            "dino_cls": ("alt", "syn"),
            "centering": ("softmax", "sinkhorn"),
            "mim_tokens": ("masked", "all"),
            "teacher": ("full_ema", "head_ema"),
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"objective.{key}={value!r}: must be one of {list(allowed)}")
        for key in ("alpha", "beta", "contrastive_alt_weight", "contrastive_syn_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"objective.{key} must be >= 0 (0 switches the term off)")
        if self.mim_fixed_shapes and self.centering != "softmax":
            raise ValueError(
                "objective.mim_fixed_shapes=true needs objective.centering=softmax (Sinkhorn "
                "over the masked tokens only is not written with fixed shapes)"
            )
        self._check_capacity()

    def _check_capacity(self) -> None:
        cap = self.mim_masked_capacity
        if cap is None:
            return
        if not 0.0 < cap <= 1.0:
            raise ValueError(f"objective.mim_masked_capacity={cap} must be in (0, 1] or null")
        if self.mim_fixed_shapes or self.mim_tokens != "masked" or self.centering != "softmax":
            raise ValueError(
                "objective.mim_masked_capacity needs objective.mim_tokens=masked, "
                "centering=softmax and mim_fixed_shapes=false (it is the fixed-count iBOT; "
                "iBOT++ and mim_fixed_shapes already run on every token)"
            )

    def loss_terms(self) -> tuple[str, ...]:
        """The ``losses`` keys a forward reports (``loss/<term>`` in metrics)."""
        terms = ["contrastive_alt", "contrastive_syn"]
        terms += ["dino"] if self.alpha > 0 else []
        terms += ["ibot"] if self.beta > 0 else []
        terms += ["koleo"] if self.koleo_weight > 0 else []
        return tuple(terms)


@dataclass(frozen=True)
class TipsV2ObjectiveConfig(TipsObjectiveConfig):
    """TIPSv2: iBOT++ on all patch tokens and head-only EMA (docs/method.md, "TIPSv2 changes")."""

    name: str = "tipsv2"
    mim_tokens: str = "all"  # iBOT++ (docs/method.md, "TIPSv2 all-token iBOT")
    # head-only EMA, student backbone as teacher (docs/method.md, "Teacher EMA and schedules")
    teacher: str = "head_ema"
