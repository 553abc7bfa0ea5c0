// Self-attention, causal (the calibration passes of the compression engine) or bidirectional with
// a key padding mask (encoders at inference), fp32 on the CPU.
//
// PyTorch's CPU flash attention runs SmolLM2's 512-token windows at about a third of the matmul
// peak: its query blocks multiply against keys through general GEMM calls with a 64-wide inner
// dimension. Here each task takes R positions of one (batch, key/value head): the queries of all
// heads sharing that key/value head, M = R * group rows (t-major), against the keys up to the block's
// last position (all keys when bidirectional), with one register-blocked micro-kernel for both
// products:
//   S = (scale * Q) K^T          [M, L]   (K packed transposed once per (batch, kv head))
//   P = exp(S + bias - rowmax), 0 past each row's own position when causal; bias is 0 for the
//       keys a padding mask keeps and -inf for the others
//   O = P V / rowsum             [M, D]   (a row with no key left gives 0)
// Causal blocks never touch keys past their last position, so the work is the causal half (plus
// the diagonal block). Output: [batch, seq, heads, head_dim] contiguous, the layout attention modules
// reshape into their o_proj input.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace secateurs {
namespace {

constexpr int64_t kRows = 6, kCols = 16;   // micro-kernel tile
constexpr int64_t kPositions = 32;          // query positions per causal task
constexpr int64_t kTaskRows = 192;          // at most this many query rows per bidirectional task

struct View {  // a [batch, heads, seq, head_dim] tensor with unit stride along head_dim
  const float* data;
  int64_t batch, head, seq;
  const float* at(int64_t b, int64_t h, int64_t t) const { return data + b * batch + h * head + t * seq; }
};

struct Shape {
  int64_t batch, seq, heads, kv_heads, dim;
  int64_t group() const { return heads / kv_heads; }
  int64_t padded_seq() const { return (seq + kCols - 1) / kCols * kCols; }
};

// C[kRows x kCols] = A[kRows x depth] (row stride lda) * B[depth x kCols] (row stride ldb). The
// twelve accumulators are named one by one: as an array GCC spills them to the stack every step.
__attribute__((target("avx2,fma"))) void tile_avx2(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                   int64_t depth, float* c, int64_t ldc) {
  static_assert(kRows == 6 && kCols == 16, "the accumulators below are written out for a 6 x 16 tile");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (int64_t k = 0; k < depth; ++k, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a1 + k);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a2 + k);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a3 + k);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a4 + k);
    c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a5 + k);
    c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  const __m256 rows[kRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int64_t r = 0; r < kRows; ++r) {
    _mm256_storeu_ps(c + r * ldc, rows[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, rows[r][1]);
  }
}

void tile_portable(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  float acc[kRows][kCols] = {};
  for (int64_t k = 0; k < depth; ++k)
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t j = 0; j < kCols; ++j) acc[r][j] += a[r * lda + k] * b[k * ldb + j];
  for (int64_t r = 0; r < kRows; ++r) std::memcpy(c + r * ldc, acc[r], sizeof(acc[r]));
}

// exp(x) for x <= 0 (softmax arguments): 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a
// degree-6 polynomial (relative error below 2e-7); arguments below -87 give 0, NaN stays NaN.
__attribute__((target("avx2,fma"))) __m256 exp_avx2(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(low, x);  // a NaN in x is kept (maxps returns its second operand then)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// Row i of S (length `live` valid, `padded` stored) plus bias (if any) becomes exp(S + bias - max)
// with zeros past `live`; returns the sum of the kept values. The bias must leave a key in [0, live).
__attribute__((target("avx2,fma"))) float softmax_row_avx2(float* s, const float* bias, int64_t live, int64_t padded) {
  __m256 most = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  if (bias) {
    for (; j + 8 <= live; j += 8) {
      const __m256 biased = _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(bias + j));
      _mm256_storeu_ps(s + j, biased);
      most = _mm256_max_ps(most, biased);
    }
    for (int64_t k = j; k < live; ++k) s[k] += bias[k];
  } else {
    for (; j + 8 <= live; j += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(s + j));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, most);
  float top = -INFINITY;
  for (float lane : lanes) top = std::max(top, lane);
  for (; j < live; ++j) top = std::max(top, s[j]);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  for (j = 0; j + 8 <= live; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  _mm256_store_ps(lanes, total);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  if (j < live) {  // the last partial vector: lanes past `live` are masked to 0
    alignas(32) float tail[8] = {};
    std::memcpy(tail, s + j, (live - j) * sizeof(float));
    _mm256_store_ps(tail, exp_avx2(_mm256_sub_ps(_mm256_load_ps(tail), shift)));
    for (int64_t k = 0; k < live - j; ++k) sum += (s[j + k] = tail[k]);
    j = live;
  }
  std::fill(s + j, s + padded, 0.0f);
  return sum;
}

float softmax_row_portable(float* s, const float* bias, int64_t live, int64_t padded) {
  float top = -INFINITY, sum = 0.0f;
  if (bias)
    for (int64_t j = 0; j < live; ++j) s[j] += bias[j];
  for (int64_t j = 0; j < live; ++j) top = std::max(top, s[j]);
  for (int64_t j = 0; j < live; ++j) sum += (s[j] = std::exp(s[j] - top));
  std::fill(s + live, s + padded, 0.0f);
  return sum;
}

struct Scratch {
  std::vector<float> q, s, o, sums;  // [m_pad, dim], [m_pad, padded_seq], [m_pad, dim], [m_pad]
  std::vector<float> keys_t, values;  // one pair's packed keys and values, when its task packs them
};

// A buffer of at least n floats kept by the calling thread across calls: fresh allocations of
// this size are mapped anew by malloc and their page faults cost as much as the attention itself
// (encoder shapes: 3 MB of packed keys and values per call). Contents are left as they were.
float* reusable(std::vector<float>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

// K^T [dim, stride] and V [stride, dim] of (batch b, kv head g), zero past seq.
void pack_pair(const View& key, const View& value, int64_t b, int64_t g, int64_t seq, int64_t stride, int64_t dim,
               float* kt, float* vp) {
  for (int64_t d = 0; d < dim; ++d) {
    for (int64_t t = 0; t < seq; ++t) kt[d * stride + t] = key.at(b, g, t)[d];
    std::fill(kt + d * stride + seq, kt + (d + 1) * stride, 0.0f);
  }
  for (int64_t t = 0; t < seq; ++t) std::memcpy(vp + t * dim, value.at(b, g, t), dim * sizeof(float));
  std::fill(vp + seq * dim, vp + stride * dim, 0.0f);
}

// bias: the key padding mask's row of this batch entry as 0 / -inf, or nullptr; first_key: its
// first kept key (0 without a mask; seq when it keeps none).
template <bool kAvx2>
void attend_block(const Shape& x, const View& query, const float* keys_t, const float* values, const float* bias,
                  int64_t first_key, float scale, bool causal, int64_t block, int64_t b, int64_t g, int64_t t0,
                  Scratch& work, float* out) {
  const int64_t group = x.group(), dim = x.dim, stride = x.padded_seq();
  const int64_t positions = std::min(block, x.seq - t0);
  const int64_t m = positions * group, m_pad = (m + kRows - 1) / kRows * kRows;
  const int64_t keys = causal ? t0 + positions : x.seq, keys_pad = (keys + kCols - 1) / kCols * kCols;
  float* q = work.q.data();
  float* s = work.s.data();
  float* o = work.o.data();
  for (int64_t i = 0; i < m_pad; ++i) {  // row i: position t0 + i / group, head g * group + i % group
    float* row = q + i * dim;
    if (i >= m) {
      std::fill(row, row + dim, 0.0f);
      continue;
    }
    const float* source = query.at(b, g * group + i % group, t0 + i / group);
    for (int64_t d = 0; d < dim; ++d) row[d] = source[d] * scale;
  }
  auto tile = kAvx2 ? tile_avx2 : tile_portable;
  for (int64_t i = 0; i < m_pad; i += kRows)
    for (int64_t j = 0; j < keys_pad; j += kCols) tile(q + i * dim, dim, keys_t + j, stride, dim, s + i * stride + j, stride);
  float* sums = work.sums.data();
  for (int64_t i = 0; i < m_pad; ++i) {
    float* row = s + i * stride;
    if (i >= m) {
      std::fill(row, row + keys_pad, 0.0f);
      continue;
    }
    const int64_t live = causal ? t0 + i / group + 1 : x.seq;
    if (first_key >= live) {  // no key to attend to: the output row is 0
      std::fill(row, row + keys_pad, 0.0f);
      sums[i] = 0.0f;
      continue;
    }
    sums[i] = kAvx2 ? softmax_row_avx2(row, bias, live, keys_pad) : softmax_row_portable(row, bias, live, keys_pad);
  }
  for (int64_t i = 0; i < m_pad; i += kRows)
    for (int64_t c = 0; c < dim; c += kCols) tile(s + i * stride, stride, values + c, dim, keys_pad, o + i * dim + c, dim);
  for (int64_t i = 0; i < m; ++i) {
    float* target = out + ((b * x.seq + t0 + i / group) * x.heads + g * group + i % group) * dim;
    const float inverse = sums[i] > 0.0f ? 1.0f / sums[i] : 0.0f;
    for (int64_t d = 0; d < dim; ++d) target[d] = o[i * dim + d] * inverse;
  }
}

}  // namespace
}  // namespace secateurs

// q [batch, heads, seq, dim] and k, v [batch, kv_heads, seq, dim] given by element strides
// (unit stride along dim); out [batch, seq, heads, dim] contiguous. path: 0 portable, 1 AVX2.
// causal: each query sees the keys up to its own position; key_mask (uint8 [batch, seq], nonzero
// = attend; nullptr = all) removes keys for every query of its batch entry.
extern "C" __attribute__((visibility("default"))) int secateurs_attention(
    int path, int threads, const float* q, const int64_t* q_strides, const float* k, const int64_t* k_strides,
    const float* v, const int64_t* v_strides, float* out, int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads,
    int64_t dim, float scale, int causal, const uint8_t* key_mask) {
  using namespace secateurs;
  if (batch < 0 || seq < 0 || kv_heads < 1 || heads < 1 || heads % kv_heads || dim < 1 || dim % kCols)
    return kInvalidArgument;
  if (path != 0 && path != 1) return kInvalidArgument;
  if (path == 1 && !cpu_supports(kAvx2)) return kUnsupportedPath;
  const Shape x{batch, seq, heads, kv_heads, dim};
  const View query{q, q_strides[0], q_strides[1], q_strides[2]};
  const View key{k, k_strides[0], k_strides[1], k_strides[2]};
  const View value{v, v_strides[0], v_strides[1], v_strides[2]};
  const int64_t stride = x.padded_seq(), pairs = batch * kv_heads;
  std::vector<float> biases(key_mask ? batch * stride : 0, 0.0f);
  std::vector<int64_t> first_keys(batch, key_mask ? seq : 0);
  for (int64_t b = 0; key_mask && b < batch; ++b)
    for (int64_t t = seq - 1; t >= 0; --t) {
      if (key_mask[b * seq + t]) first_keys[b] = t;
      else biases[b * stride + t] = -INFINITY;
    }
  // Causal blocks are short so that the threads share the triangle evenly; bidirectional ones take
  // up to kTaskRows query rows (the micro-kernel pads M to a multiple of kRows: less waste).
  const int64_t block = causal ? kPositions : std::max<int64_t>(1, std::min(seq, kTaskRows / x.group()));
  const int64_t blocks = (seq + block - 1) / block, tasks = pairs * blocks;
  const int64_t m_pad = (block * x.group() + kRows - 1) / kRows * kRows, pair_floats = dim * stride;
  // Per (batch, kv head): K^T [dim, padded seq] and V [padded seq, dim], zero padded. Packed once for
  // all its blocks when it has several; a pair with one block (encoders) is packed by its task, into
  // buffers that stay in that core's cache.
  const bool packed_by_task = blocks == 1;
  thread_local std::vector<float> packed_keys, packed_values;
  float* keys_t = packed_by_task ? nullptr : reusable(packed_keys, pairs * pair_floats);
  float* values = packed_by_task ? nullptr : reusable(packed_values, pairs * pair_floats);
  if (!packed_by_task) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair)
      pack_pair(key, value, pair / kv_heads, pair % kv_heads, seq, stride, dim, keys_t + pair * pair_floats,
                values + pair * pair_floats);
  }
#pragma omp parallel num_threads(threads)
  {
    thread_local Scratch work;
    reusable(work.q, m_pad * dim), reusable(work.s, m_pad * stride), reusable(work.o, m_pad * dim);
    reusable(work.sums, m_pad);
    float* own_keys = packed_by_task ? reusable(work.keys_t, pair_floats) : nullptr;
    float* own_values = packed_by_task ? reusable(work.values, pair_floats) : nullptr;
    // Later causal blocks attend to more keys: hand them out first so the threads finish together.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t pair = task % pairs, index = blocks - 1 - task / pairs;
      const int64_t b = pair / kv_heads, g = pair % kv_heads;
      if (packed_by_task) pack_pair(key, value, b, g, seq, stride, dim, own_keys, own_values);
      const float* kt = packed_by_task ? own_keys : keys_t + pair * pair_floats;
      const float* vp = packed_by_task ? own_values : values + pair * pair_floats;
      const float* bias = key_mask ? biases.data() + b * stride : nullptr;
      const bool is_causal = causal != 0;
      if (path == 1)
        attend_block<true>(x, query, kt, vp, bias, first_keys[b], scale, is_causal, block, b, g, index * block, work, out);
      else
        attend_block<false>(x, query, kt, vp, bias, first_keys[b], scale, is_causal, block, b, g, index * block, work, out);
    }
  }
  return kOk;
}
