"""CPU inference runtime: compressed Linear modules over C++/OpenMP kernels (see kernels.py).

The native library is compiled by `pip install` (again: `python -m secateurs.runtime.build`)."""

from .decode import DecodeError, DecodeModel, DecodeUnsupported
from .kernels import (KernelPathError, bitmask_mm, dense_mm, kernel_path, last_kernel_path, nm_mm, quant_mm,
                      sparse_int4_mm, supported_paths, vq_mm)
from .modules import BitmaskLinear, CompressedLinear, NMLinear, QuantLinear, SparseInt4Linear, SparseQuantLinear
from .vq_linear import VQLinear, use_integer_vq

__all__ = [
    "BitmaskLinear", "CompressedLinear", "DecodeError", "DecodeModel", "DecodeUnsupported", "KernelPathError",
    "NMLinear", "QuantLinear", "SparseInt4Linear", "SparseQuantLinear", "VQLinear",
    "bitmask_mm", "dense_mm", "kernel_path", "last_kernel_path", "nm_mm", "quant_mm", "sparse_int4_mm", "supported_paths", "use_integer_vq", "vq_mm",
]
