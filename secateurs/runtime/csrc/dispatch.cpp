// C entry points (loaded with ctypes): validate the path, lay out fp32 activations, split rows
// over OpenMP threads and convert the fp32 result to the activation dtype.
// Every function returns a Status; the Python wrapper validates shapes before calling.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>

#include "kernels.h"

namespace secateurs {

bool cpu_supports(int path) {
  __builtin_cpu_init();
  switch (path) {
    case kPortable: return true;
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("popcnt");
    case kAvx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
    case kAvx512Vbmi2:
      return cpu_supports(kAvx512) && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
}

const KernelTable& kernels_for(int path) {
  switch (path) {
    case kAvx2: return avx2_kernels();
    case kAvx512: return avx512_kernels();
    case kAvx512Vbmi2: return avx512vbmi2_kernels();
    default: return portable_kernels();
  }
}

namespace {


inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

// Round to nearest even, like torch's float -> bfloat16; NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float activation(const void* x, int type, int64_t i) {
  return type == kBFloat16 ? bf16_to_float(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
}

// Activation rows as fp32 padded to padded_stride(cols) (zeros past `cols`); with
// deinterleave_block > 0 each block lists its even columns first, then its odd ones.
Buffer activation_rows(const void* x, int type, int64_t batch, int64_t cols, int64_t deinterleave_block) {
  const int64_t stride = padded_stride(cols);
  Buffer rows = zeroed_floats(batch * stride);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < cols; ++j) {
      int64_t position = j;
      if (deinterleave_block > 0) {
        const int64_t in_block = j % deinterleave_block;
        position = j - in_block + in_block / 2 + (in_block % 2) * (deinterleave_block / 2);
      }
      rows[b * stride + position] = activation(x, type, b * cols + j);
    }
  return rows;
}

// Tiles [n_tiles][cols][tile] of x in any activation type (kernels.h: write_tiles), in a zeroed buffer.
Buffer activation_tiles(const void* x, int type, int64_t batch, int64_t cols, int64_t tile) {
  Buffer tiles = zeroed_floats(tile_floats(batch, cols, tile));
  if (type == kFloat32) {
    const float* in = static_cast<const float*>(x);
    write_tiles([in](int64_t i) { return in[i]; }, batch, cols, tile, tiles.get());
  } else {
    write_tiles([x, type](int64_t i) { return activation(x, type, i); }, batch, cols, tile, tiles.get());
  }
  return tiles;
}

// Activations as the row kernels want them for sparse weights: a padded row for batch 1, tiles
// of W or 2W batch lanes otherwise.
struct SparseActivations {
  Buffer storage;
  Activations view;
};

// With rows_when_many, a batch of many tiles (kernels.h: many_tiles) is handed over as rows instead:
// float32 input as it is, bfloat16 converted.
SparseActivations sparse_activations(const void* x, int type, int64_t batch, int64_t cols, int simd_width,
                                     bool rows_when_many = false) {
  SparseActivations a;
  a.view = Activations{batch, nullptr, padded_stride(cols), nullptr, sparse_tile(batch, simd_width)};
  if (batch > 1 && rows_when_many && many_tiles(batch, a.view.tile)) {
    if (type == kFloat32) {
      a.view.rows = static_cast<const float*>(x);
      a.view.row_stride = cols;
    } else {
      a.storage = activation_rows(x, type, batch, cols, 0);
      a.view.rows = a.storage.get();
    }
  } else if (batch == 1) {
    a.storage = activation_rows(x, type, batch, cols, 0);
    a.view.rows = a.storage.get();
  } else {
    a.storage = activation_tiles(x, type, batch, cols, a.view.tile);
    a.view.tiles = a.storage.get();
  }
  return a;
}

// The int16 form of a batch-1 activation row (kernels.h) attached to xa when `wanted`: the
// returned buffer holds it and must outlive the kernel call.
Buffer attach_int16_if(bool wanted, Activations& xa, int64_t cols) {
  Buffer storage = wanted ? zeroed_floats(int16_row_floats(cols)) : Buffer();
  if (storage) attach_int16(xa, cols, storage.get());
  return storage;
}

// Runs kernel over all rows on `threads` OpenMP threads and writes y in `y_type`; bf16 outputs go
// through an fp32 buffer converted by the thread that computed them. cost(r) is the weight bytes of
// rows [0, r). Threads take contiguous row ranges of equal cost, or, with token_unit > 0 (a batch
// the kernel takes as rows, many_tiles) and at least one whole tile of token_unit tokens per thread,
// contiguous token ranges over all rows: a row range would leave every thread tiling the
// whole batch itself, and rows of equal weight bytes need not keep equally many weights (their
// work at a batch), which left a query layer of a 90%-sparse MiniLM 1.24x faster on two threads.
template <class Args, class Cost>
void run_rows(RowKernel<Args> kernel, Args args, int simd_width, int threads, void* y, int y_type, const Cost& cost,
              int64_t token_unit = 0) {
  const int64_t rows = args.rows, batch = args.x.batch;
  Buffer y_float = y_type == kBFloat16 ? zeroed_floats(batch * rows) : Buffer();
  args.y = y_type == kBFloat16 ? y_float.get() : static_cast<float*>(y);
  // Small problems run on fewer threads: waking a thread costs more than it would save.
  constexpr double kMinWorkPerThread = 1 << 17;  // weight bytes x batch rows
  const double work = static_cast<double>(cost(rows)) * static_cast<double>(batch);
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(work / kMinWorkPerThread) + 1)));
  const int64_t units = token_unit > 0 ? batch / token_unit : 0;  // whole units: every range holds one or more
  const bool by_tokens = threads > 1 && units >= threads;
  const int64_t scratch_per_thread = scratch_floats(args.cols, simd_width);
  Buffer scratch = zeroed_floats(threads * scratch_per_thread);
#pragma omp parallel num_threads(threads)
  {
    const int part = omp_get_thread_num(), parts = omp_get_num_threads();
    Args own = args;
    int64_t begin = 0, end = rows, token_begin = 0, token_end = batch;
    if (by_tokens) {
      token_begin = units * part / parts * token_unit;
      token_end = part + 1 == parts ? batch : units * (part + 1) / parts * token_unit;  // the last takes the rest
      own.x.rows += token_begin * own.x.row_stride;
      own.x.batch = token_end - token_begin;
      own.y += token_begin * rows;
    } else {
      begin = split_row(rows, part, parts, cost), end = split_row(rows, part + 1, parts, cost);
    }
    if (token_end > token_begin) kernel(own, begin, end, scratch.get() + part * scratch_per_thread);
    if (y_type == kBFloat16)
      for (int64_t b = token_begin; b < token_end; ++b)
        for (int64_t r = begin; r < end; ++r)
          static_cast<uint16_t*>(y)[b * rows + r] = float_to_bf16(args.y[b * rows + r]);
  }
}

bool valid_activation_type(int type) { return type == kFloat32 || type == kBFloat16; }
bool valid_value_type(int type) { return type == kFloat32 || type == kBFloat16 || type == kInt8; }

// Shared preamble of the entry points: argument checks and the out-of-memory guard.
template <class Body>
int guarded(int path, bool arguments_ok, Body&& body) {
  if (!cpu_supports(path)) return kUnsupportedPath;
  if (!arguments_ok) return kInvalidArgument;
  try {
    body(kernels_for(path));
  } catch (const std::bad_alloc&) {
    return kOutOfMemory;
  }
  return kOk;
}

}  // namespace
}  // namespace secateurs

using namespace secateurs;

#define SECATEURS_EXPORT __attribute__((visibility("default")))

extern "C" {

SECATEURS_EXPORT int secateurs_path_supported(int path) { return cpu_supports(path) ? 1 : 0; }

SECATEURS_EXPORT int secateurs_bitmask_mm(int path, int threads, const void* x, int x_type, int64_t batch, int64_t rows,
                         int64_t cols, const uint8_t* mask, const void* values, int value_type,
                         const int64_t* row_offsets, const float* row_scale, int64_t mask_group, const float* bias,
                         int activation, void* y) {
  const bool ok = valid_activation_type(x_type) && valid_value_type(value_type) && batch > 0 && rows >= 0 &&
                  cols >= 0 && (value_type == kInt8) == (row_scale != nullptr) && mask_group >= 1 &&
                  activation >= kSilu && activation <= kNoActivation;
  return guarded(path, ok, [&](const KernelTable& table) {
    SparseActivations xa = sparse_activations(x, x_type, batch, cols, table.simd_width, true);
    const Buffer int16_row = attach_int16_if(value_type == kInt8 && batch == 1, xa.view, cols);
    const int64_t mask_stride = (cols + 7) / 8, value_bytes = value_type == kFloat32 ? 4 : value_type == kBFloat16 ? 2 : 1;
    const BitmaskArgs args{xa.view, rows, cols, mask_stride, mask, values, value_type, row_offsets, row_scale, nullptr,
                           mask_group, bias, activation};
    // Rows cost their mask bytes plus their values: balance threads on that, not on row count.
    const auto cost = [&](int64_t r) { return row_offsets[r] * value_bytes + r * mask_stride; };
    const bool as_rows = batch > 1 && !xa.view.tiles;  // many_tiles
    run_rows(table.bitmask, args, table.simd_width, threads, y, x_type, cost,
             as_rows ? kManyTilesVecs * table.simd_width : 0);
  });
}

SECATEURS_EXPORT int secateurs_int8_blocks_mm(int path, int threads, const void* x, int x_type, int64_t batch, int64_t rows,
                                              int64_t cols, const int32_t* groups, const int32_t* codes,
                                              const int64_t* block_offsets, const int32_t* code_sums,
                                              const float* row_scale, const float* bias, int activation, void* y) {
  if (cpu_supports(path) && !kernels_for(path).int8_blocks) return kUnsupportedPath;
  const bool ok = x_type == kFloat32 && batch > 0 && rows >= 0 && cols > 0 && activation >= kSilu &&
                  activation <= kNoActivation;
  int nonfinite = 0;
  const int status = guarded(path, ok, [&](const KernelTable& table) {
    const Activations xa{batch, static_cast<const float*>(x), cols, nullptr, 0};
    Int8BlockArgs args{xa, rows, cols, groups, codes, block_offsets, code_sums, row_scale, nullptr, bias, activation, &nonfinite};
    run_rows(table.int8_blocks, args, table.simd_width, threads, y, kFloat32,
             [&](int64_t r) { return block_offsets[r] * 4 + r * 8; }, kInt8Tile);
  });
  return status == kOk && nonfinite ? kNonFinite : status;
}

SECATEURS_EXPORT int secateurs_nm_mm(int path, int threads, const void* x, int x_type, int64_t batch, int64_t rows, int64_t cols,
                    int64_t n, int64_t m, const void* values, int value_type, const uint8_t* indices, void* y) {
  const bool ok = valid_activation_type(x_type) && (value_type == kFloat32 || value_type == kBFloat16) &&
                  batch > 0 && rows >= 0 && n > 0 && m >= n && m <= 256 && cols % m == 0;
  return guarded(path, ok, [&](const KernelTable& table) {
    SparseActivations xa = sparse_activations(x, x_type, batch, cols, table.simd_width);
    const NMArgs args{xa.view, rows, cols, n, m, values, value_type, indices, nullptr};
    const int64_t row_bytes = cols / m * n * ((value_type == kFloat32 ? 4 : 2) + 1);
    run_rows(table.nm, args, table.simd_width, threads, y, x_type, [&](int64_t r) { return r * row_bytes; });
  });
}

SECATEURS_EXPORT int secateurs_quant_mm(int path, int threads, const void* x, int x_type, int64_t batch, int64_t rows, int64_t cols,
                       int64_t bits, int64_t group_size, const uint8_t* qweight, const float* scale,
                       const float* zero, void* y) {
  if (group_size <= 0) group_size = cols;  // per channel: one group per row
  const bool ok = valid_activation_type(x_type) && (bits == 4 || bits == 8) && batch > 0 && rows >= 0 &&
                  cols > 0 && cols % group_size == 0;
  return guarded(path, ok, [&](const KernelTable& table) {
    const int64_t n_groups = cols / group_size, int4_block = 2 * table.simd_width;
    Buffer rows_buffer = activation_rows(x, x_type, batch, cols, bits == 4 ? int4_block : 0);
    Activations xa{batch, rows_buffer.get(), padded_stride(cols), nullptr, 0};
    const Buffer int16_row = attach_int16_if(quant_takes_int16(bits, batch, cols, n_groups, group_size), xa, cols);
    Buffer group_sums = zeroed_floats(batch * n_groups);
    activation_group_sums(xa, n_groups, group_size, [&](int64_t b, int64_t j) { return activation(x, x_type, b * cols + j); },
                          group_sums.get());
    const QuantArgs args{xa, rows, cols, bits, group_size, n_groups, int4_block, qweight, scale, zero, group_sums.get(), nullptr};
    const int64_t row_bytes = bits == 8 ? cols : (cols + 1) / 2;
    run_rows(table.quant, args, table.simd_width, threads, y, x_type, [&](int64_t r) { return r * row_bytes; });
  });
}

SECATEURS_EXPORT int secateurs_dense_mm(int path, int threads, const void* x, int x_type, int64_t batch, int64_t rows,
                       int64_t cols, const void* weight, int value_type, const float* row_scale, void* y) {
  const bool ok = valid_activation_type(x_type) && valid_value_type(value_type) && batch > 0 && rows >= 0 &&
                  cols >= 0 && (value_type == kInt8) == (row_scale != nullptr);
  return guarded(path, ok, [&](const KernelTable& table) {
    Buffer rows_buffer = activation_rows(x, x_type, batch, cols, 0);
    Activations xa{batch, rows_buffer.get(), padded_stride(cols), nullptr, 0};
    const Buffer int16_row = attach_int16_if(value_type == kInt8 && batch == 1, xa, cols);
    const DenseArgs args{xa, rows, cols, weight, value_type, row_scale, nullptr};
    const int64_t row_bytes = cols * (value_type == kFloat32 ? 4 : value_type == kBFloat16 ? 2 : 1);
    run_rows(table.dense, args, table.simd_width, threads, y, x_type, [&](int64_t r) { return r * row_bytes; });
  });
}

SECATEURS_EXPORT int secateurs_vq_mm(int path, int threads, const void* x, int x_type, int64_t batch, int64_t rows, int64_t cols,
                    int64_t group_size, int64_t codebooks, int64_t codewords, const void* codes,
                    const float* codebook_values, const uint16_t* codebook_half, const int8_t* codebook_int8,
                    const float* position_scale, const float* scale, void* y) {
  const bool ok = valid_activation_type(x_type) && batch > 0 && rows >= 0 && group_size > 0 && cols % group_size == 0 &&
                  codebooks >= 1 && codebooks <= 16 && codewords >= 1 && codewords <= 65536;
  return guarded(path, ok, [&](const KernelTable& table) {
    Buffer rows_buffer = activation_rows(x, x_type, batch, cols, 0);
    const Activations xa{batch, rows_buffer.get(), padded_stride(cols), nullptr, 0};
    const bool narrow = codewords <= 256;
    const VQArgs args{xa, rows, cols, group_size, codebooks, codewords, codebook_values,
                      narrow ? static_cast<const uint8_t*>(codes) : nullptr,
                      narrow ? nullptr : static_cast<const uint16_t*>(codes), scale, nullptr, codebook_half,
                      position_scale ? codebook_int8 : nullptr, position_scale};
    run_rows(table.vq, args, table.simd_width, threads, y, x_type, [&](int64_t r) { return vq_cost(args, r); });
  });
}

SECATEURS_EXPORT int secateurs_sparse_int4_mm(int path, int threads, const void* x, int x_type, int64_t batch, int64_t rows,
                            int64_t cols, int64_t group_size, const uint8_t* mask, const uint8_t* codes,
                            const int64_t* row_offsets, const float* scale, const float* zero, void* y) {
  if (group_size <= 0) group_size = cols;  // per channel
  const bool ok = valid_activation_type(x_type) && batch == 1 && rows >= 0 && cols > 0 && cols % 64 == 0 &&
                  cols % group_size == 0 && group_size % 64 == 0;
  return guarded(path, ok, [&](const KernelTable& table) {
    Buffer rows_buffer = activation_rows(x, x_type, batch, cols, 0);
    Activations xa{batch, rows_buffer.get(), padded_stride(cols), nullptr, 0};
    const Buffer int16_row = attach_int16_if(true, xa, cols);
    const SparseInt4Args args{xa, rows, cols, group_size, cols / group_size, mask, codes, row_offsets, scale, zero, nullptr};
    run_rows(table.sparse_int4, args, table.simd_width, threads, y, x_type,
             [&](int64_t r) { return row_offsets[r] + r * (cols / 8); });
  });
}

}  // extern "C"
