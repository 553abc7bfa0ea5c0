"""The Optimal BERT Surgeon (Kurtic et al. 2022): second-order pruning with a block-diagonal inverse
of the empirical Fisher.

The loss near the current weights w (a flattened tensor of d elements) is modelled as
L(w + δ) - L(w) ≈ ½ δᵀ F δ with the dampened empirical Fisher F = λI + (1/m) Σ g gᵀ of m gradient
samples g (the gradient term is dropped: the model is assumed trained). F is d × d, so oBERT keeps
only its blocks of B consecutive weights (B = 50 in the paper): F⁻¹ is block-diagonal, d·B numbers.

Inverse (Sherman-Morrison). Starting from F₀⁻¹ = I/λ, adding (1/m) g gᵀ is a rank-1 update:
    F_k⁻¹ = F_{k-1}⁻¹ - v vᵀ / (m + gᵀ v),    v = F_{k-1}⁻¹ g,
exact for any SPD F_{k-1}; per block it costs O(B²), so one gradient costs O(d·B), all blocks at once.
k gradients G = [g_1 … g_k] at once are the same k updates in one step (Woodbury):
    F⁻¹ ← F⁻¹ - V S⁻¹ Vᵀ,    V = F⁻¹ G,    S = m I + Gᵀ V = L Lᵀ (Cholesky),
applied as F⁻¹ - U Uᵀ with U = V L⁻ᵀ (symmetric by construction). It reads the d·B numbers of F⁻¹
three times per k gradients instead of per gradient: memory-bound batched products of tiny
matrices are what the rank-1 form spends its time on (64 gradients of a 384 x 1536 layer, one Zen 3
thread: a third of the time at k = 16). k = 1 is the rank-1 update itself, and the fallback where
rounding breaks a k x k Cholesky factorization.

Pruning a set S of coordinates (weights forced to 0) minimises ½ δᵀ F δ subject to E_Sᵀ (w + δ) = 0.
The Lagrangian gives F δ = E_S μ, so δ = F⁻¹ E_S μ with E_Sᵀ F⁻¹ E_S μ = -w_S:
    δ = -F⁻¹ E_S ([F⁻¹]_SS)⁻¹ w_S,    loss ½ δᵀ F δ = ½ w_Sᵀ ([F⁻¹]_SS)⁻¹ w_S.
For one weight q this is OBS: δ = -(w_q / [F⁻¹]_qq) F⁻¹ e_q with loss ρ_q = w_q² / (2 [F⁻¹]_qq), the
unstructured score; for a unit Q of consecutive weights (e.g. 4 of a row) ρ_Q = ½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q.
Scores choose what to prune, each on its own; the update then removes ALL the weights pruned in a
block jointly by the closed form above (F⁻¹ is block-diagonal, so blocks are independent).

Remaining weights (the k recomputations). Once the set P is pruned, the model lives on the kept
coordinates R, whose inverse Fisher is (F_RR)⁻¹, the Schur complement of [F⁻¹]_PP in F⁻¹:
    (F_RR)⁻¹ = [F⁻¹]_RR - [F⁻¹]_RP ([F⁻¹]_PP)⁻¹ [F⁻¹]_PR
(from F⁻¹ F = I written by blocks). `restrict_fisher_inverse` stores it as a full B × B block with the
rows and columns of P replaced by the identity (decoupled, so every formula above keeps working). A
pruning step to sparsity s then runs in k increments: score with the current weights and restricted
inverse, prune to the next of k evenly spaced counts, update, restrict. Sequential constrained minima
of one quadratic compose, so the final weights are the joint closed form for the final set applied to
the starting weights; what the increments change is which weights are chosen. The paper instead
recollects gradients at each increment (the weights have moved); a trainer can do that through
`refresh`.

Both the update and the restriction solve with [F⁻¹]_SS for a set S that differs from block to block;
they are batched by solving, per block, the B × B system that equals [F⁻¹]_SS on S and the identity
elsewhere, with a right-hand side that is zero outside S. Masks are True where a weight is KEPT.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import check_sparsity, prune_lowest, pruned_count

# Temporaries of the batched solves stay under this many elements (a chunk of blocks at a time).
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class FisherInverse:
    """Block-diagonal inverse of the dampened empirical Fisher of one weight tensor: its flattened
    `numel` elements in blocks of B consecutive ones, the last block padded with coordinates that
    never carry a gradient (decoupled from the rest)."""

    blocks: Tensor  # [n_blocks, B, B], symmetric positive definite
    numel: int

    def __post_init__(self):
        if self.blocks.dim() != 3 or self.blocks.shape[1] != self.blocks.shape[2]:
            raise ValueError(f"blocks must have shape [n_blocks, B, B], got {tuple(self.blocks.shape)}")
        n_blocks, size = self.blocks.shape[:2]
        if not (n_blocks - 1) * size < self.numel <= n_blocks * size:
            raise ValueError(f"{n_blocks} blocks of {size} do not cover {self.numel} weights with one padded block")

    @property
    def block_size(self) -> int:
        return self.blocks.shape[-1]

    def diagonal(self) -> Tensor:
        """[F⁻¹]_qq of every weight, [numel]."""
        return self.blocks.diagonal(dim1=-2, dim2=-1).reshape(-1)[: self.numel]


class FisherInverseBuilder:
    """Streams m gradient samples of one weight tensor into the block-diagonal inverse of
    λI + (1/m) Σ g gᵀ (m is needed up front: it scales each update), `chunk` samples per rank-k
    Woodbury update (chunk = 1: one Sherman-Morrison update per sample). Memory: the d·B numbers of
    the inverse and `chunk` padded gradients waiting for their update."""

    def __init__(
        self,
        numel: int,
        num_grads: int,
        block_size: int = 50,
        damp: float = 1e-7,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        chunk: int = 16,
    ):
        if numel < 1 or num_grads < 1 or block_size < 1 or chunk < 1:
            raise ValueError(f"need numel, num_grads, block_size and chunk >= 1, got {numel}, {num_grads}, "
                             f"{block_size}, {chunk}")
        if not (math.isfinite(damp) and damp > 0):
            raise ValueError(f"damp must be a positive number, got {damp!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        size = min(block_size, numel)  # a block larger than the tensor would only hold padding
        n_blocks = -(-numel // size)
        self.numel, self.num_grads, self.count = numel, num_grads, 0
        self.blocks = torch.eye(size, dtype=dtype, device=device).div_(damp).repeat(n_blocks, 1, 1)
        # gradients waiting for their update, one per column: [n_blocks, B, chunk], padding stays 0
        self._pending = torch.zeros(n_blocks, size, min(chunk, num_grads), dtype=dtype, device=device)
        self._waiting = 0

    def add(self, grads: Tensor) -> None:
        """Add a chunk of gradient samples: [k, *weight.shape], [k, numel] or one gradient."""
        if grads.numel() % self.numel:
            raise ValueError(f"gradients of {self.numel} elements expected, got shape {tuple(grads.shape)}")
        grads = grads.reshape(-1, self.numel)
        if not len(grads):
            return
        if self.count + len(grads) > self.num_grads:
            raise ValueError(f"{self.count + len(grads)} gradients added to a Fisher of {self.num_grads}")
        if not (grads.amin().isfinite() and grads.amax().isfinite()):
            raise ValueError("gradient contains NaN or Inf")
        flat = self._pending.view(-1, self._pending.shape[-1])  # [n_blocks * B, chunk]
        for g in grads:
            flat[: self.numel, self._waiting] = g
            self._waiting += 1
            if self._waiting == self._pending.shape[-1]:
                self._update()
        self.count += len(grads)
        if self.count == self.num_grads:
            self._update()

    def _update(self) -> None:
        """The rank-k Woodbury update with the waiting gradients (module docstring)."""
        if self._waiting:
            self._woodbury(self._pending[..., : self._waiting])
        self._waiting = 0

    def _woodbury(self, G: Tensor) -> None:
        k = G.shape[-1]
        V = torch.bmm(self.blocks, G)  # F⁻¹ G, [n_blocks, B, k]
        S = torch.baddbmm(torch.eye(k, dtype=G.dtype, device=G.device).mul_(self.num_grads),
                          G.transpose(1, 2), V)  # m I + Gᵀ F⁻¹ G, eigenvalues >= m
        L, info = torch.linalg.cholesky_ex(S)
        if k > 1 and bool(info.any()):  # rounding broke a k x k factorization: one gradient at a time
            for column in range(k):
                self._woodbury(G[..., column : column + 1])
            return
        U = torch.linalg.solve_triangular(L.transpose(1, 2), V, upper=True, left=False)  # V L⁻ᵀ
        self.blocks.baddbmm_(U, U.transpose(1, 2), alpha=-1)

    def result(self) -> FisherInverse:
        """The inverse, once all m gradients are in (it shares memory with the builder)."""
        if self.count != self.num_grads:
            raise ValueError(f"the Fisher expects {self.num_grads} gradients, {self.count} were added")
        return FisherInverse(self.blocks, self.numel)


def fisher_inverse(
    grads: Tensor, block_size: int = 50, damp: float = 1e-7, dtype: torch.dtype = torch.float32, chunk: int = 16
) -> FisherInverse:
    """Block-diagonal inverse of λI + (1/m) Σ g gᵀ from all m gradients at once, [m, *weight.shape]."""
    if grads.dim() < 2 or not len(grads):
        raise ValueError(f"gradients must have shape [m, *weight.shape] with m >= 1, got {tuple(grads.shape)}")
    builder = FisherInverseBuilder(grads[0].numel(), len(grads), block_size, damp, dtype, grads.device, chunk)
    builder.add(grads)
    return builder.result()


def obert_scores(weight: Tensor, fisher: FisherInverse, keep: Tensor | None = None, unit: int = 1) -> Tensor:
    """ρ of every unit of `unit` consecutive weights of a row: w_q² / (2 [F⁻¹]_qq) for unit 1,
    ½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q otherwise. Shape: weight.shape with the last dim divided by unit, in the
    inverse's dtype. Units already pruned (not in keep) score -inf, so any selection keeps them."""
    _check_layer(weight, fisher, unit)
    w = _padded(weight.flatten(), fisher)
    units = fisher.numel // unit
    if unit == 1:
        scores = w[: fisher.numel].square() / (2 * fisher.diagonal())
    else:
        n_blocks, size = fisher.blocks.shape[:2]
        per_block = size // unit
        # the unit × unit diagonal blocks of every Fisher block, [n_blocks, B/unit, unit, unit]
        diagonal = fisher.blocks.reshape(n_blocks, per_block, unit, per_block, unit).diagonal(dim1=1, dim2=3)
        system = diagonal.permute(0, 3, 1, 2).reshape(-1, unit, unit)[:units]
        w_units = w.view(-1, unit, 1)[:units]
        scores = (w_units * _spd_solve(system, w_units)).sum(dim=(1, 2)) / 2
    if keep is not None:
        scores = scores.masked_fill(~_unit_keep(keep, weight, unit), -math.inf)
    return scores.reshape(*weight.shape[:-1], weight.shape[-1] // unit)


def obert_update(weight: Tensor, fisher: FisherInverse, keep: Tensor) -> tuple[Tensor, float]:
    """Prune every weight not in `keep` jointly: w + δ with δ = -F⁻¹ E_S ([F⁻¹]_SS)⁻¹ w_S for the
    pruned set S of each block; returns the new weight (dtype of weight, exact zeros on S) and the
    predicted loss increase Σ_blocks ½ w_Sᵀ ([F⁻¹]_SS)⁻¹ w_S."""
    _check_layer(weight, fisher, 1)
    _unit_keep(keep, weight, 1)
    n_blocks, size = fisher.blocks.shape[:2]
    w = _padded(weight.flatten(), fisher).view(n_blocks, size)
    pruned = ~_padded(keep.flatten(), fisher, fill=True).view(n_blocks, size)
    loss = 0.0
    for part in _chunks(fisher):
        # a block whose pruned weights are all 0 already (pruned before) has x = 0 exactly: only the
        # blocks with a weight still to remove are solved (late in a gradual schedule, a minority)
        active = (pruned[part] & (w[part] != 0)).any(1)
        if not bool(active.any()):
            continue
        inverse, rows = fisher.blocks[part][active], w[part][active]
        x = _solve_on(inverse, pruned[part][active], rows[:, :, None])  # ([F⁻¹]_SS)⁻¹ w_S, zero off S
        loss += (rows[:, :, None] * x).sum().item() / 2
        w[part.start + active.nonzero().flatten()] = rows - torch.bmm(inverse, x).squeeze(2)
    w = w.flatten()[: fisher.numel].masked_fill(~keep.flatten(), 0)
    return w.to(weight.dtype).reshape(weight.shape), loss


def restrict_fisher_inverse(fisher: FisherInverse, keep: Tensor) -> FisherInverse:
    """The inverse Fisher of the kept weights, (F_RR)⁻¹ = [F⁻¹]_RR - [F⁻¹]_RP ([F⁻¹]_PP)⁻¹ [F⁻¹]_PR
    (P pruned, R kept), with the identity on the pruned rows and columns. A new tensor."""
    if keep.numel() != fisher.numel or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor of {fisher.numel} elements")
    return FisherInverse(_restrict_(fisher.blocks.clone(), fisher, keep.flatten()), fisher.numel)


@dataclass
class OBertResult:
    weights: list[Tensor]  # pruned and updated, dtype of each input weight
    masks: list[Tensor]  # bool, True where kept, shape of each weight
    loss: float  # predicted loss increase, summed over layers and increments


def obert_prune(
    weights: Sequence[Tensor],
    fishers: Sequence[FisherInverse],
    sparsity: float,
    *,
    keeps: Sequence[Tensor] | None = None,
    unit: int = 1,
    scope: str = "global",
    recomputations: int = 1,
    refresh: Callable[[list[Tensor], list[Tensor]], Sequence[FisherInverse]] | None = None,
    in_place: bool = False,
) -> OBertResult:
    """One oBERT pruning step of several layers to `sparsity`, counted in units of `unit`
    consecutive weights of a row (1: unstructured).

    - scope "global": one threshold over the scores of all layers, exactly round(s · all units)
      pruned in total; "layer": exactly round(s · units) in every layer.
    - keeps: masks of weights pruned before (they stay pruned and are set to 0; a layer already
      sparser than the target keeps its mask). Whole units must be pruned.
    - recomputations k: prune in k increments to evenly spaced counts, scoring each with the current
      weights and the inverse Fisher of the remaining weights (Schur-complement restriction), or
      with `refresh(weights, masks)` when given: new inverses (e.g. from new gradients) for
      increments 2..k, restricted in place to the current masks.
    - in_place: restrict the given inverses in place instead of copies (saves d·B per layer).
    """
    if len(weights) != len(fishers) or not weights:
        raise ValueError(f"need one FisherInverse per weight, got {len(weights)} weights, {len(fishers)} inverses")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if recomputations < 1:
        raise ValueError(f"recomputations must be >= 1, got {recomputations}")
    sparsity = check_sparsity(sparsity)
    for weight, fisher in zip(weights, fishers):
        _check_layer(weight, fisher, unit)
    if keeps is None:
        keeps = [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in weights]
    elif len(keeps) != len(weights):
        raise ValueError(f"need one keep mask per weight, got {len(keeps)} for {len(weights)} weights")
    keeps = [_expand(_unit_keep(keep, weight, unit), weight) for keep, weight in zip(keeps, weights)]
    current = [w.to(f.blocks.dtype).masked_fill(~keep, 0) for w, f, keep in zip(weights, fishers, keeps)]
    fishers = list(fishers)
    if not in_place and ((recomputations > 1 and refresh is None) or not all(k.all() for k in keeps)):
        fishers = [FisherInverse(f.blocks.clone(), f.numel) for f in fishers]  # restricted below

    units = [w.numel() // unit for w in weights]
    start = [units_l - int(keep.sum()) // unit for units_l, keep in zip(units, keeps)]
    if scope == "layer":
        targets = [max(pruned_count(sparsity, n), a) for n, a in zip(units, start)]
    else:
        targets = [max(pruned_count(sparsity, sum(units)), sum(start))]
        start = [sum(start)]

    loss = 0.0
    for step in range(1, recomputations + 1):
        if step > 1 and refresh is not None:
            snapshot = [w.to(o.dtype, copy=True) for w, o in zip(current, weights)]
            fishers = list(refresh(snapshot, [k.clone() for k in keeps]))
            for weight, fisher in zip(weights, fishers):
                _check_layer(weight, fisher, unit)
        if step == 1 or refresh is not None:
            for fisher, keep in zip(fishers, keeps):
                if not keep.all():
                    _restrict_(fisher.blocks, fisher, keep.flatten())

        scores = [obert_scores(w, f, keep, unit).flatten() for w, f, keep in zip(current, fishers, keeps)]
        counts = [a + pruned_count(step / recomputations, t - a) for a, t in zip(start, targets)]
        if scope == "layer":
            unit_keeps = [prune_lowest(s, c) for s, c in zip(scores, counts)]
        else:
            unit_keeps = prune_lowest(torch.cat(scores), counts[0]).split(units)
        keeps = [_expand(k, w) for k, w in zip(unit_keeps, weights)]

        for layer, (fisher, keep) in enumerate(zip(fishers, keeps)):
            current[layer], layer_loss = obert_update(current[layer], fisher, keep)
            loss += layer_loss
            if step < recomputations and refresh is None:
                _restrict_(fisher.blocks, fisher, keep.flatten())
    return OBertResult([w.to(o.dtype) for w, o in zip(current, weights)], keeps, loss)


def _check_layer(weight: Tensor, fisher: FisherInverse, unit: int) -> None:
    if fisher.numel != weight.numel():
        raise ValueError(f"a FisherInverse of {fisher.numel} weights for a weight of shape {tuple(weight.shape)}")
    if unit < 1 or weight.dim() == 0 or weight.shape[-1] % unit or fisher.block_size % unit:
        raise ValueError(
            f"unit {unit} must divide the row length and the Fisher block size, got shape {tuple(weight.shape)}"
            f" and blocks of {fisher.block_size}"
        )


def _unit_keep(keep: Tensor, weight: Tensor, unit: int) -> Tensor:
    """The flat keep mask of the units [numel / unit] (a unit is kept or pruned as a whole)."""
    if keep.shape != weight.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor of shape {tuple(weight.shape)}")
    units = keep.reshape(-1, unit)
    if not (units.all(dim=1) | ~units.any(dim=1)).all():
        raise ValueError(f"keep prunes part of a unit of {unit} weights")
    return units[:, 0]


def _expand(unit_keep: Tensor, weight: Tensor) -> Tensor:
    """The keep mask of the weights, shape of weight, from that of its units."""
    return unit_keep.repeat_interleave(weight.numel() // unit_keep.numel()).view(weight.shape)


def _padded(flat: Tensor, fisher: FisherInverse, fill: bool | float = 0) -> Tensor:
    """flat [numel] padded to n_blocks · B, in the inverse's dtype (bool stays bool). A new tensor."""
    dtype = torch.bool if flat.dtype == torch.bool else fisher.blocks.dtype
    out = torch.full((fisher.blocks.shape[0] * fisher.block_size,), fill, dtype=dtype, device=flat.device)
    out[: fisher.numel] = flat
    return out


def _chunks(fisher: FisherInverse) -> list[slice]:
    n_blocks, size = fisher.blocks.shape[:2]
    step = max(1, _CHUNK_ELEMENTS // (size * size))
    return [slice(i, i + step) for i in range(0, n_blocks, step)]


def _spd_solve(system: Tensor, rhs: Tensor) -> Tensor:
    """Batched solve of symmetric positive definite systems; LU where rounding broke Cholesky."""
    factor, info = torch.linalg.cholesky_ex(system)
    if bool(info.any()):
        return torch.linalg.solve(system, rhs)
    return torch.cholesky_solve(rhs, factor)


def _solve_on(inverse: Tensor, selected: Tensor, rhs: Tensor) -> Tensor:
    """Per block, x = E_S ([F⁻¹]_SS)⁻¹ E_Sᵀ rhs for the set S = selected [c, B]: solves the system
    equal to F⁻¹ on S × S and to the identity elsewhere (no coupling, so x is exactly 0 off S)."""
    size = inverse.shape[-1]
    both = selected[:, :, None] & selected[:, None, :]
    system = torch.where(both, inverse, torch.eye(size, dtype=inverse.dtype, device=inverse.device))
    return _spd_solve(system, rhs * selected[:, :, None])


def _restrict_(blocks: Tensor, fisher: FisherInverse, keep: Tensor) -> Tensor:
    """In place on blocks (those of `fisher`, or a copy): the Schur complement that removes the
    pruned coordinates, then identity rows and columns on them. Padding counts as kept."""
    n_blocks, size = blocks.shape[:2]
    pruned = ~_padded(keep, fisher, fill=True).view(n_blocks, size)
    eye = torch.eye(size, dtype=blocks.dtype, device=blocks.device)
    for part in _chunks(fisher):
        inverse, removed = blocks[part], pruned[part]
        # Only blocks where a removed coordinate is coupled to a kept one need the solve: elsewhere
        # [F⁻¹]_RP = 0 and the Schur complement is [F⁻¹]_RR exactly (a Fisher of masked gradients
        # is such, so a gradual step mostly skips it).
        coupled = (inverse.ne(0) & removed[:, :, None] & ~removed[:, None, :]).flatten(1).any(1)
        if bool(coupled.any()):
            sub = inverse[coupled]
            inverse[coupled] = sub - torch.bmm(sub, _solve_on(sub, removed[coupled], sub))
        decoupled = removed[:, :, None] | removed[:, None, :]
        blocks[part] = torch.where(decoupled, eye, inverse)
    return blocks
