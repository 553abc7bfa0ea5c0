"""Magnitude pruning: drop the weights with the smallest |w|."""

from torch import Tensor

from .masks import check_nm, check_sparsity, nm_keep, prune_lowest, pruned_count


def magnitude_mask(W: Tensor, sparsity: float, per_row: bool = False, n: int = 0, m: int = 0) -> Tensor:
    """Bool mask of the KEPT weights of W [rows, cols].

    - default: one threshold for the whole layer, exactly round(sparsity * numel) pruned;
    - per_row: exactly round(sparsity * cols) pruned in every row;
    - n:m (e.g. 2:4): the n largest |w| of every m consecutive columns are kept (sparsity and
      per_row are then ignored).
    Ties are broken deterministically: among equal |w| the lowest (flattened) index is pruned first.
    """
    rows, cols = W.shape
    magnitude = W.abs()
    if check_nm(n, m, cols):
        return nm_keep(magnitude, n, m)
    sparsity = check_sparsity(sparsity)
    if per_row:
        return prune_lowest(magnitude, pruned_count(sparsity, cols))
    return prune_lowest(magnitude.flatten(), pruned_count(sparsity, W.numel())).reshape(rows, cols)
