"""A 2-D convolution seen as a matrix product, so the layer-wise algorithms (GPTQ, VQ, SparseGPT)
compress a Conv2d exactly as they compress a Linear.

A Conv2d with weight [out, in, kh, kw] (groups = 1) computes, at each output position, the product
of the weight matrix W [out, kh*kw*in] with the column of the input patch under the kernel. The
columns are ordered kernel position first and input channel second: column (p, c) with
p = i*kw + j holds x[c, y+i, x+j], so a run of g consecutive columns (a quantization group, a VQ
group of 8) spans g input channels at one kernel position, channels that share a spatial offset and
whose weights are alike in scale. The layer's Hessian is then H = 2 XᵀX / n over all patches X
[n_patches, kh*kw*in] of the calibration inputs, and ‖(W - Ŵ) Xᵀ‖² is the layer's output error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_to_matrix(weight: Tensor) -> Tensor:
    """[out, in, kh, kw] -> [out, kh*kw*in], kernel position major, input channel minor."""
    out = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(out, -1)


def as_matrix(weight: Tensor) -> Tensor:
    """A layer's weight as the algorithms see it: [out, in] unchanged, a conv weight by conv_to_matrix."""
    return conv_to_matrix(weight) if weight.dim() == 4 else weight


def matrix_to_conv(matrix: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of conv_to_matrix for a weight of `shape` [out, in, kh, kw]."""
    out, channels, kh, kw = shape
    if tuple(matrix.shape) != (out, kh * kw * channels):
        raise ValueError(f"a matrix of shape {tuple(matrix.shape)} is not a conv weight of shape {tuple(shape)}")
    return matrix.reshape(out, kh, kw, channels).permute(0, 3, 1, 2).contiguous()


def conv_patches(x: Tensor, kernel_size: tuple[int, int], stride=1, padding=0, dilation=1) -> Tensor:
    """Input [batch, in, H, W] -> every patch the kernel sees, [batch * positions, kh*kw*in], in the
    column order of conv_to_matrix (zero padding included, as the convolution reads it)."""
    batch, channels = x.shape[:2]
    kh, kw = kernel_size
    unfolded = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [b, in*kh*kw, L]
    positions = unfolded.shape[-1]
    return unfolded.reshape(batch, channels, kh * kw, positions).permute(0, 3, 2, 1).reshape(-1, kh * kw * channels)
