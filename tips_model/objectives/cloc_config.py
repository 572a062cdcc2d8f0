"""Config of the CLOC objective (Chen et al., "Contrastive Localized Language-Image
Pre-Training", ICML 2025, arXiv 2410.02746; docs/method.md, "CLOC").

Source tags: [paper] = abstract (arxiv.org/html/2410.02746v2: CLIP + region-text contrastive
loss and modules, "promptable embeddings" turned into region representations given spatial
hints); [2nd] = secondary reviews: liner.com/review/contrastive-localized-languageimage-pretraining
(quotes Fig. 1: a lightweight Prompter attached to the image encoder, all parameters trained
end-to-end from scratch) and paperium.net/article/en/11914 (L_CLIP + region-text contrastive +
a grounding loss that regresses boxes from caption cues); [inf] = recalled from the paper,
not verified in a reachable source, so a config field with this fallback; [DETR] = Carion et
al. 2020 box-loss weights, used as the fallback for the L1/GIoU mix; [open] = no source.

    L = sum_c L_CLIP,c + lambda * (w_rt * L_region_text + w_g * (w_l1 * L_l1 + w_giou * L_giou))
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClocObjectiveConfig:
    """CLOC: CLIP + lambda * (region-text InfoNCE + box grounding)."""

    name: str = "cloc"
    # --- weights (0 switches a term and its modules off) ---
    region_weight: float = 1.0  # lambda [inf]; the structure L_CLIP + lambda(...) is [2nd]
    region_contrastive_weight: float = 1.0  # w_rt inside lambda(...) [inf]: 1:1 with grounding
    grounding_weight: float = 1.0  # w_g [inf]
    box_l1_weight: float = 5.0  # [DETR] lambda_L1 = 5 (CLOC's own L1/GIoU mix is [inf])
    box_giou_weight: float = 2.0  # [DETR] lambda_iou = 2
    # --- image-level CLIP term ---
    clip_captions: str = "both"  # [open] alt | syn | both (both = TIPS's dual-CLS pairing)
    gather_negatives: bool = True  # CLIP practice; region negatives too ([paper]: "across batch")
    share_temperature: bool = True  # [open] one learned temperature for image and region terms
    # --- regions (the pipeline pads to max_regions) ---
    max_regions: int = 8  # [open] R: (box, caption) pairs kept per image after cropping
    # --- Prompter ---
    prompter_depth: int = 1  # [inf] a single transformer layer
    prompter_heads: int = 0  # [open] 0 = the vision tower's head count
    box_encoding: str = "sincos"  # [inf] sincos (4 coords, DETR-style) | linear (Linear(4, D))
    grounding_prompter: str = "shared"  # [inf] shared | separate: Prompter run on a text prompt

    def __post_init__(self) -> None:
        choices = {
            "clip_captions": ("alt", "syn", "both"),
            "box_encoding": ("sincos", "linear"),
            "grounding_prompter": ("shared", "separate"),
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"objective.{key}={value!r}: must be one of {list(allowed)}")
        for key in (
            "region_weight",
            "region_contrastive_weight",
            "grounding_weight",
            "box_l1_weight",
            "box_giou_weight",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"objective.{key} must be >= 0 (0 switches the term off)")
        if self.max_regions < 1:
            raise ValueError(f"objective.max_regions={self.max_regions} must be >= 1")
        if self.prompter_depth < 1:
            raise ValueError(f"objective.prompter_depth={self.prompter_depth} must be >= 1")
        if self.prompter_heads < 0:
            raise ValueError("objective.prompter_heads must be >= 0 (0 = the vision tower's)")

    @property
    def uses_region_contrastive(self) -> bool:
        return self.region_weight > 0 and self.region_contrastive_weight > 0

    @property
    def uses_grounding(self) -> bool:
        return self.region_weight > 0 and self.grounding_weight > 0

    @property
    def uses_regions(self) -> bool:
        return self.uses_region_contrastive or self.uses_grounding

    def loss_terms(self) -> tuple[str, ...]:
        """The ``losses`` keys a forward reports (``loss/<term>`` in metrics)."""
        terms = ["contrastive_alt"] if self.clip_captions in ("alt", "both") else []
        terms += ["contrastive_syn"] if self.clip_captions in ("syn", "both") else []
        terms += ["region_contrastive"] if self.uses_region_contrastive else []
        terms += ["grounding_l1", "grounding_giou"] if self.uses_grounding else []
        return tuple(terms)
