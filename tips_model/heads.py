"""DINO / iBOT projection heads.

Contract: ``DINOHead(in_dim, out_dim)`` maps backbone features ``[..., in_dim]`` (CLS tokens
``[B, D]`` or patch tokens ``[B, N, D]``) to prototype logits ``[..., out_dim]``. The same class
serves the CLS-level DINO head and the patch-level iBOT head; whether TIPS shares one head
between the two is [open] (docs/method.md, "iBOT masked image modelling"), so objectives build
one or two instances.

Architecture (docs/method.md, "DINO head and loss bookkeeping", after
``dinov2/layers/dino_head.py``):
    MLP in -> hidden -> ... -> bottleneck (GELU between layers, no BatchNorm, trunc-normal(0.02)
    weights, zero biases) -> L2-normalise -> weight-normalised ``Linear(bottleneck, K,
    bias=False)`` whose magnitude ``g`` starts at 1 and is trained (not frozen).

Defaults follow DINOv2: hidden 2048, bottleneck 256 (384 in the L/g configs), 3 layers,
K = 65536 (131072 for L/g) — all [open] for TIPS and set by the objective config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Sequential:
    """Linear layers in -> hidden (x nlayers-1) -> bottleneck with GELU in between."""
    if nlayers < 1:
        raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head: MLP -> L2-normalise -> weight-normalised linear to K prototypes.

    Submodule names follow DINOv2 (``mlp``, ``last_layer``); with the parametrization API the
    last layer's parameters are ``last_layer.parametrizations.weight.original0`` (g, [K, 1])
    and ``...original1`` (v, [K, bottleneck]), so ``weight = g * v / ||v||`` row-wise.

    Args:
        in_dim: Backbone width D.
        out_dim: Number of prototypes K.
        hidden_dim: MLP hidden width.
        bottleneck_dim: Width of the L2-normalised bottleneck.
        nlayers: Number of Linear layers in the MLP (>= 1).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        self.mlp = _build_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim)
        self.mlp.apply(self._init_weights)
        # The direction v keeps nn.Linear's default init: DINOv2's trunc-normal init does not
        # reach the weight-normalised layer either (it only has weight_g / weight_v there).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project features to prototype logits.

        Args:
            x: Features ``[..., in_dim]`` (e.g. ``[B, D]`` or ``[B, N, D]``).

        Returns:
            Logits ``[..., out_dim]`` in the dtype of the computation (bf16 under autocast).
        """
        x = self.mlp(x)
        # eps 1e-6 in half precision so that the normalisation cannot divide by a rounded 0.
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)
