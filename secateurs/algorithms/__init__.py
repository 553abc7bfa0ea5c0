"""Pure tensor compression algorithms: pruning masks, SparseGPT, GPTQ and their quantization grids."""

from .gptq import GPTQResult, gptq
from .hessian import HessianError, PreparedHessian, prepare_hessian
from .magnitude import magnitude_mask
from .obert import (
    FisherInverse,
    FisherInverseBuilder,
    OBertResult,
    fisher_inverse,
    obert_prune,
    obert_scores,
    obert_update,
    restrict_fisher_inverse,
)
from .owl import outlier_fraction, owl_ratios
from .quant import QuantSpec, RTNResult, dequantize, fit_grid, quantize_codes, round_to_nearest
from .sparsegpt import SparseGPTResult, sparsegpt
from .vq import (
    VQBits,
    VQResult,
    VQSpec,
    beam_search_codes,
    shared_codebooks,
    vq,
    vq_bits,
    vq_gradients,
    vq_loss,
    vq_reconstruct,
)
from .wanda import WandaResult, wanda_mask, wanda_scores

__all__ = [
    "FisherInverse",
    "FisherInverseBuilder",
    "GPTQResult",
    "HessianError",
    "OBertResult",
    "PreparedHessian",
    "QuantSpec",
    "RTNResult",
    "SparseGPTResult",
    "VQBits",
    "VQResult",
    "VQSpec",
    "WandaResult",
    "beam_search_codes",
    "dequantize",
    "fisher_inverse",
    "fit_grid",
    "gptq",
    "magnitude_mask",
    "obert_prune",
    "obert_scores",
    "obert_update",
    "outlier_fraction",
    "owl_ratios",
    "prepare_hessian",
    "quantize_codes",
    "restrict_fisher_inverse",
    "round_to_nearest",
    "sparsegpt",
    "shared_codebooks",
    "vq",
    "vq_bits",
    "vq_gradients",
    "vq_loss",
    "vq_reconstruct",
    "wanda_mask",
    "wanda_scores",
]
