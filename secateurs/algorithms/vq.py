"""Additive multi-codebook vector quantization (AQLM: Egiazarian et al., 2024) on (W, H).

Each output row i of W [rows, cols] is cut into groups of g consecutive inputs; group j of row i
is coded as a sum of one codeword from each of M codebooks C_m [2**B, g], times a per-row scale:

    W_hat[i, group j] = s_i * sum_m C_m[codes[i, j, m]] .

The codes, codebooks and scales minimize the layer's output error on the calibration inputs,

    loss = 1/2 * tr((W - W_hat) H (W - W_hat)^T),   H = 2 X X^T / n   (the house's convention),

by residual k-means initialization of the codebooks, codes from a GPTQ-style sweep with error
feedback (vq_sweep.py), then alternating a beam search over the codes (codebooks and scales fixed)
with Adam steps on the codebooks and scales (codes fixed). Both halves only accept
a change that does not raise the loss, so the trajectory never goes up.

Scaling: nothing bigger than O(rows * cols + groups * 2**B) is built per step (times the beam);
the Hessian enters only through products (W - W_hat) H of row blocks of `row_block` rows, and the
beam search never multiplies by H again for a candidate, see `_beam_search`.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .hessian import work_dtype
from .kmeans import nearest_centers, weighted_kmeans
from .vq_sweep import error_feedback_codes

# Adam's usual constants; written out (a few lines) because torch.optim's first use imports
# torch._dynamo, seconds on a small machine, and the gradients here need no autograd.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class VQSpec:
    codebooks: int = 2  # M
    bits: int = 8  # B: each codebook holds 2**B codewords
    group_size: int = 8  # g consecutive inputs of a row per code

    def __post_init__(self):
        for name, low, high in (("codebooks", 1, 16), ("bits", 1, 16), ("group_size", 1, 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")

    @property
    def codewords(self) -> int:
        return 2**self.bits


@dataclass(frozen=True)
class VQBits:
    """Storage of one VQ layer, in bits: what a file must hold to rebuild W_hat."""

    codes: int  # rows * (cols / g) * M codes of B bits
    codebooks: int  # M * 2**B * g values
    scales: int  # one per output row
    weights: int  # rows * cols

    @property
    def total(self) -> int:
        return self.codes + self.codebooks + self.scales

    @property
    def per_weight(self) -> float:
        return self.total / self.weights


def vq_bits(rows: int, cols: int, spec: VQSpec, value_bits: int = 16) -> VQBits:
    """Honest bit count of a [rows, cols] layer: codes + codebooks + scales (fp16 by default)."""
    _check_width(cols, spec)
    return VQBits(
        codes=rows * (cols // spec.group_size) * spec.codebooks * spec.bits,
        codebooks=spec.codebooks * spec.codewords * spec.group_size * value_bits,
        scales=rows * value_bits,
        weights=rows * cols,
    )


@dataclass
class VQResult:
    weight: Tensor  # W_hat [rows, cols], dtype of W
    codes: Tensor  # int32 [rows, cols // g, M], each in [0, 2**B - 1]
    codebooks: Tensor  # [M, 2**B, g], float64 if W is float64 else float32
    scales: Tensor  # [rows], same dtype as codebooks
    loss: float  # 1/2 tr((W - W_hat) H (W - W_hat)^T) of the returned codes, codebooks, scales
    losses: list[float]  # after the init, each beam search and each Adam phase (then rounding, last search)
    rounds: int  # alternations run


def vq_reconstruct(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """W_hat [rows, cols] = scales[i] * sum_m codebooks[m, codes[i, j, m]], groups laid side by side."""
    return (scales[:, None, None] * _sum_codewords(codes, codebooks)).flatten(1)


def vq_loss(W: Tensor, W_hat: Tensor, H: Tensor, row_block: int = 1024) -> float:
    """1/2 tr((W - W_hat) H (W - W_hat)^T), computed by blocks of rows (in float64 if W is)."""
    dtype = work_dtype(W, H)
    return _row_losses(W.to(dtype) - W_hat.to(dtype), H.to(dtype), row_block).sum().item()


def vq(
    W: Tensor,
    H: Tensor,
    spec: VQSpec = VQSpec(),
    *,
    beam: int = 1,
    rounds: int = 30,
    adam_steps: int = 20,
    lr: float = 3e-3,
    tol: float = 1e-3,
    init: str = "sweep",
    kmeans_iters: int = 20,
    seed: int = 0,
    row_block: int = 1024,
    round_to: torch.dtype | None = None,
    codebooks: Tensor | None = None,
) -> VQResult:
    """Code W [rows, cols] with `spec`, minimizing 1/2 tr(dW H dW^T), H [cols, cols] symmetric PSD.

    init: "sweep" (the default: "kmeans" codebooks and scales, with codes from the error-feedback
    sweep of vq_sweep.py, which on an image UNet's layers halved the loss the alternation reached
    from "kmeans" codes), "kmeans" (residual k-means++ per codebook on the rows divided by their
    RMS, distances weighted by diag(H), each group its nearest codewords, see `_initialize`) or
    "random" (Gaussian codebooks of the same spread, the baseline it is measured against). Then up to
    `rounds` alternations of a beam search over the codes (`beam` hypotheses per row) and
    `adam_steps` Adam steps on codebooks and scales (learning rate `lr` for the codebooks, `lr`
    times the mean scale for the scales, so both move by about the same relative amount), until an
    alternation improves the loss by less than `tol` relative. Deterministic given `seed`.
    Computes in float64 if W or H is float64, else float32. With `round_to` (torch.float16 for the
    files), the codebooks and scales are then rounded to that dtype and the codes searched once
    more for the rounded values, so what is stored reproduces the returned W_hat exactly.
    With `codebooks` [M, 2**B, g] given (codebooks shared by several layers, see `shared_codebooks`)
    they stay fixed: only the codes and the row scales are fitted (init: the same, from them).
    """
    rows, cols = W.shape
    _check_width(cols, spec)
    if H.shape != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) to match W, got {tuple(H.shape)}")
    if beam < 1 or rounds < 0 or adam_steps < 0 or row_block < 1 or lr <= 0 or tol < 0:
        raise ValueError(f"need beam, row_block >= 1, rounds, adam_steps >= 0, lr > 0, tol >= 0; got {beam}, {row_block}, {rounds}, {adam_steps}, {lr}, {tol}")
    if init not in ("sweep", "kmeans", "random"):
        raise ValueError(f"init must be 'sweep', 'kmeans' or 'random', got {init!r}")
    if codebooks is not None and codebooks.shape != (spec.codebooks, spec.codewords, spec.group_size):
        raise ValueError(f"codebooks must have shape {(spec.codebooks, spec.codewords, spec.group_size)} for {spec}, "
                         f"got {tuple(codebooks.shape)}")
    fixed = codebooks
    dtype = work_dtype(W, H)
    W = W.to(dtype)
    # Only the symmetric part of H is in the objective, and the beam search's update needs H = H^T.
    H = H.to(dtype)
    H = (H + H.T) / 2
    generator = torch.Generator().manual_seed(seed)

    codes, codebooks, scales = _initialize(W, H, spec, "random" if init == "random" else "kmeans", kmeans_iters,
                                           generator, None if fixed is None else fixed.to(dtype))
    row_losses = _row_losses(W - vq_reconstruct(codes, codebooks, scales), H, row_block)
    if init == "sweep":
        swept = error_feedback_codes(W, H, codebooks, scales).to(codes.dtype)
        swept_losses = _row_losses(W - vq_reconstruct(swept, codebooks, scales), H, row_block)
        # kept if the layer's loss is lower (by far on correlated inputs; about a tie on white ones)
        if swept_losses.sum() < row_losses.sum():
            codes, row_losses = swept, swept_losses
    losses = [row_losses.sum().item()]
    done = 0
    for done in range(1, rounds + 1):
        start = losses[-1]
        codes, row_losses = _improve_codes(W, H, codes, codebooks, scales, row_losses, beam, row_block)
        losses.append(row_losses.sum().item())
        codebooks, scales, row_losses = _adam(W, H, codes, codebooks, scales, row_losses, adam_steps, lr, row_block,
                                              train_codebooks=fixed is None)
        losses.append(row_losses.sum().item())
        if start <= 0 or start - losses[-1] <= tol * start:
            break
    if round_to is not None:
        if fixed is None:
            codebooks = codebooks.to(round_to).to(dtype)
        scales = scales.to(round_to).to(dtype)
        row_losses = _row_losses(W - vq_reconstruct(codes, codebooks, scales), H, row_block)
        losses.append(row_losses.sum().item())
        codes, row_losses = _improve_codes(W, H, codes, codebooks, scales, row_losses, beam, row_block)
        losses.append(row_losses.sum().item())
    weight = vq_reconstruct(codes, codebooks, scales)
    return VQResult(weight.to(W.dtype), codes.int(), codebooks, scales, losses[-1], losses, done)


def _check_width(cols: int, spec: VQSpec):
    if cols % spec.group_size:
        raise ValueError(f"the input width {cols} must be a multiple of the group size {spec.group_size}")


def _sum_codewords(codes: Tensor, codebooks: Tensor) -> Tensor:
    """[rows, groups, g]: the unscaled sum of each group's codewords."""
    total = codebooks[0][codes[..., 0].long()]
    for m in range(1, codebooks.shape[0]):
        total += codebooks[m][codes[..., m].long()]
    return total


def _products(delta: Tensor, H: Tensor, row_block: int) -> Tensor:
    """delta @ H, one block of rows at a time."""
    out = torch.empty_like(delta)
    for start in range(0, delta.shape[0], row_block):
        torch.mm(delta[start : start + row_block], H, out=out[start : start + row_block])
    return out


def _row_losses(delta: Tensor, H: Tensor, row_block: int) -> Tensor:
    """[rows]: 1/2 delta_i H delta_i^T, one block of rows at a time."""
    return torch.cat([
        (delta[start : start + row_block] @ H * delta[start : start + row_block]).sum(1) / 2
        for start in range(0, delta.shape[0], row_block)
    ])


# ----------------------------------------------------------------------------- initialization


def _initialize(W: Tensor, H: Tensor, spec: VQSpec, init: str, iters: int, generator: torch.Generator,
                given: Tensor | None = None):
    """Codes, codebooks and scales before the first alternation (`given` codebooks: kept as they are).

    Scales are the rows' RMS (1 for an all-zero row), so the groups of W / s are on one footing;
    codebook m is fitted to the residual the codebooks before it leave, and each group takes the
    codeword nearest its residual. "Nearest" is in the diagonal of the loss: coordinate t of a
    group of row i weighs H_tt s_i^2 (what an error there costs in 1/2 dW H dW^T, cross terms left
    to the search). Against plain Euclidean k-means on SmolLM2's layer 5, one seed each: q_proj
    ends 10% (2x8) and 7% (3x8) lower; down_proj ends the same (2x8) and 6% higher (3x8).
    """
    rows, cols = W.shape
    g, M, K = spec.group_size, spec.codebooks, spec.codewords
    scales, groups, weights = _row_groups(W, H.diagonal(), g)
    spread = groups.std() / math.sqrt(M) if groups.numel() > 1 else groups.new_tensor(1.0)

    def codebook(m: int, residual: Tensor) -> Tensor:
        if given is not None:
            return given[m]
        if init == "kmeans":
            return weighted_kmeans(residual, weights, K, iters, generator)
        return spread * torch.randn(K, g, generator=generator, dtype=W.dtype)

    codebooks, codes = _residual_fit(groups, weights, M, codebook)
    return codes.reshape(rows, cols // g, M), codebooks, scales


def _row_groups(W: Tensor, diagonal: Tensor, g: int) -> tuple[Tensor, Tensor, Tensor]:
    """(scales [rows]: the rows' RMS, 1 for an all-zero row; the groups [rows * cols / g, g] of
    W / scales; their weights: coordinate t of a group of row i weighs diagonal[t] * s_i^2,
    normalized to mean 1, or all 1 where they are all 0)."""
    scales = W.square().mean(1).sqrt()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    weights = diagonal.clamp(min=0)[None, :] * scales[:, None].square()
    mean = weights.mean()
    weights = weights / mean if mean > 0 else torch.ones_like(weights)
    return scales, (W / scales[:, None]).reshape(-1, g), weights.reshape(-1, g)


def _residual_fit(groups: Tensor, weights: Tensor, books: int, codebook) -> tuple[Tensor, Tensor]:
    """Residual coding: codebook m = codebook(m, the residual the codebooks before it leave), each
    group taking its nearest codeword (under `weights`); returns codebooks [books, K, g] and the
    codes [groups, books]."""
    codebooks, codes = [], torch.empty(groups.shape[0], books, dtype=torch.long)
    residual = groups
    for m in range(books):
        codebooks.append(codebook(m, residual))
        codes[:, m] = nearest_centers(residual, weights, codebooks[m])
        residual = residual - codebooks[m][codes[:, m]]
    return torch.stack(codebooks), codes


def shared_codebooks(weights: list[Tensor], spec: VQSpec, importances: list[Tensor | None] | None = None, *,
                     kmeans_iters: int = 20, seed: int = 0, max_groups: int = 1 << 18) -> Tensor:
    """Codebooks [M, 2**B, g] (float32, or float64 if any weight is) for several layers at once: a
    file stores them once, so on small layers they cost a fraction of per-layer codebooks.

    Residual k-means as `_initialize` fits one layer's, on the groups of every layer's rows divided
    by their RMS (the scales `vq` starts from), coordinate t of a row weighted by its layer's
    importance[t] (diag(H); None: 1) times the row's scale squared, normalized to mean 1 per layer so
    that each layer counts by its number of groups; at most `max_groups` groups, a seeded random
    subset beyond. Pass the result to `vq(..., codebooks=...)` for each layer.
    """
    if not weights:
        raise ValueError("shared_codebooks needs at least one weight")
    importances = importances or [None] * len(weights)
    if len(importances) != len(weights):
        raise ValueError(f"{len(importances)} importances for {len(weights)} weights")
    dtype = torch.float64 if any(W.dtype == torch.float64 for W in weights) else torch.float32
    groups, group_weights = [], []
    for W, importance in zip(weights, importances):
        _check_width(W.shape[1], spec)
        diagonal = torch.ones(W.shape[1], dtype=dtype) if importance is None else importance.to(dtype)
        _, layer_groups, layer_weights = _row_groups(W.to(dtype), diagonal, spec.group_size)
        groups.append(layer_groups)
        group_weights.append(layer_weights)
    points, point_weights = torch.cat(groups), torch.cat(group_weights)
    generator = torch.Generator().manual_seed(seed)
    if points.shape[0] > max_groups:
        subset = torch.randperm(points.shape[0], generator=generator)[:max_groups]
        points, point_weights = points[subset], point_weights[subset]
    codebooks, _ = _residual_fit(points, point_weights, spec.codebooks,
                                 lambda m, residual: weighted_kmeans(residual, point_weights, spec.codewords,
                                                                     kmeans_iters, generator))
    return codebooks


# ----------------------------------------------------------------------------- codes


def beam_search_codes(
    W: Tensor, H: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, beam: int = 1, row_block: int = 1024
) -> Tensor:
    """Codes [rows, groups, M] (int64) improving `codes` for 1/2 tr(dW H dW^T), codebooks and scales
    fixed: one beam search per row (see `_beam_search`), blocks of `row_block` rows at a time.
    W, H, codebooks and scales must share one floating dtype and H must be symmetric."""
    return torch.cat([
        _beam_search(W[start : start + row_block], H, codes[start : start + row_block], codebooks, scales[start : start + row_block], beam)
        for start in range(0, W.shape[0], row_block)
    ])


def _improve_codes(W, H, codes, codebooks, scales, row_losses, beam, row_block):
    """Beam search per row; each row keeps its old codes unless the new ones lose no more (exactly
    recomputed, so rounding in the search's running sums can never raise the loss)."""
    new_codes = beam_search_codes(W, H, codes, codebooks, scales, beam, row_block)
    new_losses = _row_losses(W - vq_reconstruct(new_codes, codebooks, scales), H, row_block)
    better = new_losses <= row_losses
    return torch.where(better[:, None, None], new_codes, codes), torch.where(better, new_losses, row_losses)


def _beam_search(W: Tensor, H: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, beam: int) -> Tensor:
    """New codes [R, groups, M] for a block of R rows, codebooks and scales fixed.

    The positions (group j, codebook m) are visited in order, groups outer; at each one every
    hypothesis of a row (a full row of codes; at first only the current codes) is extended by each
    of the 2**B codewords and the `beam` best (hypothesis, codeword) pairs of the row survive.
    Keeping the current codeword reproduces the hypothesis's loss exactly, so the best hypothesis
    never gets worse. With beam = 1 this is exact coordinate descent, one codeword at a time.

    The key to doing this at scale: each hypothesis carries its error d = w - w_hat [cols] AND its
    product G = d H [cols]. Replacing codeword c_old by c_k in group j changes w_hat by
    delta = s (c_k - c_old) on the g inputs of group j only, so with H symmetric

        1/2 (d - delta) H (d - delta)^T = L - delta . G[j] + 1/2 delta H_jj delta^T ,

    where G[j] (the g entries of G in group j) holds both the group's own g x g block and all its
    cross terms with the rest of the row, and H_jj is the group's g x g diagonal block. For all
    2**B candidates at once this is two [g, 2**B] products (c_k . G[j] and c_k H_jj c_old) plus the
    per-codebook constants c_k H_jj c_k^T: O(2**B g) per hypothesis instead of O(cols^2). Only the
    winner updates the carried state: d[j] -= delta and G -= delta H[j, :] (O(g cols)).
    """
    R, groups, M = codes.shape
    K, g = codebooks.shape[1], codebooks.shape[2]
    cols = groups * g
    hypotheses = codes.long()[:, None].expand(R, beam, groups, M).clone()
    delta = (W - vq_reconstruct(codes, codebooks, scales))[:, None].expand(R, beam, cols).clone()
    G = delta @ H
    # Only the current codes are a hypothesis at first; the others enter as the search finds them.
    loss = torch.full((R, beam), math.inf, dtype=W.dtype)
    loss[:, 0] = (delta[:, 0] * G[:, 0]).sum(1) / 2
    s = scales[:, None, None]
    rows = torch.arange(R)[:, None]
    for j in range(groups):
        inputs = slice(j * g, (j + 1) * g)
        H_jj, H_j = H[inputs, inputs], H[inputs]
        for m in range(M):
            C = codebooks[m]
            CH = C @ H_jj  # [K, g]
            old = hypotheses[:, :, j, m]  # [R, beam]
            c_old = C[old]
            linear = G[:, :, inputs] @ C.T  # [R, beam, K]: c_k . G[j]
            quadratic = (CH * C).sum(1) - 2 * (c_old @ CH.T)  # c_k H_jj c_k - 2 c_k H_jj c_old
            # Measured against the current codeword so that keeping it changes the loss by exactly 0.
            linear = linear - linear.gather(2, old[..., None])
            quadratic = quadratic - quadratic.gather(2, old[..., None])
            candidates = loss[..., None] - s * linear + (s * s / 2) * quadratic
            loss, best = candidates.flatten(1).topk(beam, dim=1, largest=False)
            parent, new = best // K, best % K
            if beam > 1:
                hypotheses, delta, G, c_old = hypotheses[rows, parent], delta[rows, parent], G[rows, parent], c_old[rows, parent]
            hypotheses[:, :, j, m] = new
            change = s * (C[new] - c_old)  # [R, beam, g]
            delta[:, :, inputs] -= change
            G -= change @ H_j
    return hypotheses[torch.arange(R), loss.argmin(1)]


# ----------------------------------------------------------------------------- codebooks and scales


def vq_gradients(
    W: Tensor, H: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, row_block: int = 1024
) -> tuple[Tensor, Tensor, Tensor]:
    """Row losses [rows] of L = 1/2 tr(dW H dW^T), dL/dcodebooks [M, 2**B, g] and dL/dscales [rows],
    codes fixed; one product with H per block of rows, no autograd graph. With D = (W - W_hat) H:
    dL/dW_hat = -D; dL/dC_m[k] = sum over the (i, j) that codebook m codes k of s_i dL/dW_hat[i, j];
    dL/ds_i = sum_j dL/dW_hat[i, j] . sum_m C_m[codes[i, j, m]]."""
    rows, groups, M = codes.shape
    g = codebooks.shape[2]
    parts = _sum_codewords(codes, codebooks)
    delta = W - (scales[:, None, None] * parts).flatten(1)
    D = _products(delta, H, row_block)
    grad_w_hat = -D.reshape(rows, groups, g)
    weighted = (scales[:, None, None] * grad_w_hat).reshape(-1, g)
    grad_codebooks = torch.stack([
        torch.zeros_like(codebooks[m]).index_add_(0, codes[..., m].reshape(-1).long(), weighted) for m in range(M)
    ])
    return (D * delta).sum(1) / 2, grad_codebooks, (grad_w_hat * parts).sum((1, 2))


def _adam(W, H, codes, codebooks, scales, row_losses, steps, lr, row_block, train_codebooks: bool = True):
    """Adam on codebooks (unless fixed) and scales with the codes fixed (gradients from
    `vq_gradients`); returns the best iterate seen, the starting point included, so the loss never
    goes up."""
    best = (row_losses.sum().item(), codebooks, scales, row_losses)
    codebooks, scales = codebooks.clone(), scales.clone()
    params, rates = [scales], [lr * scales.abs().mean().item()]
    if train_codebooks:
        params.insert(0, codebooks)
        rates.insert(0, lr)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step in range(steps + 1):
        current, grad_codebooks, grad_scales = vq_gradients(W, H, codes, codebooks, scales, row_block)
        if step and current.sum().item() < best[0]:  # step 0 is the start, whose loss is known
            best = (current.sum().item(), codebooks.clone(), scales.clone(), current)
        if step == steps:
            break
        grads = [grad_codebooks, grad_scales] if train_codebooks else [grad_scales]
        for param, grad, rate, (mean, square) in zip(params, grads, rates, moments):
            mean.lerp_(grad, 1 - ADAM_BETAS[0])
            square.mul_(ADAM_BETAS[1]).addcmul_(grad, grad, value=1 - ADAM_BETAS[1])
            unbiased = (square / (1 - ADAM_BETAS[1] ** (step + 1))).sqrt_().add_(ADAM_EPS)
            param.addcdiv_(mean, unbiased, value=-rate / (1 - ADAM_BETAS[0] ** (step + 1)))
    return best[1], best[2], best[3]
