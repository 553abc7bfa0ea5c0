"""Dampened inverse-Hessian factor shared by the OBS-style algorithms (SparseGPT, GPTQ).

The layer-wise objective of one output row w is (w - w_hat)^T H (w - w_hat) / 2 with H = 2 X X^T / n
([cols, cols], X the [cols, n] calibration inputs). The column sweep needs the upper Cholesky factor U
of H^-1 (H^-1 = U^T U): row j of U, divided by U[j, j], is the optimal compensation of all later
columns when column j is fixed, and U[j, j]^2 is the matching diagonal of the remaining inverse.
"""

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


class HessianError(ValueError):
    """H is unusable: NaN/Inf, or not positive definite even after the largest damping tried."""

    def __init__(self, message: str, name: str | None = None):
        self.name = name
        super().__init__(f"{name}: {message}" if name else message)


@dataclass
class PreparedHessian:
    hinv_chol: Tensor  # [cols, cols] upper Cholesky factor of (H + damp * I)^-1, work dtype, contiguous
    dead: Tensor  # [cols] bool, inputs that were never active (diag(H) == 0)
    damp: float  # absolute damping added to the diagonal of H
    weight: Tensor  # work-dtype copy of W with the dead columns zeroed


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any tensor is float64 (exact references, tests), float32 otherwise (speed)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def prepare_hessian(
    H: Tensor, W: Tensor, percdamp: float = 0.01, max_tries: int = 4, name: str | None = None
) -> PreparedHessian:
    """Damp H by `percdamp * mean(diag(H))` and factor its inverse, damping 10x more on failure.

    The factorisation runs in float64 when H or W is float64; the returned tensors use the work
    dtype of W (float64 if W is float64, else float32). With the defaults the relative damping
    tried is 0.01, 0.1, 1, 10 (a zero `percdamp` first tries no damping, then 0.01 upwards).
    """
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) to match W, got {tuple(H.shape)}")
    if percdamp < 0 or max_tries < 1:
        raise ValueError(f"need percdamp >= 0 and max_tries >= 1, got {percdamp}, {max_tries}")
    if not (H.amin().isfinite() and H.amax().isfinite()):  # NaN propagates; no [cols, cols] temporary
        raise HessianError("Hessian contains NaN or Inf", name)

    H = H.to(work_dtype(H, W), copy=True)
    weight = W.to(work_dtype(W), copy=True)
    # An input that is always zero carries no information: pin its weight to 0 and make H invertible.
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    weight[:, dead] = 0

    mean_diag = H.diagonal().mean().item()
    relative, tried = percdamp, []
    for attempt in range(max_tries):
        damp = relative * mean_diag
        hinv_chol = _inverse_cholesky(H, damp)
        if hinv_chol is not None:
            # Row-major: the sweep reads rows of the factor (LAPACK hands back the transposed view).
            return PreparedHessian(hinv_chol.to(weight.dtype).contiguous(), dead, damp, weight)
        tried.append(relative)
        relative = relative * 10 if relative > 0 else 0.01
        if attempt + 1 < max_tries:
            warnings.warn(
                f"{name + ': ' if name else ''}Hessian not positive definite with damping "
                f"{tried[-1]:g} x mean diag; retrying with {relative:g} x mean diag",
                RuntimeWarning,
                stacklevel=2,
            )
    raise HessianError(
        f"Hessian not positive definite after damping {', '.join(f'{r:g}' for r in tried)} "
        f"x mean diag ({mean_diag:g})",
        name,
    )


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor | None:
    """Upper Cholesky factor of (H + damp I)^-1, or None if either factorisation fails."""
    damped = H.clone()
    damped.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0 or not upper.diagonal().isfinite().all():  # overflow in the inverse
        return None
    return upper
