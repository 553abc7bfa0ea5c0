"""Magnitude pruning: drop the weights with the smallest |w|."""

from torch import Tensor

from .masks import check_nm, check_sparsity, nm_keep, prune_lowest, pruned_count


def magnitude_mask(W: Tensor, sparsity: float, per_row: bool = False, n: int = 0, m: int = 0, unit: int = 1) -> Tensor:
    """Bool mask of the KEPT weights of W [rows, cols].

    - default: one threshold for the whole layer, exactly round(sparsity * numel) pruned;
    - per_row: exactly round(sparsity * cols) pruned in every row;
    - n:m (e.g. 2:4): the n largest |w| of every m consecutive columns are kept (sparsity and
      per_row are then ignored);
    - unit > 1: blocks of `unit` consecutive weights of a row (oBERT's 4-blocks) are kept or pruned
      whole, ranked by their L2 norm; exactly round(sparsity * blocks) blocks pruned (of the layer,
      or of every row with per_row).
    Ties are broken deterministically: among equal scores the lowest (flattened) index is pruned first.
    """
    rows, cols = W.shape
    if check_nm(n, m, cols):
        return nm_keep(W.abs(), n, m)
    sparsity = check_sparsity(sparsity)
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1 or cols % unit:
        raise ValueError(f"unit must be a positive int dividing the row length {cols}, got {unit!r}")
    # a block's L2 norm ranks like its sum of squares; for single weights that is |w|
    magnitude = W.abs() if unit == 1 else W.double().reshape(rows, cols // unit, unit).square().sum(-1)
    blocks = magnitude.shape[1]
    if per_row:
        keep = prune_lowest(magnitude, pruned_count(sparsity, blocks))
    else:
        keep = prune_lowest(magnitude.flatten(), pruned_count(sparsity, magnitude.numel())).reshape(rows, blocks)
    return keep if unit == 1 else keep.repeat_interleave(unit, dim=1)
