"""OWL (Yin et al. 2023): non-uniform layer-wise sparsity from the outlier ratio of each block.

A block whose Wanda scores contain more outliers (scores > M x their mean) is more important and
gets a lower sparsity. The sparsities are an affine, decreasing function of the outlier ratio D:
s_i = target - c * (D_i - mean(D)), so their mean is exactly the target. OWL's reference code
scales D to a range of 2 * lam, which can move one block up to 2 * lam away from the target; here
c is chosen so that the largest deviation is exactly lam, keeping every s_i in target +- lam.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .masks import check_sparsity
from .wanda import wanda_scores


def outlier_fraction(
    weights: Tensor | Sequence[Tensor], col_norms: Tensor | Sequence[Tensor], M: float = 5.0
) -> float:
    """Fraction of Wanda scores |W_ij| * ||X_j||_2 above M x their mean.

    Pass one layer, or all layers of a block as parallel sequences: OWL pools the block's scores
    so the mean (and the threshold) is shared by the block.
    """
    if isinstance(weights, Tensor):
        weights, col_norms = [weights], [col_norms]
    scores = torch.cat([wanda_scores(W, norm).flatten() for W, norm in zip(weights, col_norms, strict=True)])
    return (scores > M * scores.mean()).double().mean().item()


def owl_ratios(
    outlier_fractions: Mapping[str, float] | Sequence[float], target_sparsity: float, lam: float = 0.08
) -> dict[str, float] | list[float]:
    """Per-block sparsities (same keys / order as the input) with mean exactly `target_sparsity`,
    each within target +- lam (lam is reduced if needed to keep them in [0, 1]); a higher outlier
    fraction gives a lower sparsity. Equal fractions give the uniform target."""
    target = check_sparsity(target_sparsity)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    names = list(outlier_fractions) if isinstance(outlier_fractions, Mapping) else None
    fractions = torch.tensor(
        [outlier_fractions[k] for k in names] if names is not None else list(outlier_fractions),
        dtype=torch.float64,
    )
    if fractions.numel() == 0:
        raise ValueError("outlier_fractions is empty")
    deviation = fractions - fractions.mean()
    largest = deviation.abs().max().item()
    lam = min(lam, target, 1 - target)
    ratios = (target - deviation * (lam / largest if largest > 0 else 0.0)).tolist()
    return dict(zip(names, ratios)) if names is not None else ratios
