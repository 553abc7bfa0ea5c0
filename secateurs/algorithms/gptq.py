"""GPTQ (Frantar et al. 2022): weight-only quantization with OBS error compensation.

Columns are rounded one at a time and the rounding error is spread over the columns not yet
rounded (sweep in obs.py). act_order sweeps columns by decreasing diag(H), so the most
activated inputs are rounded while the most columns can still compensate; the groups stay
static: contiguous runs of the ORIGINAL columns, each fitted on the current (already
compensated) weights the first time the sweep reaches any of its columns. Codes, scale and zero
therefore refer to the original column order and inference needs no permutation or g_idx.
"""

from dataclasses import dataclass

from torch import Tensor

from .obs import compress
from .quant import QuantSpec


@dataclass
class GPTQResult:
    weight: Tensor  # dequantized weights, dtype of W
    codes: Tensor  # uint8 [rows, cols] in [0, 2**bits - 1]
    scale: Tensor  # float32 [rows, n_groups], original column groups
    zero: Tensor  # float32 [rows, n_groups]
    loss: float  # sum over rows of (w - w_hat)^T (H + damp I) (w - w_hat) / 2
    damp: float  # absolute damping added to diag(H)


def gptq(W: Tensor, H: Tensor, spec: QuantSpec, block_size: int = 128, percdamp: float = 0.01) -> GPTQResult:
    """Quantize W [rows, cols] given H = 2 X X^T / n_tokens [cols, cols].

    Computes in float64 if W is float64, else float32. Dead inputs (diag(H) == 0) get weight 0.
    Raises HessianError (hessian.py) if H cannot be made positive definite.
    """
    out = compress(W, H, block_size=block_size, percdamp=percdamp, spec=spec)
    return GPTQResult(out.weight, out.codes, out.scale, out.zero, out.loss, out.damp)
