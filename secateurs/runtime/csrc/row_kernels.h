// Row kernels written once against the `Simd` wrapper that the including translation unit defines
// (portable.cpp, avx2.cpp, avx512.cpp). It is included after that unit's `#pragma GCC target`,
// and everything here has internal linkage, so each instruction set gets its own compiled copy
// and no inline function compiled for a wider ISA can leak into another unit.
//
// Simd provides: W (floats per vector), F / I (float / int32 vectors), zero, set1, load, store,
// add, sub, mul, div, min, max, fma(a, b, c) = a * b + c, hsum, load_i32, add_i32, load_u8 (W
// bytes -> int32 lanes), low_nibbles, high_nibbles, to_float (convert), round_to_int (to nearest),
// pow2(n) (2^n for integer lanes n in [-126, 127]), as_float (same bits), load_values (W float,
// bf16-bits or int8 values -> fp32), compress(bits, v) (the lanes of v whose bit is set, packed
// from lane 0 up; the others undefined), expand(bits, values) (lane i = the next value, in order,
// if bit i is set, else 0; reads up to W values, converted to fp32 times 1 / expand_unit(T{})),
// expand_pair(bits, values, low, high) (expand of two chunks from 2W mask bits; returns their
// popcount), in_register(v) (keeps v in a register), transpose_block(in, in_stride, out,
// out_stride) (a W x W block: out[j * out_stride + i] = in[i * in_stride + j]), lookup2(window, idx) (lane i =
// window[idx[i]], idx < 2W), madd(codes, q) (2W int8 or uint8 codes times 2W int16: lane i =
// codes[2i] q[2i] + codes[2i + 1] q[2i + 1] in int32) and expand_madd(bits, values, q, count)
// (madd of the int8 values expanded by 2W mask bits, as expand; count = their popcount).

#include <type_traits>

namespace secateurs {
namespace {

using F = Simd::F;
using I = Simd::I;
constexpr int W = Simd::W;

inline float value_to_float(float v) { return v; }
inline float value_to_float(int8_t v) { return static_cast<float>(v); }
inline float value_to_float(uint16_t bf16_bits) {
  const uint32_t bits = static_cast<uint32_t>(bf16_bits) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Calls fn with a value of the C++ type that stores values of `type` (bf16 as its raw bits).
template <class Fn>
void visit_value_type(int type, Fn&& fn) {
  switch (type) {
    case kFloat32: fn(float{}); break;
    case kBFloat16: fn(uint16_t{}); break;
    case kInt8: fn(int8_t{}); break;
  }
}

// Requests [begin, begin + bytes) into the cache. The batch-1 kernels stream each weight once
// and compute too little per byte for the hardware prefetcher alone to hide the DRAM latency,
// so every row asks for the weights of the row kPrefetchRows ahead.
constexpr int64_t kPrefetchRows = 2;
inline void prefetch(const void* begin, int64_t bytes) {
  const char* p = static_cast<const char*>(begin);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

inline F sum_of(const F* v, int count) {
  F total = v[0];
  for (int i = 1; i < count; ++i) total = Simd::add(total, v[i]);
  return total;
}

// ---------------------------------------------------------------------------------------------
// Batch 1 over int16 activations (kernels.h, quantize_int16): codes (int8 weights or values, or
// uint8 quantized codes) times q summed exactly in int32 per block, each block's sum times
// scale_of(block) (the activation scale, times a weight group's scale) accumulated in fp32.
// block_sum(b) is called for b = 0, 1, ... in order.
template <class ScaleOf, class BlockSum>
float sum_scaled_blocks(int64_t blocks, const ScaleOf& scale_of, BlockSum&& block_sum) {
  F acc0 = Simd::zero(), acc1 = Simd::zero();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    acc0 = Simd::fma(Simd::to_float(block_sum(b)), Simd::set1(scale_of(b)), acc0);
    acc1 = Simd::fma(Simd::to_float(block_sum(b + 1)), Simd::set1(scale_of(b + 1)), acc1);
  }
  if (b < blocks) acc0 = Simd::fma(Simd::to_float(block_sum(b)), Simd::set1(scale_of(b)), acc0);
  return Simd::hsum(Simd::add(acc0, acc1));
}

// Dense codes: 2W columns per madd.
template <class Code, class ScaleOf>
float int16_dot(const Code* w, const int16_t* q, const ScaleOf& scale_of, int64_t cols) {
  constexpr int64_t kSteps = kInt16Block / (2 * W);
  const int64_t blocks = cols / kInt16Block;
  const float total = sum_scaled_blocks(blocks, scale_of, [&](int64_t block) {
    const int64_t col = block * kInt16Block;
    I sum = Simd::madd(w + col, q + col);
    for (int64_t s = 1; s < kSteps; ++s) sum = Simd::add_i32(sum, Simd::madd(w + col + s * 2 * W, q + col + s * 2 * W));
    return sum;
  });
  int32_t tail = 0;
  for (int64_t j = blocks * kInt16Block; j < cols; ++j) tail += static_cast<int32_t>(w[j]) * q[j];
  return tail ? total + static_cast<float>(tail) * scale_of(blocks) : total;
}

// 4-bit codes, W bytes per 2W columns (QuantArgs' int4 layout); cols a multiple of kInt16Block.
template <class ScaleOf>
float int4_int16_dot(const uint8_t* bytes, const int16_t* q, const ScaleOf& scale_of, int64_t cols) {
  constexpr int64_t kSteps = kInt16Block / (2 * W);
  return sum_scaled_blocks(cols / kInt16Block, scale_of, [&](int64_t block) {
    const uint8_t* block_bytes = bytes + block * kInt16Block / 2;
    const int16_t* block_q = q + block * kInt16Block;
    I sum = Simd::madd_int4(block_bytes, block_q);
    for (int64_t s = 1; s < kSteps; ++s) sum = Simd::add_i32(sum, Simd::madd_int4(block_bytes + s * W, block_q + s * 2 * W));
    return sum;
  });
}

// ---------------------------------------------------------------------------------------------
// Sparse rows times a batch of activations (batch > 1): the kept weights of a row are decoded
// once into (offset of their x column in a tile, fp32 value) pairs, then every kept weight is
// broadcast and multiplied with the batch lanes of its x column, so the work scales with nnz.

template <class T>
const float* values_as_float(const T* values, int64_t count, float* buffer) {
  for (int64_t k = 0; k < count; ++k) buffer[k] = value_to_float(values[k]);
  return buffer;
}
inline const float* values_as_float(const float* values, int64_t, float*) { return values; }

// Sum over the chains of accumulator vector v.
template <int kChains, int kVecs>
inline F chain_sum(const F (&acc)[kChains][kVecs], int v) {
  F total = acc[0][v];
  for (int c = 1; c < kChains; ++c) total = Simd::add(total, acc[c][v]);
  return total;
}

// out[0, kVecs W) = sum_k values[k] * xt[offsets[k] + (0 .. kVecs W)]: one row's kept weights against
// a tile of tokens. A function of its own: inlined into bitmask_rows_many_tiles's loop, GCC kept
// fewer of the accumulators in registers (7-10% slower).
template <int kVecs, int kChains>
inline void row_times_tile(const float* xt, const int32_t* offsets, const float* values, int64_t count, float* out) {
  F acc[kChains][kVecs];
  for (auto& chain : acc)
    for (F& v : chain) v = Simd::zero();
  int64_t k = 0;
  for (; k + kChains <= count; k += kChains)
    for (int c = 0; c < kChains; ++c) {
      const F weight = Simd::set1(values[k + c]);
      const float* column = xt + offsets[k + c];
      for (int v = 0; v < kVecs; ++v) acc[c][v] = Simd::fma(weight, Simd::load(column + v * W), acc[c][v]);
    }
  for (; k < count; ++k) {
    const F weight = Simd::set1(values[k]);
    for (int v = 0; v < kVecs; ++v) acc[0][v] = Simd::fma(weight, Simd::load(xt + offsets[k] + v * W), acc[0][v]);
  }
  for (int v = 0; v < kVecs; ++v) Simd::store(out + v * W, chain_sum(acc, v));
}

// y[(t * x.tile + lane) * y_stride] = scale * (row . token), over the tiles of x (x.tile = kVecs W).
template <int kVecs>
void sparse_row_times_tiles(const Activations& x, int64_t cols, const int32_t* offsets,
                            const float* values, int64_t count, float scale, float* y,
                            int64_t y_stride) {
  for (int64_t tile = 0; tile * x.tile < x.batch; ++tile) {
    float lanes[kVecs * W];
    // independent accumulators per vector hide the FMA latency
    row_times_tile<kVecs, kVecs >= 4 ? 2 : 4>(x.tiles + tile * cols * x.tile, offsets, values, count, lanes);
    const int64_t first = tile * x.tile;
    const int64_t lane_count = x.batch - first < x.tile ? x.batch - first : x.tile;
    for (int64_t lane = 0; lane < lane_count; ++lane) y[(first + lane) * y_stride] = lanes[lane] * scale;
  }
}

// x.tile is W or 2W here (kernels.h: sparse_tile); larger batches take bitmask_rows_many_tiles.
inline void sparse_row_times_activations(const Activations& x, int64_t cols, const int32_t* offsets,
                                         const float* values, int64_t count, float scale, float* y,
                                         int64_t y_stride) {
  if (x.tile == W)
    sparse_row_times_tiles<1>(x, cols, offsets, values, count, scale, y, y_stride);
  else
    sparse_row_times_tiles<2>(x, cols, offsets, values, count, scale, y, y_stride);
}

// e^x to within a few ulp: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), Cephes' degree-6
// polynomial for e^r, times 2^n. x is clamped to [-87.3, 88] (results from 2^-126 to ~1.6e38).
inline F exp_of(F x) {  // a NaN stays NaN: min and max return their second operand for a NaN
  x = Simd::max(Simd::set1(-87.33654f), Simd::min(Simd::set1(88.0f), x));
  const I n = Simd::round_to_int(Simd::mul(x, Simd::set1(1.44269504088896341f)));
  const F nf = Simd::to_float(n);
  F r = Simd::fma(nf, Simd::set1(-0.693359375f), x);
  r = Simd::fma(nf, Simd::set1(2.12194440e-4f), r);
  F p = Simd::set1(1.9875691500e-4f);
  p = Simd::fma(p, r, Simd::set1(1.3981999507e-3f));
  p = Simd::fma(p, r, Simd::set1(8.3334519073e-3f));
  p = Simd::fma(p, r, Simd::set1(4.1665795894e-2f));
  p = Simd::fma(p, r, Simd::set1(1.6666665459e-1f));
  p = Simd::fma(p, r, Simd::set1(5.0000001201e-1f));
  p = Simd::fma(p, Simd::mul(r, r), Simd::add(r, Simd::set1(1.0f)));
  return Simd::mul(p, Simd::pow2(n));
}

inline float scalar_activation(float g, int activation) {
  switch (activation) {
    case kGeluTanh: return 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    case kGeluErf: return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
    case kNoActivation: return g;
    default: return g / (1.0f + std::exp(-g));
  }
}

// act(g) by lanes: SiLU g / (1 + e^-g); GELU-tanh 0.5 g (1 + tanh(y)) with tanh(y) = 1 - 2 / (e^2y + 1);
// GELU-erf 0.5 g (1 + erf(g / sqrt 2)) = max(g, 0) - 0.5 |g| erfc(|g| / sqrt 2), erfc by Abramowitz &
// Stegun 7.1.26 (absolute error below 1.5e-7); kNoActivation: g.
inline F activation_of(F g, int activation) {
  const F one = Simd::set1(1.0f), half = Simd::set1(0.5f);
  switch (activation) {
    case kSilu: return Simd::div(g, Simd::add(one, exp_of(Simd::sub(Simd::zero(), g))));
    case kGeluTanh: {
      const F c = Simd::set1(2.0f * 0.7978845608028654f), c3 = Simd::set1(2.0f * 0.7978845608028654f * 0.044715f);
      const F y2 = Simd::mul(g, Simd::fma(c3, Simd::mul(g, g), c));  // 2y
      const F tanh = Simd::sub(one, Simd::div(Simd::set1(2.0f), Simd::add(exp_of(y2), one)));
      return Simd::mul(Simd::mul(half, g), Simd::add(one, tanh));
    }
    case kGeluErf: {
      const F magnitude = Simd::max(g, Simd::sub(Simd::zero(), g));
      const F z = Simd::mul(magnitude, Simd::set1(0.7071067811865476f));
      const F t = Simd::div(one, Simd::fma(Simd::set1(0.3275911f), z, one));
      F p = Simd::set1(1.061405429f);
      p = Simd::fma(p, t, Simd::set1(-1.453152027f));
      p = Simd::fma(p, t, Simd::set1(1.421413741f));
      p = Simd::fma(p, t, Simd::set1(-0.284496736f));
      p = Simd::fma(p, t, Simd::set1(0.254829592f));
      const F erfc = Simd::mul(Simd::mul(p, t), exp_of(Simd::sub(Simd::zero(), Simd::mul(z, z))));
      return Simd::sub(Simd::max(g, Simd::zero()), Simd::mul(Simd::mul(half, magnitude), erfc));
    }
    default: return g;
  }
}

// y[i] = act(y[i] + bias) for i < n: bias[i] (bias_stride 1), bias[0] for all (bias_stride 0), or
// none (bias nullptr).
inline void bias_activation(float* y, int64_t n, const float* bias, int64_t bias_stride, int activation) {
  if (!bias && activation == kNoActivation) return;
  const F broadcast = Simd::set1(bias && bias_stride == 0 ? bias[0] : 0.0f);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const F b = !bias ? Simd::zero() : bias_stride ? Simd::load(bias + i) : broadcast;
    Simd::store(y + i, activation_of(Simd::add(Simd::load(y + i), b), activation));
  }
  for (; i < n; ++i) y[i] = scalar_activation(y[i] + (bias ? bias[i * bias_stride] : 0.0f), activation);
}

// ---------------------------------------------------------------------------------------------
// Bitmask: uint8 [rows, mask_stride] LSB first, values [nnz] row-major, row_offsets [rows + 1].

// Bits of one mask chunk (W / 8 bytes, of which `bytes` exist), little endian.
inline unsigned chunk_bits(const uint8_t* mask, int64_t bytes) {
  unsigned bits = 0;
  std::memcpy(&bits, mask, static_cast<size_t>(bytes));
  return bits;
}

// Stores, for every W-column chunk of a mask row, the lanes of vector_of(chunk) whose mask bit
// is set, contiguously into out (full-vector stores: the lanes past a chunk's popcount are
// overwritten by the next store, so out needs W spare floats). Branch-free; returns the count.
template <class VectorOf>
int64_t compress_by_mask(const uint8_t* mask, int64_t mask_bytes, float* out, VectorOf&& vector_of) {
  constexpr int kChunkBytes = W / 8;
  const int64_t full_chunks = mask_bytes / kChunkBytes;
  int64_t count = 0;
  auto store_chunk = [&](int64_t chunk, unsigned bits) {
    Simd::store(out + count, Simd::compress(bits, vector_of(chunk)));
    count += __builtin_popcount(bits);
  };
  for (int64_t chunk = 0; chunk < full_chunks; ++chunk)
    store_chunk(chunk, chunk_bits(mask + chunk * kChunkBytes, kChunkBytes));
  if (const int64_t rest = mask_bytes - full_chunks * kChunkBytes)
    store_chunk(full_chunks, chunk_bits(mask + full_chunks * kChunkBytes, rest));
  return count;
}

// The batch-1 kernel streams the values of consecutive rows back to back. Prefetching that stream
// a fixed distance ahead on every step (every 2W columns) measured 1.3-2x faster from DRAM than
// prefetching whole rows ahead, or the stream once per 64 columns, which at 50% density left half
// the lines to the hardware prefetcher (4096x4096 fp32 at 50%: 2.0 -> 1.3 ns per 8 columns,
// 70%: 1.39 -> 1.11; bf16 and int8 20-35% faster). Interleaving rows to share the x loads was
// slower from DRAM for every value type. The mask, 1 bit per weight, is left to the hardware.
constexpr int64_t kStreamPrefetchBytes = 4096;

// Batch 1, one row: every W-column chunk expands its kept values (read at the row's running value
// offset) into the lanes of its set mask bits, zeros elsewhere, and multiplies them with the dense
// x chunk: x stays in L1, nothing is stored, and the only serial work per chunk is adding a
// popcount. Two chunks are taken per step (one mask load, the second chunk's offset from the low
// popcount). The expansion may read up to W values past the row's last one (see bitmask_rows_batch1).
template <class T>
float expand_dot_row(const uint8_t* mask, int64_t mask_stride, const T* v, const float* x) {
  constexpr int kChunkBytes = W / 8;
  F acc[2] = {Simd::zero(), Simd::zero()};
  const int64_t pairs = mask_stride / (2 * kChunkBytes);
  for (int64_t p = 0; p < pairs; ++p) {
    __builtin_prefetch(reinterpret_cast<const char*>(v) + kStreamPrefetchBytes);
    F low, high;
    v += Simd::expand_pair(chunk_bits(mask + 2 * p * kChunkBytes, 2 * kChunkBytes), v, low, high);
    acc[0] = Simd::fma(low, Simd::load(x + 2 * p * W), acc[0]);
    acc[1] = Simd::fma(high, Simd::load(x + (2 * p + 1) * W), acc[1]);
  }
  for (int64_t byte = pairs * 2 * kChunkBytes; byte < mask_stride; byte += kChunkBytes) {
    const unsigned bits = chunk_bits(mask + byte, mask_stride - byte < kChunkBytes ? mask_stride - byte : kChunkBytes);
    acc[0] = Simd::fma(Simd::expand(bits, v), Simd::load(x + byte * 8), acc[0]);
    v += __builtin_popcount(bits);
  }
  return Simd::hsum(Simd::add(acc[0], acc[1]));
}

// The kept columns [first, cols) of a bitmask row (values from v on) times int16 activations, exactly.
inline int32_t masked_tail_dot(const uint8_t* mask, const int8_t* v, const int16_t* q, int64_t first, int64_t cols) {
  int32_t tail = 0;
  for (int64_t j = first; j < cols; ++j)
    if (mask[j / 8] >> (j % 8) & 1) tail += static_cast<int32_t>(*v++) * q[j];
  return tail;
}

// Batch 1, int8 values on int16 activations (kernels.h): the kept values of 2W columns at a time
// expanded into int16 lanes and multiplied pairwise with q (Simd::expand_madd), summed in int32
// per block. Reads up to 3W values past the row's last one.
float expand_int16_row(const uint8_t* mask, const int8_t* v, const int16_t* q, const float* scale, int64_t cols) {
  constexpr int64_t kStepBytes = 2 * W / 8, kSteps = kInt16Block / (2 * W);
  const int64_t blocks = cols / kInt16Block;
  const float total = sum_scaled_blocks(blocks, [&](int64_t b) { return scale[b]; }, [&](int64_t block) {
    __builtin_prefetch(v + kStreamPrefetchBytes);
    const uint8_t* block_mask = mask + block * (kInt16Block / 8);
    const int16_t* block_q = q + block * kInt16Block;
    int count;
    I sum = Simd::expand_madd(chunk_bits(block_mask, kStepBytes), v, block_q, count);
    v += count;
    for (int64_t s = 1; s < kSteps; ++s) {
      sum = Simd::add_i32(sum, Simd::expand_madd(chunk_bits(block_mask + s * kStepBytes, kStepBytes), v, block_q + s * 2 * W, count));
      v += count;
    }
    return sum;
  });
  const int32_t tail = masked_tail_dot(mask, v, q, blocks * kInt16Block, cols);
  return tail ? total + static_cast<float>(tail) * scale[blocks] : total;
}

// Batch 1, int8 values on int16 activations, for rows that share one mask (BitmaskArgs::
// mask_group): the kept activations of every kInt16Block-column block are gathered once per group
// (8 columns per table shuffle) to the front of the block's own kInt16Block slots, zeros after;
// a row then multiplies its kept values with them densely, so its work is that of a dense row of
// its kept values. Every block takes the same number of madds (enough for the group's fullest
// block): a count-dependent loop mispredicted about once per block. The madds read up to
// steps * 2W - 1 values past a block's last one (times the zeros).
struct KeptActivations {
  int16_t* q;      // [blocks][kInt16Block]
  int32_t* count;  // [blocks] kept columns of each block
  int steps;       // madds of 2W columns per block
};

inline void gather_kept(const uint8_t* mask, const int16_t* q, int64_t blocks, KeptActivations& kept) {
  int most = 1;
  for (int64_t b = 0; b < blocks; ++b) {
    int16_t* out = kept.q + b * kInt16Block;
    float* slots = reinterpret_cast<float*>(out);  // zeroed as floats: vector stores (memset became rep stos)
    for (int64_t k = 0; k < kInt16Block / 2; k += W) Simd::store(slots + k, Simd::zero());
    int count = 0;
    for (int64_t byte = 0; byte < kInt16Block / 8; ++byte)
      count += Simd::gather_int16(mask[b * (kInt16Block / 8) + byte], q + b * kInt16Block + byte * 8, out + count);
    kept.count[b] = count;
    most = std::max(most, count);
  }
  kept.steps = static_cast<int>((most + 2 * W - 1) / (2 * W));
}

// kRows rows of one group at once: their kept values run through the same blocks with the same
// counts, so every gathered activation vector is loaded once for all of them. out = their dots.
template <int kRows>
void kept_int16_rows(const int8_t* const* rows, const KeptActivations& kept, const float* scale, int64_t blocks,
                     float* out) {
  const int8_t* v[kRows];
  F acc[kRows];
  for (int i = 0; i < kRows; ++i) v[i] = rows[i], acc[i] = Simd::zero();
  for (int64_t block = 0; block < blocks; ++block) {
    const int16_t* q = kept.q + block * kInt16Block;
    I sum[kRows];
    for (int i = 0; i < kRows; ++i) {
      __builtin_prefetch(v[i] + kStreamPrefetchBytes);
      sum[i] = Simd::madd(v[i], q);
    }
    for (int step = 1; step < kept.steps; ++step)
      for (int i = 0; i < kRows; ++i) sum[i] = Simd::add_i32(sum[i], Simd::madd(v[i] + step * 2 * W, q + step * 2 * W));
    const F block_scale = Simd::set1(scale[block]);
    for (int i = 0; i < kRows; ++i) {
      acc[i] = Simd::fma(Simd::to_float(sum[i]), block_scale, acc[i]);
      v[i] += kept.count[block];
    }
  }
  for (int i = 0; i < kRows; ++i) out[i] = Simd::hsum(acc[i]);
}

// The columns of a shared-mask row past its last whole kInt16Block block (from its own mask; its
// last values), times their activation scale.
inline float kept_tail(const BitmaskArgs& a, const int8_t* row, int64_t r, int64_t blocks) {
  const int64_t first = blocks * kInt16Block;
  if (first >= a.cols) return 0.0f;
  const uint8_t* mask = a.mask + r * a.mask_stride;
  int64_t tail_kept = 0;
  for (int64_t j = first; j < a.cols; ++j) tail_kept += mask[j / 8] >> (j % 8) & 1;
  const int8_t* v = row + (a.row_offsets[r + 1] - a.row_offsets[r]) - tail_kept;
  return static_cast<float>(masked_tail_dot(mask, v, a.x.int16, first, a.cols)) * a.x.int16_scale[blocks];
}

// Rows [row_begin, row_end) at batch 1. Rows whose expansion could read past the end of `values`
// (the last ones) read a zero-padded copy in scratch instead.
template <class T>
void bitmask_rows_batch1(const BitmaskArgs& a, int64_t row_begin, int64_t row_end, float* scratch) {
  // values an expansion (3W) or a shared-mask row (a block's kInt16Block slots) may read past a row's last one
  constexpr int64_t kReadPast = std::max<int64_t>(3 * W, kInt16Block);
  const T* values = static_cast<const T*>(a.values);
  const int64_t nnz = a.row_offsets[a.rows];
  const float unit = Simd::expand_unit(T{});
  T* padded = reinterpret_cast<T*>(scratch);
  // Shared masks: the group's gathered activations ([blocks][kInt16Block] int16, then the counts)
  // live in scratch after the padded row copy; scratch_floats leaves room for both.
  const int64_t blocks = a.cols / kInt16Block;
  const bool grouped = std::is_same_v<T, int8_t> && a.x.int16 && a.mask_group > 1 && blocks > 0;
  KeptActivations kept{};
  if (grouped) {
    char* base = reinterpret_cast<char*>(scratch) + (a.cols + kReadPast + 64) / 64 * 64;
    kept.q = reinterpret_cast<int16_t*>(base);
    kept.count = reinterpret_cast<int32_t*>(base + blocks * kInt16Block * 2);
  }
  int64_t group_end = 0;  // rows before it (from the gathered group's first) share `kept`
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* row = values + a.row_offsets[r];
    if (a.row_offsets[r + 1] + kReadPast > nnz) {
      const int64_t count = a.row_offsets[r + 1] - a.row_offsets[r];
      if (count > 0) std::memcpy(padded, row, static_cast<size_t>(count) * sizeof(T));
      std::memset(padded + count, 0, kReadPast * sizeof(T));
      row = padded;
    }
    const uint8_t* mask = a.mask + r * a.mask_stride;
    if constexpr (std::is_same_v<T, int8_t>) {
      if (grouped) {
        if (r >= group_end) {  // a division once per group, not per row
          const int64_t first = r - r % a.mask_group;
          gather_kept(a.mask + first * a.mask_stride, a.x.int16, blocks, kept);
          group_end = first + a.mask_group;
          // the groups' mask rows are mask_group rows apart: a stride the hardware prefetcher
          // missed (a third of this path's time in decode went to the first mask load)
          if (group_end + a.mask_group <= a.rows) prefetch(a.mask + (group_end + a.mask_group) * a.mask_stride, a.mask_stride);
        }
        // two rows of the group together where neither reads a padded copy
        if (r + 1 < row_end && r + 1 < group_end && row == values + a.row_offsets[r] &&
            a.row_offsets[r + 2] + kReadPast <= nnz) {
          const int8_t* pair[2] = {row, values + a.row_offsets[r + 1]};
          float dots[2];
          kept_int16_rows<2>(pair, kept, a.x.int16_scale, blocks, dots);
          a.y[r] = (dots[0] + kept_tail(a, pair[0], r, blocks)) * a.row_scale[r];
          a.y[r + 1] = (dots[1] + kept_tail(a, pair[1], r + 1, blocks)) * a.row_scale[r + 1];
          ++r;
          continue;
        }
        float dot;
        kept_int16_rows<1>(&row, kept, a.x.int16_scale, blocks, &dot);
        a.y[r] = (dot + kept_tail(a, row, r, blocks)) * a.row_scale[r];
        continue;
      }
      if (a.x.int16) {
        a.y[r] = expand_int16_row(mask, row, a.x.int16, a.x.int16_scale, a.cols) * a.row_scale[r];
        continue;
      }
    }
    const float dot = expand_dot_row(mask, a.mask_stride, row, a.x.rows);
    a.y[r] = dot * (a.row_scale ? a.row_scale[r] : 1.0f) * unit;
  }
}

// Offsets (column * tile) of the kept columns of a mask row, for the batched path.
inline int64_t bitmask_row_offsets(const uint8_t* mask, int64_t mask_bytes, int64_t tile, int32_t* offsets) {
  int32_t first_chunk[W], chunk_step[W];
  for (int lane = 0; lane < W; ++lane) {
    first_chunk[lane] = static_cast<int32_t>(lane * tile);
    chunk_step[lane] = static_cast<int32_t>(W * tile);
  }
  I columns = Simd::load_i32(first_chunk);
  const I step = Simd::load_i32(chunk_step);
  return compress_by_mask(mask, mask_bytes, reinterpret_cast<float*>(offsets), [&](int64_t) {
    const F chunk_offsets = Simd::as_float(columns);
    columns = Simd::add_i32(columns, step);
    return chunk_offsets;
  });
}

// out[j * out_stride + i] = in[i * in_stride + j] for i < rows, j < cols: W x W blocks by
// Simd::transpose_block, the edges one by one. A strided scalar copy cost 2.4 ns per element on a
// Zen 3, as much as an encoder layer's whole sparse product at 90% (1024 tokens, 384 columns).
inline void transpose(const float* in, int64_t in_stride, int64_t rows, int64_t cols, float* out, int64_t out_stride) {
  const int64_t full_rows = rows - rows % W, full_cols = cols - cols % W;
  for (int64_t j = 0; j < full_cols; j += W)
    for (int64_t i = 0; i < full_rows; i += W)
      Simd::transpose_block(in + i * in_stride + j, in_stride, out + j * out_stride + i, out_stride);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = i < full_rows ? full_cols : 0; j < cols; ++j) out[j * out_stride + i] = in[i * in_stride + j];
}

// Four rows sharing one mask (4 x 1 blocks: rows in groups of mask_group, a multiple of 4) against
// a tile of tokens, one half tile (2 vectors: one 64-byte line of a tile column at W = 8) at a time:
// each kept column's x is loaded once for the four rows, 8 FMAs on 2 loads and 4 broadcasts, where a
// single row needs 6 loads for 4 FMAs. The half tile of every column fits L1 up to ~400 columns.
// On a Zen 3 (stand-alone loop, 1536 x 384 at 90%, 1024 tokens, one thread) 84-89 GFLOP/s against 55
// for rows one at a time. weights: [kept][4], each row's value times its scale.
constexpr int kGroupRows = 4, kHalfVecs = 2;
inline void group_times_tile(const float* xt, int64_t tile, const int32_t* offsets, const float* weights, int64_t count,
                             float* out) {
  for (int64_t half = 0; half < tile; half += kHalfVecs * W) {
    F acc[kGroupRows][kHalfVecs];
    for (auto& row : acc)
      for (F& v : row) v = Simd::zero();
    for (int64_t k = 0; k < count; ++k) {
      const float* column = xt + offsets[k] + half;
      const F x0 = Simd::load(column), x1 = Simd::load(column + W);
      for (int r = 0; r < kGroupRows; ++r) {
        const F weight = Simd::set1(weights[k * kGroupRows + r]);
        acc[r][0] = Simd::fma(weight, x0, acc[r][0]);
        acc[r][1] = Simd::fma(weight, x1, acc[r][1]);
      }
    }
    for (int r = 0; r < kGroupRows; ++r) {
      Simd::store(out + r * tile + half, acc[r][0]);
      Simd::store(out + r * tile + half + W, acc[r][1]);
    }
  }
}

// Batches of more than one tile (kernels.h: many_tiles; encoders, prefill) come as rows: the rows
// of [row_begin, row_end) are decoded once into (offset, fp32 value) pairs for the whole call, then
// the tokens are taken a tile (4W tokens) at a time, transposed into a thread-local tile that every
// row of the range passes over (in L1 up to ~250 columns with AVX2, in L2 beyond): per kept weight
// and tile, 8 bytes of decoded weight read against 4 * tile bytes of x, 3 chains of 4 accumulators
// (2 chains left the FMAs waiting on their own latency: 10-15% slower on MiniLM's shapes; splitting
// the columns into L1-sized chunks, or tiles of 2W or 6W tokens, were no faster).
// A tile's outputs go to a [row][lane] buffer, get the epilogue (bias, activation) there while in
// cache, then go into y [batch][rows] transposed in W x W blocks: storing them straight into y
// would touch a cache line per token for every row.
// Rows in groups of 4 sharing a mask (mask_group a multiple of 4) take group_times_tile: the
// groups wholly inside [row_begin, row_end) are [group_begin, group_end); rows outside go one by one.
// A group's offsets are stored once, at its first row's place; its weights interleaved [kept][4] from
// there (the group's four rows hold 4x its first row's kept count, so they fit the rows' span).
template <class T>
void bitmask_rows_many_tiles(const BitmaskArgs& a, int64_t row_begin, int64_t row_end) {
  const T* values = static_cast<const T*>(a.values);
  constexpr int kTileVecs = kManyTilesVecs, kChains = 3;
  constexpr int64_t tile = kTileVecs * W;
  const bool grouped = a.mask_group % kGroupRows == 0;
  const int64_t group_begin = grouped ? std::min(row_end, (row_begin + kGroupRows - 1) / kGroupRows * kGroupRows) : row_end;
  const int64_t group_end = grouped ? std::max(group_begin, row_end / kGroupRows * kGroupRows) : row_end;
  const auto in_group = [&](int64_t r) { return r >= group_begin && r < group_end; };
  const int64_t first = a.row_offsets[row_begin], kept = a.row_offsets[row_end] - first;
  std::vector<int32_t> offsets(static_cast<size_t>(kept + W));  // W spare: compress_by_mask stores whole vectors
  std::vector<float> weights(static_cast<size_t>(kept + W));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t start = a.row_offsets[r] - first;
    if (!in_group(r) || (r - group_begin) % kGroupRows == 0)
      bitmask_row_offsets(a.mask + r * a.mask_stride, a.mask_stride, tile, offsets.data() + start);
    const float scale = a.row_scale ? a.row_scale[r] : 1.0f;
    if (!in_group(r)) {
      for (int64_t k = a.row_offsets[r]; k < a.row_offsets[r + 1]; ++k) weights[k - first] = value_to_float(values[k]) * scale;
      continue;
    }
    const int64_t lead = r - (r - group_begin) % kGroupRows, lane = r - lead, count = a.row_offsets[lead + 1] - a.row_offsets[lead];
    float* group_weights = weights.data() + (a.row_offsets[lead] - first);
    for (int64_t k = 0; k < count; ++k) group_weights[k * kGroupRows + lane] = value_to_float(values[a.row_offsets[r] + k]) * scale;
  }
  const int64_t range = row_end - row_begin;
  // 64-byte aligned: a tile column's vectors then never straddle a cache line
  const Buffer tiled = zeroed_floats(a.cols * tile + tile), out = zeroed_floats(range * tile);
  for (int64_t token0 = 0; token0 < a.x.batch; token0 += tile) {
    const int64_t lanes = std::min(tile, a.x.batch - token0);
    if (lanes < tile) std::fill(tiled.get(), tiled.get() + a.cols * tile + tile, 0.0f);  // the last tile's missing tokens
    transpose(a.x.rows + token0 * a.x.row_stride, a.x.row_stride, lanes, a.cols, tiled.get(), tile);
    for (int64_t r = row_begin; r < row_end;) {
      float* lanes_out = out.get() + (r - row_begin) * tile;
      const int64_t start = a.row_offsets[r] - first, count = a.row_offsets[r + 1] - a.row_offsets[r];
      const int64_t rows_done = in_group(r) ? kGroupRows : 1;
      if (in_group(r))
        group_times_tile(tiled.get(), tile, offsets.data() + start, weights.data() + start, count, lanes_out);
      else
        row_times_tile<kTileVecs, kChains>(tiled.get(), offsets.data() + start, weights.data() + start, count, lanes_out);
      for (int64_t done = 0; done < rows_done; ++done)
        bias_activation(lanes_out + done * tile, lanes, a.bias ? a.bias + r + done : nullptr, 0, a.activation);
      r += rows_done;
    }
    transpose(out.get(), tile, range, lanes, a.y + token0 * a.rows + row_begin, a.rows);
  }
}

// Batch 1, or one or two tiles of tokens.
template <class T>
void bitmask_rows_small_batch(const BitmaskArgs& a, int64_t row_begin, int64_t row_end, float* scratch) {
  if (a.x.batch == 1) return bitmask_rows_batch1<T>(a, row_begin, row_end, scratch);
  const T* values = static_cast<const T*>(a.values);
  int32_t* offsets = reinterpret_cast<int32_t*>(scratch);
  float* converted = scratch + a.cols + 2 * W;  // fp32 values
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* mask = a.mask + r * a.mask_stride;
    const T* row_values = values + a.row_offsets[r];
    const float scale = a.row_scale ? a.row_scale[r] : 1.0f;
    const int64_t count = bitmask_row_offsets(mask, a.mask_stride, a.x.tile, offsets);
    sparse_row_times_activations(a.x, a.cols, offsets, values_as_float(row_values, count, converted),
                                 count, scale, a.y + r, a.rows);
  }
}

template <class T>
void bitmask_rows_typed(const BitmaskArgs& a, int64_t row_begin, int64_t row_end, float* scratch) {
  if (!a.x.tiles && a.x.batch > 1) return bitmask_rows_many_tiles<T>(a, row_begin, row_end);  // fuses the epilogue
  bitmask_rows_small_batch<T>(a, row_begin, row_end, scratch);
  for (int64_t b = 0; b < a.x.batch; ++b)
    bias_activation(a.y + b * a.rows + row_begin, row_end - row_begin, a.bias ? a.bias + row_begin : nullptr, 1,
                    a.activation);
}

void bitmask_rows(const BitmaskArgs& a, int64_t row_begin, int64_t row_end, float* scratch) {
  visit_value_type(a.value_type, [&](auto type) {
    bitmask_rows_typed<decltype(type)>(a, row_begin, row_end, scratch);
  });
}

// ---------------------------------------------------------------------------------------------
// N:M: values and in-group indices [rows, cols * n / m].

template <class T>
float nm_row_dot(const NMArgs& a, const T* values, const uint8_t* indices, const float* x) {
  const int64_t kept = a.cols / a.m * a.n;
  int64_t k = 0;
  F acc[2] = {Simd::zero(), Simd::zero()};
  if (a.m <= 2 * a.n && W % a.n == 0) {
    // W kept values then come from W / n whole groups spanning at most 2W columns of x.
    int32_t group_start[W];
    for (int lane = 0; lane < W; ++lane) group_start[lane] = static_cast<int32_t>(lane / a.n * a.m);
    const I lane_base = Simd::load_i32(group_start);
    const int64_t window_step = W / a.n * a.m;
    auto accumulate_chunk = [&](int64_t first, F& sum) {
      const I window_index = Simd::add_i32(Simd::load_u8(indices + first), lane_base);
      const F gathered = Simd::lookup2(x + first / W * window_step, window_index);
      sum = Simd::fma(Simd::load_values(values + first), gathered, sum);
    };
    for (; k + 2 * W <= kept; k += 2 * W) {
      accumulate_chunk(k, acc[0]);
      accumulate_chunk(k + W, acc[1]);
    }
    if (k + W <= kept) accumulate_chunk(k, acc[0]), k += W;
  }
  float dot = Simd::hsum(Simd::add(acc[0], acc[1]));
  for (; k < kept; ++k) dot += value_to_float(values[k]) * x[k / a.n * a.m + indices[k]];
  return dot;
}

template <class T>
void nm_rows_typed(const NMArgs& a, int64_t row_begin, int64_t row_end, float* scratch) {
  const int64_t kept = a.cols / a.m * a.n;
  int32_t* offsets = reinterpret_cast<int32_t*>(scratch);
  float* converted = scratch + a.cols + 2 * W;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* values = static_cast<const T*>(a.values) + r * kept;
    const uint8_t* indices = a.indices + r * kept;
    if (a.x.batch == 1) {
      if (r + kPrefetchRows < a.rows) {
        prefetch(values + kPrefetchRows * kept, kept * sizeof(T));
        prefetch(indices + kPrefetchRows * kept, kept);
      }
      a.y[r] = nm_row_dot(a, values, indices, a.x.rows);
      continue;
    }
    for (int64_t group = 0, k = 0; k < kept; ++group)
      for (int64_t i = 0; i < a.n; ++i, ++k)
        offsets[k] = static_cast<int32_t>((group * a.m + indices[k]) * a.x.tile);
    sparse_row_times_activations(a.x, a.cols, offsets, values_as_float(values, kept, converted), kept,
                                 1.0f, a.y + r, a.rows);
  }
}

void nm_rows(const NMArgs& a, int64_t row_begin, int64_t row_end, float* scratch) {
  visit_value_type(a.value_type, [&](auto type) {
    nm_rows_typed<decltype(type)>(a, row_begin, row_end, scratch);
  });
}

// ---------------------------------------------------------------------------------------------
// Dense weight-only quantization. With w = s * (q - z) per group,
//   sum_j w_j x_j = sum_g s_g * sum_{j in g} q_j x_j  -  sum_g s_g z_g xsum_g,
// so the inner loop decodes s_g * q_j once per chunk and FMAs it into every batch row, and the
// zero-point term only needs the per-group sums of x (computed once per call by the dispatcher).

template <int kBits>
struct QuantCodes;

template <>
struct QuantCodes<8> {
  static constexpr int kVectors = 1;  // one chunk = W columns
  static int64_t row_bytes(int64_t cols) { return cols; }
  static void decode(const uint8_t* row, int64_t col, F scale, F* w) {
    w[0] = Simd::mul(Simd::to_float(Simd::load_u8(row + col)), scale);
  }
  static int code(const uint8_t* row, int64_t col) { return row[col]; }
  static int64_t x_index(int64_t col, int64_t) { return col; }
};

template <>
struct QuantCodes<4> {
  static constexpr int kVectors = 2;  // one chunk = W bytes = 2W columns: even, then odd ones
  static int64_t row_bytes(int64_t cols) { return (cols + 1) / 2; }
  static void decode(const uint8_t* row, int64_t col, F scale, F* w) {
    const I bytes = Simd::load_u8(row + col / 2);
    w[0] = Simd::mul(Simd::to_float(Simd::low_nibbles(bytes)), scale);
    w[1] = Simd::mul(Simd::to_float(Simd::high_nibbles(bytes)), scale);
  }
  static int code(const uint8_t* row, int64_t col) { return (row[col / 2] >> (col % 2 * 4)) & 15; }
  // Position of column `col` in activations deinterleaved in blocks of `block` columns.
  static int64_t x_index(int64_t col, int64_t block) {
    const int64_t in_block = col % block;
    return col - in_block + in_block / 2 + (in_block % 2) * (block / 2);
  }
};

// Output row r for the kBatch batch rows starting at first_batch.
template <int kBits, int kBatch>
void quant_row_batch(const QuantArgs& a, int64_t r, int64_t first_batch) {
  using Codes = QuantCodes<kBits>;
  constexpr int kVectors = Codes::kVectors;
  constexpr int64_t kChunkCols = kVectors * W;
  constexpr int kUnroll = kBatch >= 4 ? 1 : 4 / kBatch;  // keep >= 4 independent FMA chains
  const uint8_t* row = a.qweight + r * Codes::row_bytes(a.cols);
  const float* x[kBatch];
  for (int b = 0; b < kBatch; ++b) x[b] = a.x.rows + (first_batch + b) * a.x.row_stride;
  F acc[kBatch][kUnroll];
  for (auto& per_batch : acc)
    for (F& v : per_batch) v = Simd::zero();
  float tail[kBatch] = {};

  // int4 chunks must start on an activation deinterleave block (multiple of kChunkCols).
  const bool vectorize = kBits == 8 || a.n_groups == 1 || a.group_size % kChunkCols == 0;
  auto accumulate_chunk = [&](int64_t col, F scale, int slot) {
    F w[kVectors];
    Codes::decode(row, col, scale, w);
    for (int b = 0; b < kBatch; ++b)
      for (int v = 0; v < kVectors; ++v)
        acc[b][slot] = Simd::fma(w[v], Simd::load(x[b] + col + v * W), acc[b][slot]);
  };
  for (int64_t g = 0; g < a.n_groups; ++g) {
    const float s = a.scale[r * a.n_groups + g];
    const F scale = Simd::set1(s);
    const int64_t begin = g * a.group_size, end = begin + a.group_size;
    const int64_t vector_end = vectorize ? begin + (end - begin) / kChunkCols * kChunkCols : begin;
    int64_t col = begin;
    for (; col + kUnroll * kChunkCols <= vector_end; col += kUnroll * kChunkCols)
      for (int u = 0; u < kUnroll; ++u) accumulate_chunk(col + u * kChunkCols, scale, u);
    for (; col < vector_end; col += kChunkCols) accumulate_chunk(col, scale, 0);
    for (; col < end; ++col) {
      const float w = s * static_cast<float>(Codes::code(row, col));
      const int64_t xi = Codes::x_index(col, a.int4_block);
      for (int b = 0; b < kBatch; ++b) tail[b] += w * x[b][xi];
    }
  }
  for (int b = 0; b < kBatch; ++b) {
    const float* sums = a.x_group_sums + (first_batch + b) * a.n_groups;
    float zero_term = 0.0f;
    for (int64_t g = 0; g < a.n_groups; ++g)
      zero_term += a.scale[r * a.n_groups + g] * a.zero[r * a.n_groups + g] * sums[g];
    a.y[(first_batch + b) * a.rows + r] = Simd::hsum(sum_of(acc[b], kUnroll)) + tail[b] - zero_term;
  }
}

// 8- or 4-bit codes at batch 1 on int16 activations (quant_takes_int16): each block's scale is its
// group's times its activations'; x_group_sums are those of the quantized x.
void quant_row_int16(const QuantArgs& a, int64_t r) {
  const float* group_scale = a.scale + r * a.n_groups;
  const float* x_scale = a.x.int16_scale;
  const int64_t blocks_per_group = a.n_groups == 1 ? a.cols + 1 : a.group_size / kInt16Block;
  const auto scale_of = [&](int64_t b) { return group_scale[b / blocks_per_group] * x_scale[b]; };
  float zero_term = 0.0f;
  for (int64_t g = 0; g < a.n_groups; ++g) zero_term += group_scale[g] * a.zero[r * a.n_groups + g] * a.x_group_sums[g];
  const float dot = a.bits == 8 ? int16_dot(a.qweight + r * a.cols, a.x.int16, scale_of, a.cols)
                                : int4_int16_dot(a.qweight + r * (a.cols / 2), a.x.int16, scale_of, a.cols);
  a.y[r] = dot - zero_term;
}

template <int kBits>
void quant_rows_bits(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
  const int64_t row_bytes = QuantCodes<kBits>::row_bytes(a.cols);
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (r + kPrefetchRows < a.rows) prefetch(a.qweight + (r + kPrefetchRows) * row_bytes, row_bytes);
    if (a.x.int16) {
      quant_row_int16(a, r);
      continue;
    }
    // At most 4 batch rows per pass: with 8, their x pointers no longer fit in registers.
    int64_t b = 0;
    for (; b + 4 <= a.x.batch; b += 4) quant_row_batch<kBits, 4>(a, r, b);
    if (b + 2 <= a.x.batch) quant_row_batch<kBits, 2>(a, r, b), b += 2;
    if (b < a.x.batch) quant_row_batch<kBits, 1>(a, r, b);
  }
}

void quant_rows(const QuantArgs& a, int64_t row_begin, int64_t row_end, float*) {
  if (a.bits == 8)
    quant_rows_bits<8>(a, row_begin, row_end);
  else
    quant_rows_bits<4>(a, row_begin, row_end);
}

// ---------------------------------------------------------------------------------------------
// Dense rows: fp32, bf16 or int8 weights (times a per-row scale), kRows rows against kBatch
// activation rows at once, so that every weight vector loaded feeds kBatch FMAs and every x
// vector kRows. Batch 1 (decode) streams the weights once, one row at a time in 8 chains: a
// single sequential stream for the hardware prefetcher (interleaving rows, or software prefetch,
// measured no faster from DRAM, and slower for bf16).

template <class T, int kRows, int kBatch>
void dense_block(const DenseArgs& a, int64_t r, int64_t first_batch) {
  constexpr int kChains = kRows * kBatch >= 8 ? 1 : 8 / (kRows * kBatch);  // independent accumulators per (row, batch)
  const T* w[kRows];
  for (int i = 0; i < kRows; ++i) w[i] = static_cast<const T*>(a.weight) + (r + i) * a.cols;
  const float* x[kBatch];
  for (int b = 0; b < kBatch; ++b) x[b] = a.x.rows + (first_batch + b) * a.x.row_stride;
  F acc[kRows][kBatch][kChains];
  for (auto& per_row : acc)
    for (auto& per_batch : per_row)
      for (F& v : per_batch) v = Simd::zero();
  int64_t col = 0;
  for (; col + kChains * W <= a.cols; col += kChains * W)
    for (int c = 0; c < kChains; ++c) {
      F wv[kRows];
      for (int i = 0; i < kRows; ++i) wv[i] = Simd::load_values(w[i] + col + c * W);
      for (int b = 0; b < kBatch; ++b) {
        F xv = Simd::load(x[b] + col + c * W);
        Simd::in_register(xv);
        for (int i = 0; i < kRows; ++i) acc[i][b][c] = Simd::fma(wv[i], xv, acc[i][b][c]);
      }
    }
  for (; col + W <= a.cols; col += W) {
    F wv[kRows];
    for (int i = 0; i < kRows; ++i) wv[i] = Simd::load_values(w[i] + col);
    for (int b = 0; b < kBatch; ++b) {
      const F xv = Simd::load(x[b] + col);
      for (int i = 0; i < kRows; ++i) acc[i][b][0] = Simd::fma(wv[i], xv, acc[i][b][0]);
    }
  }
  float tail[kRows][kBatch] = {};
  for (; col < a.cols; ++col)
    for (int i = 0; i < kRows; ++i)
      for (int b = 0; b < kBatch; ++b) tail[i][b] += value_to_float(w[i][col]) * x[b][col];
  for (int i = 0; i < kRows; ++i) {
    const float scale = a.row_scale ? a.row_scale[r + i] : 1.0f;
    for (int b = 0; b < kBatch; ++b)
      a.y[(first_batch + b) * a.rows + r + i] = (Simd::hsum(sum_of(acc[i][b], kChains)) + tail[i][b]) * scale;
  }
}

template <class T>
void dense_rows_typed(const DenseArgs& a, int64_t row_begin, int64_t row_end) {
  if constexpr (std::is_same_v<T, int8_t>) {
    if (a.x.int16) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        const int8_t* row = static_cast<const int8_t*>(a.weight) + r * a.cols;
        a.y[r] = int16_dot(row, a.x.int16, [&](int64_t b) { return a.x.int16_scale[b]; }, a.cols) * a.row_scale[r];
      }
      return;
    }
  }
  if (a.x.batch == 1) {
    for (int64_t r = row_begin; r < row_end; ++r) dense_block<T, 1, 1>(a, r, 0);
    return;
  }
  int64_t r = row_begin;
  for (; r + 2 <= row_end; r += 2) {
    int64_t b = 0;
    for (; b + 4 <= a.x.batch; b += 4) dense_block<T, 2, 4>(a, r, b);
    for (; b < a.x.batch; ++b) dense_block<T, 2, 1>(a, r, b);
  }
  for (; r < row_end; ++r) {
    int64_t b = 0;
    for (; b + 4 <= a.x.batch; b += 4) dense_block<T, 1, 4>(a, r, b);
    for (; b < a.x.batch; ++b) dense_block<T, 1, 1>(a, r, b);
  }
}

void dense_rows(const DenseArgs& a, int64_t row_begin, int64_t row_end, float*) {
  visit_value_type(a.value_type, [&](auto type) { dense_rows_typed<decltype(type)>(a, row_begin, row_end); });
}

// ---------------------------------------------------------------------------------------------
// Elementwise functions of decode.cpp's forward.

// gate[i] = act(gate[i]) * up[i].
void gated_activation(int activation, const float* up, float* gate, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W)
    Simd::store(gate + i, Simd::mul(activation_of(Simd::load(gate + i), activation), Simd::load(up + i)));
  for (; i < n; ++i) gate[i] = scalar_activation(gate[i], activation) * up[i];
}

// ---------------------------------------------------------------------------------------------
// Attention of one query head over cached positions (decode.cpp). Within a key block the keys are
// transposed, so the scores of a block's positions are the lanes of kKeyBlock / W accumulators
// (broadcast q[d] times the block's row d: no horizontal sums), and a head's keys are one
// sequential stream. Then a softmax in fp32 (max subtracted) and the probability-weighted sum of
// the value rows, 64 dimensions at a time held in registers across positions.

static_assert(kKeyBlock % W == 0, "key blocks must hold whole vectors");

void key_block_scores(const AttentionArgs& a, const float* block, float* scores) {
  constexpr int kVecs = kKeyBlock / W;
  F acc[kVecs][2];
  for (auto& pair : acc) pair[0] = pair[1] = Simd::zero();
  int64_t d = 0;
  for (; d + 2 <= a.head_dim; d += 2)  // two chains over the dimension parity
    for (int c = 0; c < 2; ++c) {
      const F q = Simd::set1(a.q[d + c]);
      for (int i = 0; i < kVecs; ++i)
        acc[i][c] = Simd::fma(q, Simd::load(block + (d + c) * kKeyBlock + i * W), acc[i][c]);
    }
  if (d < a.head_dim) {
    const F q = Simd::set1(a.q[d]);
    for (int i = 0; i < kVecs; ++i) acc[i][0] = Simd::fma(q, Simd::load(block + d * kKeyBlock + i * W), acc[i][0]);
  }
  const F scale = Simd::set1(a.scale);
  for (int i = 0; i < kVecs; ++i) Simd::store(scores + i * W, Simd::mul(Simd::add(acc[i][0], acc[i][1]), scale));
}

void attention_head(const AttentionArgs& a) {
  // Whole blocks from the one holding `first`; the scores of positions outside the range are not used.
  const int64_t first_block = a.first / kKeyBlock, end = a.first + a.count;
  for (int64_t block = first_block; block * kKeyBlock < end; ++block)
    key_block_scores(a, a.keys + block * a.head_dim * kKeyBlock, a.scores + (block - first_block) * kKeyBlock);
  float* const scores = a.scores + (a.first - first_block * kKeyBlock);
  const float* const values = a.values + a.first * a.head_dim;
  int64_t t;
  float best = -INFINITY;
  for (t = 0; t < a.count; ++t) best = scores[t] > best ? scores[t] : best;
  const F shift = Simd::set1(best);
  F sums = Simd::zero();
  for (t = 0; t + W <= a.count; t += W) {
    const F e = exp_of(Simd::sub(Simd::load(scores + t), shift));
    Simd::store(scores + t, e);
    sums = Simd::add(sums, e);
  }
  float sum = Simd::hsum(sums);
  for (; t < a.count; ++t) {
    const float e = std::exp(scores[t] - best);
    scores[t] = e;
    sum += e;
  }
  const float inverse = 1.0f / sum;
  for (t = 0; t < a.count; ++t) scores[t] *= inverse;
  constexpr int kVecs = 64 / W;  // 64 dimensions per pass over the positions
  int64_t j = 0;
  for (; j + kVecs * W <= a.head_dim; j += kVecs * W) {
    F acc[kVecs];
    for (F& v : acc) v = Simd::zero();
    for (t = 0; t < a.count; ++t) {
      const F p = Simd::set1(scores[t]);
      const float* v = values + t * a.head_dim + j;
      for (int i = 0; i < kVecs; ++i) acc[i] = Simd::fma(p, Simd::load(v + i * W), acc[i]);
    }
    for (int i = 0; i < kVecs; ++i) Simd::store(a.out + j + i * W, acc[i]);
  }
  for (; j + W <= a.head_dim; j += W) {
    F acc = Simd::zero();
    for (t = 0; t < a.count; ++t)
      acc = Simd::fma(Simd::set1(scores[t]), Simd::load(values + t * a.head_dim + j), acc);
    Simd::store(a.out + j, acc);
  }
  for (; j < a.head_dim; ++j) {
    float acc = 0.0f;
    for (t = 0; t < a.count; ++t) acc += scores[t] * values[t * a.head_dim + j];
    a.out[j] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Vector-quantized rows (VQArgs): per input group the codewords of its codes are summed into
// the group's weights, then multiplied into each activation row. A group spans whole vectors
// (group_size a multiple of W) or half of one (two groups per vector: 8-value groups under
// AVX-512); other sizes run scalar. kChains independent accumulators per activation row hide the
// FMA latency at batch 1.

template <class Code>
inline const float* codeword(const VQArgs& a, const Code* codes, int64_t group, int64_t m) {
  return a.codebook_values + (m * a.codewords + codes[group * a.codebooks + m]) * a.group_size;
}

template <class Code>
inline F group_weights(const VQArgs& a, const Code* codes, int64_t group, int64_t offset) {
  F w = Simd::load(codeword(a, codes, group, 0) + offset);
  for (int64_t m = 1; m < a.codebooks; ++m) w = Simd::add(w, Simd::load(codeword(a, codes, group, m) + offset));
  return w;
}

template <class Code>
inline F pair_weights(const VQArgs& a, const Code* codes, int64_t group) {
  F w = Simd::load_halves(codeword(a, codes, group, 0), codeword(a, codes, group + 1, 0));
  for (int64_t m = 1; m < a.codebooks; ++m)
    w = Simd::add(w, Simd::load_halves(codeword(a, codes, group, m), codeword(a, codes, group + 1, m)));
  return w;
}

template <class Code, int kBatch>
void vq_row_batch(const VQArgs& a, const Code* codes, int64_t r, int64_t first_batch) {
  constexpr int kChains = kBatch >= 4 ? 1 : 4 / kBatch;
  const int64_t g = a.group_size, groups = a.cols / g;
  const float* x[kBatch];
  for (int b = 0; b < kBatch; ++b) x[b] = a.x.rows + (first_batch + b) * a.x.row_stride;
  F acc[kBatch][kChains];
  for (auto& row : acc)
    for (F& v : row) v = Simd::zero();
  float tail[kBatch] = {};
  int64_t done = 0;  // groups summed by the vector loops
  if (g % W == 0) {
    for (int64_t j = 0; j < groups; ++j)
      for (int64_t t = 0; t < g; t += W) {
        const F w = group_weights(a, codes, j, t);
        const int chain = static_cast<int>(((j * g + t) / W) % kChains);
        for (int b = 0; b < kBatch; ++b) acc[b][chain] = Simd::fma(w, Simd::load(x[b] + j * g + t), acc[b][chain]);
      }
    done = groups;
  } else if (2 * g == W) {
    for (; done + 2 <= groups; done += 2) {
      const F w = pair_weights(a, codes, done);
      const int chain = static_cast<int>((done / 2) % kChains);
      for (int b = 0; b < kBatch; ++b) acc[b][chain] = Simd::fma(w, Simd::load(x[b] + done * g), acc[b][chain]);
    }
  }
  for (int64_t j = done; j < groups; ++j)
    for (int64_t t = 0; t < g; ++t) {
      float w = 0.0f;
      for (int64_t m = 0; m < a.codebooks; ++m) w += codeword(a, codes, j, m)[t];
      for (int b = 0; b < kBatch; ++b) tail[b] += w * x[b][j * g + t];
    }
  for (int b = 0; b < kBatch; ++b) {
    F sum = acc[b][0];
    for (int c = 1; c < kChains; ++c) sum = Simd::add(sum, acc[b][c]);
    a.y[(first_batch + b) * a.rows + r] = a.scale[r] * (Simd::hsum(sum) + tail[b]);
  }
}

// The common case, 8-value groups of 8-bit codes from kBooks codebooks, with every index known
// at compile time: one vector holds 8 / W groups' weights (one group under AVX2, two under AVX-512).
// kRows weight rows against kBatch activation rows, kChains accumulators each: the rows share
// every activation load and the activation rows every rebuilt weight. At batch 1, 4 rows with 2
// chains each ran the VQ layers of SmolLM2 1.07-1.29x faster than one row with 4 chains (Zen 3,
// AVX2, the two interleaved in one process), mostly by sharing the activation loads: the loop is
// bound by loads (two code bytes, two codewords and an activation vector per group), so codebooks
// held as IEEE halves (VQArgs::codebook_half: 16 bytes a codeword) run it 1.17-1.20x faster again.

// A codeword's 8 values from float32 or IEEE half codebooks.
inline F load_codeword(const float* p) { return Simd::load(p); }
inline F load_codeword(const uint16_t* p) { return Simd::load_half(p); }
inline float codeword_value(const float* p) { return *p; }
inline float codeword_value(const uint16_t* p) { return Simd::half_value(*p); }

// Calls fn(std::integral_constant<int, k>{}) for k = 0 .. N - 1, unrolled at compile time.
template <int N, int K = 0, class Fn>
inline void unrolled(Fn&& fn) {
  if constexpr (K < N) {
    fn(std::integral_constant<int, K>{});
    unrolled<N, K + 1>(fn);
  }
}

// The byte offset of code kCode of a little-endian word of 8 codes in its codebook of 8-value
// codewords of type Book: one shift and one mask, where reading the code alone would take a byte
// load and a shift (the word is one load for 8 / kBooks groups of a row).
template <class Book, int kCode>
inline size_t code_offset(uint64_t word) {
  constexpr int kScale = sizeof(Book) == 2 ? 4 : 5;  // log2 of a codeword's bytes
  constexpr uint64_t kMask = uint64_t{0xFF} << kScale;
  if constexpr (8 * kCode >= kScale)
    return static_cast<size_t>((word >> (8 * kCode - kScale)) & kMask);
  else
    return static_cast<size_t>((word << (kScale - 8 * kCode)) & kMask);
}

// The codeword of code kCode of `word` in `book`.
template <int kCode, class Book>
inline const Book* word_codeword(const Book* book, uint64_t word) {
  return reinterpret_cast<const Book*>(reinterpret_cast<const char*>(book) + code_offset<Book, kCode>(word));
}

template <int kBooks, int kRows, int kBatch, int kChains, class Book>
void vq_tile_g8(const VQArgs& a, const Book* values, const uint8_t* codes, int64_t r, int64_t first_batch) {
  constexpr int kGroups = W / 8;
  const int64_t groups = a.cols / 8, per_row = groups * kBooks, step = kGroups * kChains;
  const Book* book[kBooks];
  for (int m = 0; m < kBooks; ++m) book[m] = values + m * a.codewords * 8;
  const float* x[kBatch];
  for (int b = 0; b < kBatch; ++b) x[b] = a.x.rows + (first_batch + b) * a.x.row_stride;
  F acc[kRows][kBatch][kChains];
  for (auto& row : acc)
    for (auto& batch : row)
      for (F& v : batch) v = Simd::zero();
  // size_t: a code times 8 computed as int is sign-extended before every address
  const auto codeword = [&](const uint8_t* c, int64_t j, int m) { return book[m] + size_t{c[j * kBooks + m]} * 8; };
  const auto weights = [&](int i, int64_t j) {
    const uint8_t* c = codes + i * per_row;
    F w;
    for (int m = 0; m < kBooks; ++m) {
      F part;
      if constexpr (kGroups == 2)
        part = Simd::load_halves(codeword(c, j, m), codeword(c, j + 1, m));
      else
        part = load_codeword(codeword(c, j, m));
      w = m ? Simd::add(w, part) : part;
    }
    return w;
  };
  const auto accumulate = [&](int64_t j, int chain) {
    F xv[kBatch];
    for (int b = 0; b < kBatch; ++b) xv[b] = Simd::load(x[b] + j * 8);
    for (int i = 0; i < kRows; ++i) {
      const F w = weights(i, j);
      for (int b = 0; b < kBatch; ++b) acc[i][b][chain] = Simd::fma(w, xv[b], acc[i][b][chain]);
    }
  };
  int64_t j = 0;
  // Whole 8-byte words of codes per row where a word holds whole steps: on SmolLM2's VQ layer shapes
  // (Zen 3, AVX2, half codebooks, batch 1, through the C entry point) 1.02-1.09x the code-at-a-time
  // loop below with 2 codebooks, 1.14-1.54x with 4.
  constexpr int kWordGroups = 8 / kBooks;
  if constexpr (8 % kBooks == 0 && kWordGroups % (kGroups * kChains) == 0) {
    // Rows of 256 code bytes or more: the next tile's codes are prefetched a line at a time, where
    // the hardware prefetcher fell behind four such rows (576 x 1536: 1.02x -> 1.13x the loop below
    // with the codes streamed from memory; on shorter rows prefetching cost 2-3%).
    const bool prefetch = per_row >= 256;
    for (; j + kWordGroups <= groups; j += kWordGroups) {
      uint64_t word[kRows];
      for (int i = 0; i < kRows; ++i) std::memcpy(&word[i], codes + i * per_row + j * kBooks, sizeof word[i]);
      if (prefetch && (j * kBooks) % 64 == 0)
        for (int i = 0; i < kRows; ++i) __builtin_prefetch(codes + (kRows + i) * per_row + j * kBooks);
      unrolled<kWordGroups / kGroups>([&](auto step_index) {
        constexpr int kFirst = decltype(step_index)::value * kGroups;  // the step's first group in the word
        constexpr int kChain = decltype(step_index)::value % kChains;
        F xv[kBatch];
        for (int b = 0; b < kBatch; ++b) xv[b] = Simd::load(x[b] + (j + kFirst) * 8);
        for (int i = 0; i < kRows; ++i) {
          F w;
          unrolled<kBooks>([&](auto book_index) {
            constexpr int kM = decltype(book_index)::value;
            const Book* first = word_codeword<kFirst * kBooks + kM>(book[kM], word[i]);
            F part;
            if constexpr (kGroups == 2)
              part = Simd::load_halves(first, word_codeword<(kFirst + 1) * kBooks + kM>(book[kM], word[i]));
            else
              part = load_codeword(first);
            if constexpr (kM == 0)
              w = part;
            else
              w = Simd::add(w, part);
          });
          for (int b = 0; b < kBatch; ++b) acc[i][b][kChain] = Simd::fma(w, xv[b], acc[i][b][kChain]);
        }
      });
    }
  }
  for (; j + step <= groups; j += step)
    for (int chain = 0; chain < kChains; ++chain) accumulate(j + chain * kGroups, chain);
  for (; j + kGroups <= groups; j += kGroups) accumulate(j, 0);
  for (int i = 0; i < kRows; ++i)
    for (int b = 0; b < kBatch; ++b) {
      F sum = acc[i][b][0];
      for (int chain = 1; chain < kChains; ++chain) sum = Simd::add(sum, acc[i][b][chain]);
      float total = Simd::hsum(sum);
      for (int64_t k = j; k < groups; ++k)  // an odd last group under AVX-512
        for (int t = 0; t < 8; ++t) {
          float w = 0.0f;
          for (int m = 0; m < kBooks; ++m) w += codeword_value(codeword(codes + i * per_row, k, m) + t);
          total += w * x[b][k * 8 + t];
        }
      a.y[(first_batch + b) * a.rows + r + i] = a.scale[r + i] * total;
    }
}

template <int kBooks, class Book>
void vq_rows_g8(const VQArgs& a, const Book* values, int64_t row_begin, int64_t row_end) {
  const int64_t per_row = a.cols / 8 * kBooks;
  const auto row_codes = [&](int64_t r) { return a.codes8 + r * per_row; };
  int64_t r = row_begin;
  if (a.x.batch == 1)
    for (; r + 4 <= row_end; r += 4) vq_tile_g8<kBooks, 4, 1, 2>(a, values, row_codes(r), r, 0);
  for (; r < row_end; ++r) {
    int64_t b = 0;
    for (; b + 4 <= a.x.batch; b += 4) vq_tile_g8<kBooks, 1, 4, 1>(a, values, row_codes(r), r, b);
    if (b + 2 <= a.x.batch) vq_tile_g8<kBooks, 1, 2, 2>(a, values, row_codes(r), r, b), b += 2;
    if (b < a.x.batch) vq_tile_g8<kBooks, 1, 1, 4>(a, values, row_codes(r), r, b);
  }
}

template <int kBooks>
void vq_rows_g8(const VQArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.codebook_half)
    vq_rows_g8<kBooks>(a, a.codebook_half, row_begin, row_end);
  else
    vq_rows_g8<kBooks>(a, a.codebook_values, row_begin, row_end);
}

template <class Code>
void vq_rows_typed(const VQArgs& a, const Code* all_codes, int64_t row_begin, int64_t row_end) {
  const int64_t per_row = a.cols / a.group_size * a.codebooks;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const Code* codes = all_codes + r * per_row;
    int64_t b = 0;
    for (; b + 4 <= a.x.batch; b += 4) vq_row_batch<Code, 4>(a, codes, r, b);
    if (b + 2 <= a.x.batch) vq_row_batch<Code, 2>(a, codes, r, b), b += 2;
    if (b < a.x.batch) vq_row_batch<Code, 1>(a, codes, r, b);
  }
}

// Integer decode (VQArgs::codebook_int8) of batch row b, its activations rounded to q with x_scale.
template <int kBooks>
void vq_rows_int8(const VQArgs& a, const int8_t* q, float x_scale, int64_t b, int64_t row_begin, int64_t row_end) {
  const int64_t groups = a.cols / 8, per_row = groups * kBooks, whole = groups / 4 * 4;
  const auto store = [&](int64_t r, int32_t dot) {
    dot += vq_int8_dot(a.codebook_int8, a.codewords, kBooks, a.codes8 + r * per_row, whole, groups, q);
    a.y[b * a.rows + r] = a.scale[r] * (x_scale * static_cast<float>(dot));
  };
  int64_t r = row_begin;
  for (int32_t total[4]; r + 4 <= row_end; r += 4) {
    Simd::template vq_int8_rows4<kBooks>(a.codebook_int8, a.codewords, a.codes8 + r * per_row, per_row, whole, q, total);
    for (int i = 0; i < 4; ++i) store(r + i, total[i]);
  }
  for (; r < row_end; ++r) store(r, vq_int8_dot(a.codebook_int8, a.codewords, kBooks, a.codes8 + r * per_row, 0, whole, q));
}

// Every activation row rounded to int8, then vq_rows_int8; false (nothing written) where a row is
// not finite: the float codebooks run instead.
inline bool vq_rows_int8(const VQArgs& a, int64_t row_begin, int64_t row_end) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> scales;
  q.resize(static_cast<size_t>(a.x.batch * a.cols));
  scales.resize(static_cast<size_t>(a.x.batch));
  for (int64_t b = 0; b < a.x.batch; ++b) {
    scales[b] = quantize_vq_int8(a.x.rows + b * a.x.row_stride, a.cols, a.position_scale, q.data() + b * a.cols);
    if (scales[b] < 0.0f) return false;
  }
  for (int64_t b = 0; b < a.x.batch; ++b) {
    const int8_t* row = q.data() + b * a.cols;
    switch (a.codebooks) {
      case 1: vq_rows_int8<1>(a, row, scales[b], b, row_begin, row_end); break;
      case 2: vq_rows_int8<2>(a, row, scales[b], b, row_begin, row_end); break;
      case 3: vq_rows_int8<3>(a, row, scales[b], b, row_begin, row_end); break;
      default: vq_rows_int8<4>(a, row, scales[b], b, row_begin, row_end); break;
    }
  }
  return true;
}

void vq_rows(const VQArgs& a, int64_t row_begin, int64_t row_end, float*) {
  if (a.codebook_int8 && a.codes8 && a.group_size == 8 && a.codebooks <= 4 && vq_rows_int8(a, row_begin, row_end))
    return;
  if (a.codes8 && a.group_size == 8 && a.codebooks <= 4) {
    switch (a.codebooks) {
      case 1: return vq_rows_g8<1>(a, row_begin, row_end);
      case 2: return vq_rows_g8<2>(a, row_begin, row_end);
      case 3: return vq_rows_g8<3>(a, row_begin, row_end);
      default: return vq_rows_g8<4>(a, row_begin, row_end);
    }
  }
  if (a.codes8)
    vq_rows_typed(a, a.codes8, row_begin, row_end);
  else
    vq_rows_typed(a, a.codes16, row_begin, row_end);
}

// ---------------------------------------------------------------------------------------------
// The batched attention's arithmetic (attention.cpp: encoders and the engine's calibration passes).

// C [kAttentionRows x kAttentionCols] = A [kAttentionRows x depth] (row stride lda) times B [depth x
// kAttentionCols] (row stride ldb). Each row of B is loaded once for all rows of A; 12 accumulators
// on every ISA (6 rows of 2 vectors with AVX2, 12 rows of one with AVX-512: with half the rows the
// six FMA chains left AVX-512's two FMA units waiting on their latency), indexed by compile-time
// constants so that they stay in registers.
constexpr int kAttentionVecs = kAttentionCols / W;
constexpr int kAttentionRows = 12 / kAttentionVecs;
static_assert(kAttentionCols % W == 0 && kAttentionPad % kAttentionRows == 0, "attention tiles must fit the padding");

void attention_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  F acc[kAttentionRows][kAttentionVecs];
  unrolled<kAttentionRows>([&](auto r) { unrolled<kAttentionVecs>([&](auto v) { acc[r][v] = Simd::zero(); }); });
  for (int64_t k = 0; k < depth; ++k, b += ldb) {
    F column[kAttentionVecs];
    unrolled<kAttentionVecs>([&](auto v) { column[v] = Simd::load(b + v * W); });
    unrolled<kAttentionRows>([&](auto r) {
      const F x = Simd::set1(a[r * lda + k]);
      unrolled<kAttentionVecs>([&](auto v) { acc[r][v] = Simd::fma(x, column[v], acc[r][v]); });
    });
  }
  unrolled<kAttentionRows>([&](auto r) {
    unrolled<kAttentionVecs>([&](auto v) { Simd::store(c + r * ldc + v * W, acc[r][v]); });
  });
}

// A row of scores s (`live` valid, `padded` stored) becomes exp(s + bias - max), times keep, with
// zeros past `live`; returns their sum. bias / keep (both or neither): a key padding mask's row as
// 0 / -inf and 1 / 0; the keys it drops weigh exactly 0. Needs a kept key in [0, live). A NaN score
// makes its row NaN.
float attention_softmax_row(float* s, const float* bias, const float* keep, int64_t live, int64_t padded) {
  F most = Simd::set1(-INFINITY);
  int64_t j = 0;
  for (; j + W <= live; j += W) {
    F v = Simd::load(s + j);
    if (bias) {
      v = Simd::add(v, Simd::load(bias + j));
      Simd::store(s + j, v);
    }
    most = Simd::max(most, v);
  }
  float lanes[W];
  Simd::store(lanes, most);
  float top = -INFINITY;
  for (float lane : lanes) top = std::max(top, lane);
  for (int64_t k = j; k < live; ++k) top = std::max(top, bias ? (s[k] += bias[k]) : s[k]);
  const F shift = Simd::set1(top);
  F total = Simd::zero();
  for (j = 0; j + W <= live; j += W) {
    F e = exp_of(Simd::sub(Simd::load(s + j), shift));
    if (keep) e = Simd::mul(e, Simd::load(keep + j));
    Simd::store(s + j, e);
    total = Simd::add(total, e);
  }
  float sum = Simd::hsum(total);
  if (j < live) {  // the last partial vector, through a buffer
    float tail[W] = {}, tail_keep[W] = {};
    std::copy(s + j, s + live, tail);
    if (keep) std::copy(keep + j, keep + live, tail_keep);
    F e = exp_of(Simd::sub(Simd::load(tail), shift));
    if (keep) e = Simd::mul(e, Simd::load(tail_keep));
    Simd::store(tail, e);
    for (int64_t k = 0; k < live - j; ++k) sum += (s[j + k] = tail[k]);
    j = live;
  }
  std::fill(s + j, s + padded, 0.0f);
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Bitmask-sparse 4-bit codes (SparseInt4Args), batch 1: one 64-column int16 activation block at a
// time, its kept codes expanded to their columns (Simd::sparse_int4_madd: one masked byte expand
// with VBMI2, a pshufb table per 8 columns on AVX2; portable: a scalar walk over the mask bits),
// the block sum in int32 times the block's activation scale and its group's weight scale.

// The k-th kept code of a block (low nibble first).
inline int kept_code(const uint8_t* codes, int k) { return (codes[k / 2] >> (k % 2 * 4)) & 15; }

inline int32_t sparse_int4_block_scalar(uint64_t bits, const uint8_t* codes, const int16_t* q, int32_t zero) {
  int32_t sum = 0;
  for (int k = 0; bits; bits &= bits - 1, ++k)
    sum += (kept_code(codes, k) - zero) * q[__builtin_ctzll(bits)];
  return sum;
}

inline uint64_t block_bits(const uint8_t* mask) {
  uint64_t bits;
  std::memcpy(&bits, mask, sizeof bits);
  return bits;
}

// A template so that the discarded branches for an ISA's other methods are never compiled.
template <class S>
void sparse_int4_rows_on(const SparseInt4Args& a, int64_t row_begin, int64_t row_end, float* scratch) {
  const int64_t blocks = a.cols / 64, mask_stride = a.cols / 8;
  const int64_t per_group = a.n_groups == 1 ? blocks : a.group_size / 64;
  int8_t* spread = reinterpret_cast<int8_t*>(scratch);  // kSparseInt4Spread: 64 bytes per block + 32
  if constexpr (S::kSparseInt4 == kSparseInt4Spread) std::memset(spread + a.cols, 0, 32);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* mask = a.mask + r * mask_stride;
    const uint8_t* codes = a.codes + a.row_offsets[r];
    const float* scale = a.scale + r * a.n_groups;
    const float* zero = a.zero + r * a.n_groups;
    if (!a.x.int16) {  // fp32 activations (a NaN or infinity in x): one kept weight at a time
      float total = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t g = b / per_group;
        uint64_t bits = block_bits(mask + b * 8);
        const int kept = __builtin_popcountll(bits);
        for (int k = 0; bits; bits &= bits - 1, ++k)
          total += scale[g] * (static_cast<float>(kept_code(codes, k)) - zero[g]) *
                   a.x.rows[b * 64 + __builtin_ctzll(bits)];
        codes += (kept + 1) / 2;
      }
      a.y[r] = total;
      continue;
    }
    const auto scale_of = [&](int64_t b) { return scale[b / per_group] * a.x.int16_scale[b]; };
    const auto zero_of = [&](int64_t b) { return static_cast<int>(zero[b / per_group]); };
    if constexpr (S::kSparseInt4 == kSparseInt4Expand) {
      a.y[r] = sum_scaled_blocks(blocks, scale_of, [&](int64_t b) {
        __builtin_prefetch(codes + kStreamPrefetchBytes);
        const uint64_t bits = block_bits(mask + b * 8);
        const I sum = S::sparse_int4_madd(bits, codes, a.x.int16 + b * 64, zero_of(b));
        codes += (__builtin_popcountll(bits) + 1) / 2;
        return sum;
      });
    } else if constexpr (S::kSparseInt4 == kSparseInt4Spread) {
      for (int64_t b = 0; b < blocks; ++b) {
        __builtin_prefetch(codes + kStreamPrefetchBytes);
        S::spread_int4(codes, zero_of(b), spread + b * 64);
        codes += (__builtin_popcountll(block_bits(mask + b * 8)) + 1) / 2;
      }
      a.y[r] = sum_scaled_blocks(blocks, scale_of, [&](int64_t b) {
        return S::spread_int4_madd(block_bits(mask + b * 8), spread + b * 64, a.x.int16 + b * 64);
      });
    } else {
      float total = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint64_t bits = block_bits(mask + b * 8);
        total += scale_of(b) * static_cast<float>(sparse_int4_block_scalar(bits, codes, a.x.int16 + b * 64, zero_of(b)));
        codes += (__builtin_popcountll(bits) + 1) / 2;
      }
      a.y[r] = total;
    }
  }
}

void sparse_int4_rows(const SparseInt4Args& a, int64_t row_begin, int64_t row_end, float* scratch) {
  sparse_int4_rows_on<Simd>(a, row_begin, row_end, scratch);
}

}  // namespace

#ifdef SECATEURS_INT8_BLOCKS
void int8_blocks_rows(const Int8BlockArgs& a, int64_t row_begin, int64_t row_end, float*);  // defined by the including file
constexpr RowKernel<Int8BlockArgs> kInt8Blocks = int8_blocks_rows;
#else
constexpr RowKernel<Int8BlockArgs> kInt8Blocks = nullptr;
#endif

const KernelTable kTable{W, bitmask_rows, nm_rows, quant_rows, dense_rows, vq_rows, sparse_int4_rows, attention_head,
                         gated_activation, kAttentionRows, attention_tile, attention_softmax_row, kInt8Blocks};

}  // namespace secateurs
