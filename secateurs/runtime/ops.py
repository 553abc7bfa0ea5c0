"""The kernels as torch custom ops (secateurs::*), with fake impls, so torch.compile can trace
modules that call them. Same signatures as the functions in kernels.py."""

from typing import Optional

import torch
from torch import Tensor

from . import kernels


@torch.library.custom_op("secateurs::bitmask_mm", mutates_args=())
def bitmask_mm(x: Tensor, bitmask: Tensor, values: Tensor, row_offsets: Tensor, in_features: int,
               row_scale: Optional[Tensor] = None, mask_group: int = 1, bias: Optional[Tensor] = None,
               activation: Optional[str] = None) -> Tensor:
    return kernels.bitmask_mm(x, bitmask, values, row_offsets, in_features, row_scale, mask_group, bias, activation)


@torch.library.custom_op("secateurs::nm_mm", mutates_args=())
def nm_mm(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    return kernels.nm_mm(x, values, indices, n, m)


@torch.library.custom_op("secateurs::quant_mm", mutates_args=())
def quant_mm(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, in_features: int,
             group_size: Optional[int] = None) -> Tensor:
    return kernels.quant_mm(x, qweight, scale, zero, bits, in_features, group_size)


@torch.library.custom_op("secateurs::vq_mm", mutates_args=())
def vq_mm(x: Tensor, codes: Tensor, codebooks: Tensor, scale: Tensor) -> Tensor:
    return kernels.vq_mm(x, codes, codebooks, scale)


@torch.library.custom_op("secateurs::sparse_int4_mm", mutates_args=())
def sparse_int4_mm(x: Tensor, bitmask: Tensor, packed: Tensor, row_offsets: Tensor, scale: Tensor, zero: Tensor,
                   in_features: int, group_size: Optional[int] = None) -> Tensor:
    return kernels.sparse_int4_mm(x, bitmask, packed, row_offsets, scale, zero, in_features, group_size)


def _output_like(x: Tensor, rows: int) -> Tensor:
    return x.new_empty(x.shape[0], rows)


@bitmask_mm.register_fake
def _(x, bitmask, values, row_offsets, in_features, row_scale=None, mask_group=1, bias=None, activation=None):
    return _output_like(x, bitmask.shape[0])


@nm_mm.register_fake
def _(x, values, indices, n, m):
    return _output_like(x, values.shape[0])


@quant_mm.register_fake
def _(x, qweight, scale, zero, bits, in_features, group_size=None):
    return _output_like(x, qweight.shape[0])


@vq_mm.register_fake
def _(x, codes, codebooks, scale):
    return _output_like(x, codes.shape[0])


@sparse_int4_mm.register_fake
def _(x, bitmask, packed, row_offsets, scale, zero, in_features, group_size=None):
    return _output_like(x, bitmask.shape[0])
