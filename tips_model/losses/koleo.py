"""KoLeo (Kozachenko-Leonenko) spreading regulariser.

Contract:
    koleo_loss(x [B, D]) -> scalar = -(1/B) sum_i log(||x_i - x_nn(i)|| + eps)
on L2-normalised rows, nn(i) = the nearest other row (max cosine similarity).

Sources: Sablayrolles et al. 2018 "Spreading vectors for similarity search"; DINOv2 applies
it with weight 0.1 to the student CLS of each global crop separately
(``dinov2/loss/koleo_loss.py``, docs/method.md, "KoLeo"). No evidence TIPS uses it [open]: the
objective enables it through a non-zero weight. Differences from DINOv2: the distance is the
plain Euclidean norm (DINOv2's ``PairwiseDistance`` adds eps inside the difference), and the
diagonal is excluded with -inf, so two antipodal points still find each other.

Not distributed: the neighbour search is within this rank's rows (as DINOv2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["koleo_loss"]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Negative mean log nearest-neighbour distance of the L2-normalised rows.

    Args:
        x: ``[B, D]`` features (any float dtype), B >= 2.
        eps: Added to each distance inside the log (and used by the normalisation).

    Returns:
        Scalar float32 loss; lower when the rows are spread out on the sphere.

    Raises:
        ValueError: If x is not 2-D with at least two rows.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss expects [B, D] with B >= 2, got {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)  # [B, D]
        with torch.no_grad():
            sims = x @ x.t()  # [B, B]
            sims.fill_diagonal_(float("-inf"))
            nearest = sims.argmax(dim=1)  # [B]
        distances = (x - x[nearest]).norm(dim=-1)  # [B]
        return -torch.log(distances + eps).mean()
