// Shared declarations of the secateurs CPU kernels (layouts: docs/formats.md).
//
// Every kernel computes y = x @ W_hat^T for x [batch, cols]. The dispatcher (dispatch.cpp) converts
// the activations to zero-padded fp32 in the layout each kernel wants, splits the rows between
// OpenMP threads and converts the fp32 result to the output dtype; the per-ISA "row kernels" only
// compute fp32 outputs for a range of rows and never start threads themselves.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

namespace secateurs {

enum ValueType : int { kFloat32 = 0, kBFloat16 = 1, kInt8 = 2 };
enum Activation : int { kSilu = 0, kGeluTanh = 1, kGeluErf = 2, kNoActivation = 3 };

struct Activations {
  int64_t batch;
  // [batch][row_stride] fp32, zero padded past `cols` (for int4: deinterleaved, see QuantArgs);
  // for the bitmask kernel's many_tiles batches the caller's own rows, unpadded (row_stride = cols).
  const float* rows;
  int64_t row_stride;
  // Transposed tiles for the sparse GEMM: [n_tiles][cols][tile], batch index padded with zeros;
  // nullptr at batches above one whose rows the kernel tiles itself (many_tiles).
  const float* tiles;
  int64_t tile;
  // Batch-1 int8 kernels only, when set: the row as int16 (see quantize_int16).
  const int16_t* int16 = nullptr;
  const float* int16_scale = nullptr;
};

// Int8-weight kernels at batch 1 are bound by converting every weight to fp32. They take the
// activation row as int16 instead, quantized per block of kInt16Block columns with a scale of
// its own (x_j ~ scale[j / kInt16Block] * q_j, |q_j| <= 32767, error <= 2^-16 of the block's
// largest |x|; llama.cpp's Q8_0 kernels round x to 8 bits per 32): products of codes and q pair
// up in int32 (vpmaddwd), a block's sum is below 2^8 * 2^15 * 64 = 2^29 in magnitude, and only
// that sum is converted and scaled.
constexpr int64_t kInt16Block = 64;
inline int64_t int16_blocks(int64_t cols) { return (cols + kInt16Block - 1) / kInt16Block; }

// q [int16_blocks(cols) * kInt16Block] (zero past cols) and scale [int16_blocks(cols)] of x.
// False (and q unusable) when x holds a NaN or an infinity: those take the fp32 kernels.
inline bool quantize_int16(const float* x, int64_t cols, int16_t* q, float* scale) {
  for (int64_t b = 0; b < int16_blocks(cols); ++b) {
    const int64_t begin = b * kInt16Block, end = std::min(cols, begin + kInt16Block);
    float largest = 0.0f;
    for (int64_t j = begin; j < end; ++j) {
      if (!std::isfinite(x[j])) return false;
      largest = std::max(largest, std::fabs(x[j]));
    }
    // A block below 1e-30 rounds to zero (its inverse scale would overflow).
    const bool zero = largest < 1e-30f;
    scale[b] = zero ? 0.0f : largest / 32767.0f;
    const float inverse = zero ? 0.0f : 32767.0f / largest;
    for (int64_t j = begin; j < begin + kInt16Block; ++j)
      q[j] = j < end ? static_cast<int16_t>(std::lrint(std::min(32767.0f, std::max(-32767.0f, x[j] * inverse)))) : 0;
  }
  return true;
}

// Floats of one buffer holding an int16 row (q, then the block scales).
inline int64_t int16_row_floats(int64_t cols) { return int16_blocks(cols) * (kInt16Block / 2 + 1); }

// Quantizes x's only row into `buffer` and points x at it; false (x untouched) unless batch 1 and finite.
inline bool attach_int16(Activations& x, int64_t cols, float* buffer) {
  int16_t* q = reinterpret_cast<int16_t*>(buffer);
  float* scale = buffer + int16_blocks(cols) * kInt16Block / 2;
  if (x.batch != 1 || !quantize_int16(x.rows, cols, q, scale)) return false;
  x.int16 = q;
  x.int16_scale = scale;
  return true;
}

// Whether a quantized layer runs on int16 activations: 8-bit codes, or 4-bit codes on whole blocks
// (their deinterleave blocks, QuantArgs, then stay inside an int16 block), at batch 1, groups made
// of whole blocks.
inline bool quant_takes_int16(int64_t bits, int64_t batch, int64_t cols, int64_t n_groups, int64_t group_size) {
  const bool codes_fit = bits == 8 || (bits == 4 && cols % kInt16Block == 0);
  return codes_fit && batch == 1 && (n_groups == 1 || group_size % kInt16Block == 0);
}

// sums[b][g]: the sum of activation row b over group g, which the group's zero point multiplies;
// of the int16 form when one is attached (the x the kernels see), else of x_at(b, column).
template <class XAt>
void activation_group_sums(const Activations& x, int64_t n_groups, int64_t group_size, const XAt& x_at, float* sums) {
  for (int64_t b = 0; b < x.batch; ++b)
    for (int64_t g = 0; g < n_groups; ++g) {
      double sum = 0.0;
      for (int64_t j = g * group_size; j < (g + 1) * group_size; ++j)
        sum += x.int16 ? static_cast<double>(x.int16_scale[j / kInt16Block]) * x.int16[j] : x_at(b, j);
      sums[b * n_groups + g] = static_cast<float>(sum);
    }
}

// Whether the bitmask kernel takes a batch as rows and tiles it itself, one tile at a time per
// thread (kept in L1 while every row of the thread passes over it), rather than as tiles of the
// whole batch built up front: batches of more than one tile.
inline bool many_tiles(int64_t batch, int64_t tile) { return batch > tile; }
// Vectors of tokens per tile of the many_tiles kernel (tile = kManyTilesVecs * W tokens).
constexpr int kManyTilesVecs = 4;

struct BitmaskArgs {
  Activations x;
  int64_t rows, cols, mask_stride;
  const uint8_t* mask;
  const void* values;
  int value_type;
  const int64_t* row_offsets;
  const float* row_scale;  // per-row scale of int8 values, nullptr otherwise
  float* y;                // [batch][rows]
  // Rows in groups of mask_group, counted from row 0, share their first row's mask (the
  // caller checked it: layouts.mask_row_group). At batch 1 with int8 values a group gathers its
  // kept activations once and every row multiplies only its kept values (row_kernels.h).
  int64_t mask_group = 1;
  // Fused epilogue: y = activation(x W^T + bias); bias float [rows] or nullptr.
  const float* bias = nullptr;
  int activation = kNoActivation;
};

// int8 activations times int8 weights, 4 columns at a time (runtime.layouts.int8_blocks): every
// group of 4 consecutive columns of a row that keeps a nonzero code is one block, its 4 codes (zero
// where pruned) one int32 (column 4g + c in byte c). A token is quantized on its own: q = rint(x *
// (127 / max |x|)) and its scale max |x| / 127; the kernel adds 128 to q (unsigned bytes, as VNNI's
// vpdpbusd takes them) and subtracts 128 times the row's code sum, so the integer sums are exact:
// y = float(sum_j q_j code_j) * (token scale * row_scale) + bias, then the activation.
constexpr int64_t kInt8Tile = 64;  // tokens per tile: one 64-byte line per block
struct Int8BlockArgs {
  Activations x;  // rows: fp32 [batch][row_stride]
  int64_t rows, cols;
  const int32_t* groups;         // [blocks] the column group of each block
  const int32_t* codes;          // [blocks] its 4 codes
  const int64_t* block_offsets;  // [rows + 1]
  const int32_t* code_sums;      // [rows]
  const float* row_scale;        // [rows]
  float* y;                      // [batch][rows]
  const float* bias = nullptr;
  int activation = kNoActivation;
  int* nonfinite = nullptr;  // set to 1 when a token holds a NaN or an infinity (its outputs are then unusable)
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

// Dense weight [rows, cols] row-major: fp32, bf16 (raw bits), or int8 with a float32 per-row
// scale (w = row_scale[r] * v). Activations as padded fp32 rows (x.rows, x.row_stride).
struct DenseArgs {
  Activations x;
  int64_t rows, cols;
  const void* weight;
  int value_type;
  const float* row_scale;  // int8 weights only, nullptr otherwise
  float* y;                // [batch][rows]
};

// Vector-quantized weight (formats/vector.py): row r's input group j is
// scale[r] * sum_m C_m[code(r, j, m)], C_m a codebook of `codewords` vectors of group_size values.
// The row kernel rebuilds each group's weights from its codewords (the codebooks, 16 KB for
// 2 x 256 words of 8 floats, stay in L1) and multiplies them into every activation row.
struct VQArgs {
  Activations x;  // padded fp32 rows
  int64_t rows, cols, group_size, codebooks, codewords;
  const float* codebook_values;  // [M][codewords][group_size]
  const uint8_t* codes8;         // [rows][cols / group_size][M] when codewords <= 256, else nullptr
  const uint16_t* codes16;       // the same, 16 bits per code, when codewords > 256
  const float* scale;            // [rows]
  float* y;
  // The codebooks as IEEE half bits, when every value is one (what the vq files store), else
  // nullptr: the group-of-8 tiles then read 16 bytes a codeword instead of 32 (1.17-1.20x on Zen 3,
  // AVX2, where the tile is bound by its codeword loads).
  const uint16_t* codebook_half = nullptr;
  // Integer decode (layouts.vq_int8_codebooks), else nullptr: the codebooks as int8 [M][codewords][8]
  // whose sum over the books fits int8 at every position, and one float per position of a group,
  // codebook ~ int8 * position_scale. Each activation row is then scaled by the position scales and
  // rounded to int8 with one scale of its own (quantize_vq_int8): y = scale * x_scale * (integer dot).
  const int8_t* codebook_int8 = nullptr;
  const float* position_scale = nullptr;
};

// q = x * position_scale[c % 8] rounded to int8 with one scale for the row (the largest magnitude
// -> 127); returns that scale, or -1 where x holds a NaN or an infinity (q unusable).
inline float quantize_vq_int8(const float* x, int64_t cols, const float* position_scale, int8_t* q) {
  // Branch-free passes the compiler vectorizes: v - v is 0 for a finite v and NaN otherwise.
  float largest = 0.0f, not_finite = 0.0f;
  for (int64_t c = 0; c < cols; ++c) {
    const float v = x[c] * position_scale[c % 8];
    not_finite += v - v;
    largest = std::max(largest, std::fabs(v));
  }
  if (not_finite != 0.0f) return -1.0f;
  const float inverse = largest < 1e-30f ? 0.0f : 127.0f / largest;
  // + 1.5 * 2^23 rounds to an integer, ties to even (torch.round), for |v| <= 127; no libm call per value
  constexpr float kRound = 12582912.0f;
  for (int64_t c = 0; c < cols; ++c) {
    const float v = std::min(127.0f, std::max(-127.0f, x[c] * position_scale[c % 8] * inverse));
    q[c] = static_cast<int8_t>(static_cast<int32_t>((v + kRound) - kRound));
  }
  return largest < 1e-30f ? 0.0f : largest / 127.0f;
}

// The integer dot product of groups [first, end) of one row (its codes: kBooks bytes a group) with q.
inline int32_t vq_int8_dot(const int8_t* books, int64_t codewords, int64_t n_books, const uint8_t* codes, int64_t first,
                           int64_t end, const int8_t* q) {
  int32_t total = 0;
  for (int64_t j = first; j < end; ++j)
    for (int t = 0; t < 8; ++t) {
      int32_t w = 0;
      for (int64_t m = 0; m < n_books; ++m) w += books[(m * codewords + codes[j * n_books + m]) * 8 + t];
      total += w * q[j * 8 + t];
    }
  return total;
}

// IEEE half -> float, exactly (subnormals, infinities and NaN included): the portable path's
// conversion (the x86 paths convert in hardware, F16C).
inline float half_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = sign | (exponent == 31 ? 0x7f800000u | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13));
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Work of the first r rows of a VQ layer, in the unit of the thread thresholds (bytes of a memory-
// bound weight): rebuilding a weight from M codewords costs about M / 2 reads of an int8 weight (two
// codebooks: a 4096 x 4096 layer 1.4 ms, dense int8 1.3-1.8 ms on Zen 3), four times its code bytes,
// which had left SmolLM2's 576-row projections on one thread.
inline int64_t vq_cost(const VQArgs& a, int64_t r) { return r * a.cols * a.codebooks / 2; }

// Bitmask-sparse 4-bit codes (the `bitmask-packed` format in memory), cols a multiple of 64: per
// row and 64-column block, the block's kept codes as nibbles in column order (low nibble first),
// padded to an even count; row_offsets[r] is the row's first byte. w = scale[g] * (code - zero[g])
// at kept positions (groups of whole blocks, or one group per row), 0 elsewhere. Batch 1, on int16
// activations where x is finite (else on fp32 x, scalar).
struct SparseInt4Args {
  Activations x;
  int64_t rows, cols, group_size, n_groups;
  const uint8_t* mask;  // [rows][cols / 8]
  const uint8_t* codes;
  const int64_t* row_offsets;  // [rows + 1] bytes
  const float* scale;          // [rows][n_groups]
  const float* zero;           // [rows][n_groups], integers
  float* y;
};

// How an ISA's row kernel takes a block of SparseInt4Args (its Simd::kSparseInt4): a masked byte
// expand of the packed codes (Simd::sparse_int4_madd, VBMI2), codes spread one per byte in a first
// pass and expanded by table in a second (Simd::spread_int4_madd), or a scalar walk over the bits.
enum SparseInt4Method : int { kSparseInt4Scalar = 0, kSparseInt4Spread = 1, kSparseInt4Expand = 2 };

// One query head against cached keys / values (decode.cpp), positions [first, first + count):
// out = softmax(s) V with s_t = scale * q . k_t. The keys are stored in blocks of kKeyBlock
// positions, transposed within a block: k_t[d] = keys[(t / kKeyBlock * head_dim + d) * kKeyBlock
// + t % kKeyBlock]; the values are rows, v_t[d] = values[t * head_dim + d].
constexpr int64_t kKeyBlock = 32;

struct AttentionArgs {
  const float* q;
  const float* keys;
  const float* values;
  int64_t head_dim, first, count;
  float scale;
  float* scores;  // scratch, >= count + kKeyBlock floats
  float* out;     // [head_dim]
};

// `scratch` is a per-thread buffer of at least scratch_floats(cols, simd_width) floats.
template <class Args>
using RowKernel = void (*)(const Args&, int64_t row_begin, int64_t row_end, float* scratch);

// The batched attention's tiles: kAttentionCols key (or value) columns, query rows padded to a
// multiple of kAttentionPad (every path's tile height divides it).
constexpr int64_t kAttentionCols = 16, kAttentionPad = 12;

struct KernelTable {
  int simd_width;  // floats per vector register; fixes the tile and int4 block layouts
  RowKernel<BitmaskArgs> bitmask;
  RowKernel<NMArgs> nm;
  RowKernel<QuantArgs> quant;
  RowKernel<DenseArgs> dense;
  RowKernel<VQArgs> vq;
  RowKernel<SparseInt4Args> sparse_int4;
  void (*attention)(const AttentionArgs&);
  // gate[i] = activation(gate[i]) * up[i] for i < n (a GatedActivation), the gated MLP's middle.
  void (*gated_activation)(int activation, const float* up, float* gate, int64_t n);
  // The batched attention (attention.cpp): its micro-kernel, attention_rows x kAttentionCols, and a
  // softmax row (row_kernels.h).
  int attention_rows;
  void (*attention_tile)(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc);
  float (*attention_softmax_row)(float* s, const float* bias, const float* keep, int64_t live, int64_t padded);
  // nullptr on paths without AVX-512 VNNI: Python computes the same integers with torch there.
  RowKernel<Int8BlockArgs> int8_blocks;
};

inline int64_t scratch_floats(int64_t cols, int64_t simd_width) { return 2 * (cols + 4 * simd_width); }

struct FreeBuffer {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], FreeBuffer>;

// Zero-initialized, 64-byte aligned floats.
inline Buffer zeroed_floats(int64_t count) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return Buffer(static_cast<float*>(p));
}

// Floats per activation row handed to the row kernels: zero padded far enough past `cols` that
// every vector load of a row kernel reads zeros there.
inline int64_t padded_stride(int64_t cols) { return (cols + 63) / 64 * 64 + 64; }

// Batch lanes per tile of the sparse row kernels: one register's W lanes for a batch that fits
// them, else 2W.
inline int64_t sparse_tile(int64_t batch, int64_t simd_width) { return batch <= simd_width ? simd_width : 2 * simd_width; }

// Floats of the tiles [n_tiles][cols][tile] of `batch` rows, plus one tile the kernels may read past.
inline int64_t tile_floats(int64_t batch, int64_t cols, int64_t tile) { return ((batch + tile - 1) / tile * cols + 1) * tile; }

// Writes x [batch][cols] into zeroed tiles [n_tiles][cols][tile] (tile_floats floats): the lanes of
// a column contiguous, missing lanes left zero. Column-major within a tile, so the writes run
// contiguously and the reads are `tile` sequential streams (one per token).
template <class Load>
void write_tiles(const Load& load, int64_t batch, int64_t cols, int64_t tile, float* tiles) {
  for (int64_t first = 0; first < batch; first += tile) {
    const int64_t lanes = std::min(tile, batch - first);
    float* out = tiles + first / tile * cols * tile;
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t lane = 0; lane < lanes; ++lane) out[j * tile + lane] = load((first + lane) * cols + j);
  }
}

// The first row r with cost(r) >= target (rows when none): where a range of rows of cost `target`,
// counted from row 0, ends; cost(r) is the (nondecreasing) work of rows [0, r).
template <class Cost>
int64_t row_at_cost(int64_t rows, double target, const Cost& cost) {
  int64_t low = 0, high = rows;
  while (low < high) {
    const int64_t mid = (low + high) / 2;
    if (static_cast<double>(cost(mid)) < target) low = mid + 1; else high = mid;
  }
  return low;
}

// First row of part `part` out of `parts` when rows are split into contiguous ranges of about
// equal cost.
template <class Cost>
int64_t split_row(int64_t rows, int part, int parts, const Cost& cost) {
  if (part >= parts) return rows;
  return row_at_cost(rows, static_cast<double>(cost(rows)) * part / parts, cost);
}

enum Path : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vbmi2 = 3 };
enum Status : int { kOk = 0, kUnsupportedPath = 1, kInvalidArgument = 2, kOutOfMemory = 3, kNonFinite = 4 };

const KernelTable& portable_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
const KernelTable& avx512vbmi2_kernels();

// Whether this CPU runs `path` (a Path), and its kernels (dispatch.cpp).
bool cpu_supports(int path);
const KernelTable& kernels_for(int path);

}  // namespace secateurs
