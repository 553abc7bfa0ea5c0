// Shared declarations of the secateurs CPU kernels (layouts: docs/layouts.md).
//
// Every kernel computes y = x @ W_hat^T for x [batch, cols]. The dispatcher (dispatch.cpp) converts
// the activations to zero-padded fp32 in the layout each kernel wants, splits the rows between
// OpenMP threads and converts the fp32 result to the output dtype; the per-ISA "row kernels" only
// compute fp32 outputs for a range of rows and never start threads themselves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace secateurs {

enum ValueType : int { kFloat32 = 0, kBFloat16 = 1, kInt8 = 2 };

struct Activations {
  int64_t batch;
  // [batch][row_stride] fp32, zero padded past `cols` (for int4: deinterleaved, see QuantArgs).
  const float* rows;
  int64_t row_stride;
  // Transposed tiles for the sparse GEMM: [n_tiles][cols][tile], batch index padded with zeros.
  const float* tiles;
  int64_t tile;
};

struct BitmaskArgs {
  Activations x;
  int64_t rows, cols, mask_stride;
  const uint8_t* mask;
  const void* values;
  int value_type;
  const int64_t* row_offsets;
  const float* row_scale;  // per-row scale of int8 values, nullptr otherwise
  float* y;                // [batch][rows]
};

struct NMArgs {
  Activations x;
  int64_t rows, cols, n, m;
  const void* values;
  int value_type;
  const uint8_t* indices;
  float* y;
};

// For int4 the activation rows are deinterleaved in blocks of `int4_block` columns
// (even columns first, then odd ones) so that a byte's low and high nibbles meet contiguous x.
struct QuantArgs {
  Activations x;
  int64_t rows, cols, bits, group_size, n_groups, int4_block;
  const uint8_t* qweight;
  const float* scale;         // [rows][n_groups]
  const float* zero;          // [rows][n_groups]
  const float* x_group_sums;  // [batch][n_groups]
  float* y;
};

// `scratch` is a per-thread buffer of at least scratch_floats(cols, simd_width) floats.
template <class Args>
using RowKernel = void (*)(const Args&, int64_t row_begin, int64_t row_end, float* scratch);

struct KernelTable {
  int simd_width;  // floats per vector register; fixes the tile and int4 block layouts
  RowKernel<BitmaskArgs> bitmask;
  RowKernel<NMArgs> nm;
  RowKernel<QuantArgs> quant;
};

inline int64_t scratch_floats(int64_t cols, int64_t simd_width) { return 2 * (cols + 4 * simd_width); }

const KernelTable& portable_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

}  // namespace secateurs
