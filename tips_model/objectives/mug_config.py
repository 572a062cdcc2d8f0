"""Config of the MUG objective (Zhao et al., "Vision Learners Meet Web Image-Text Pairs",
TMLR 2024, arXiv 2301.07088; docs/method.md, "MUG").

Source tags: [paper] = abstract (arxiv.org/html/2301.07088v3, purely generative: masked image
reconstruction + caption generation on web image-text pairs); [demo] = the authors' public demo
huggingface.co/spaces/tennant/MUG_caption ``app.py`` (builds ``mae_vit_base_patch16(uni_dim=768,
uni_heads=12)``, reconstructs with ``mask_ratio=0.75`` and un-normalises its predictions with
each patch's mean/var, i.e. the model was trained on per-patch normalised pixels); [MAE] = the
MAE ViT-B defaults its demo builds on (facebook/vit-mae-base ``config.json``: decoder 512 wide,
8 layers, 16 heads, mask ratio 0.75); [open] = not found in a reachable source: a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MugObjectiveConfig:
    """MUG: L = w_rec * L_rec + lambda * L_cap (docs/method.md, "MUG")."""

    name: str = "mug"
    # --- weights (0 switches a term and its decoder off) ---
    reconstruction_weight: float = 1.0  # [open] w_rec; the paper's abstract gives no weights
    caption_weight: float = 1.0  # [open] lambda
    # --- masking / reconstruction ---
    mask_ratio: float = 0.75  # [demo] visual_recon(mask_ratio=0.75); [MAE] 0.75
    norm_pix_loss: bool = True  # [demo] predictions are per-patch normalised pixels
    # --- caption ---
    caption: str = "alt"  # which caption is generated: "alt" (web alt-text, [paper]) | "syn"
    # --- pixel decoder [MAE] ---
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    # --- caption decoder ---
    caption_dim: int = 768  # [demo] uni_dim=768
    caption_heads: int = 12  # [demo] uni_heads=12
    caption_depth: int = 6  # [open] the caption decoder's depth was not found in a source
    tie_caption_embeddings: bool = True  # [open] output projection = token embedding^T

    def __post_init__(self) -> None:
        if self.caption not in ("alt", "syn"):
            raise ValueError(f"objective.caption={self.caption!r}: must be one of ['alt', 'syn']")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio={self.mask_ratio} must be in [0, 1)")
        for key in ("reconstruction_weight", "caption_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"objective.{key} must be >= 0 (0 switches the term off)")
        if self.reconstruction_weight == 0 and self.caption_weight == 0:
            raise ValueError(
                "objective.reconstruction_weight and objective.caption_weight are both 0: "
                "nothing to train"
            )
        for dim, heads, depth in (
            ("decoder_dim", "decoder_heads", "decoder_depth"),
            ("caption_dim", "caption_heads", "caption_depth"),
        ):
            if getattr(self, depth) < 1:
                raise ValueError(f"objective.{depth} must be >= 1")
            if getattr(self, heads) < 1 or getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"objective.{dim} must be divisible by objective.{heads}")
        if self.decoder_dim % 4:
            raise ValueError("objective.decoder_dim must be divisible by 4 (2-D sincos positions)")

    def loss_terms(self) -> tuple[str, ...]:
        """The ``losses`` keys a forward reports (``loss/<term>`` in metrics)."""
        terms = ["reconstruction"] if self.reconstruction_weight > 0 else []
        terms += ["caption"] if self.caption_weight > 0 else []
        return tuple(terms)
