// Self-attention, causal (the calibration passes of the compression engine) or bidirectional with
// a key padding mask (encoders at inference), fp32 on the CPU.
//
// PyTorch's CPU flash attention runs SmolLM2's 512-token windows at about a third of the matmul
// peak: its query blocks multiply against keys through general GEMM calls with a 64-wide inner
// dimension. Here each task takes R positions of one (batch, key/value head): the queries of all
// heads sharing that key/value head, M = R * group rows (t-major), against the keys up to the block's
// last position (all keys when bidirectional), with one register-blocked micro-kernel for both
// products (each instruction set's own, row_kernels.h):
//   S = (scale * Q) K^T          [M, L]   (K packed transposed once per (batch, kv head))
//   P = exp(S + bias - rowmax), 0 past each row's own position when causal; bias is 0 for the
//       keys a padding mask keeps and -inf for the others, whose weight is then exactly 0
//   O = P V / rowsum             [M, D]   (a row with no key left gives 0)
// Causal blocks never touch keys past their last position, so the work is the causal half (plus
// the diagonal block). Output: [batch, seq, heads, head_dim] contiguous, the layout attention modules
// reshape into their o_proj input.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace secateurs {
namespace {

constexpr int64_t kCols = kAttentionCols;   // key columns per micro-kernel tile
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
  static int64_t padded_rows(int64_t m) { return (m + kAttentionPad - 1) / kAttentionPad * kAttentionPad; }
};

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

// bias / keep: the key padding mask's row of this batch entry as 0 / -inf and 1 / 0, or nullptr;
// first_key: its first kept key (0 without a mask; seq when it keeps none). The products and the
// softmax are the path's (row_kernels.h).
void attend_block(const KernelTable& path, const Shape& x, const View& query, const float* keys_t, const float* values,
                  const float* bias, const float* keep, int64_t first_key, float scale, bool causal, int64_t block,
                  int64_t b, int64_t g, int64_t t0, Scratch& work, float* out) {
  const int64_t group = x.group(), dim = x.dim, stride = x.padded_seq();
  const int64_t positions = std::min(block, x.seq - t0);
  const int64_t m = positions * group, m_pad = Shape::padded_rows(m), rows = path.attention_rows;
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
  for (int64_t i = 0; i < m_pad; i += rows)
    for (int64_t j = 0; j < keys_pad; j += kCols)
      path.attention_tile(q + i * dim, dim, keys_t + j, stride, dim, s + i * stride + j, stride);
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
    sums[i] = path.attention_softmax_row(row, bias, keep, live, keys_pad);
  }
  for (int64_t i = 0; i < m_pad; i += rows)
    for (int64_t c = 0; c < dim; c += kCols)
      path.attention_tile(s + i * stride, stride, values + c, dim, keys_pad, o + i * dim + c, dim);
  for (int64_t i = 0; i < m; ++i) {
    float* target = out + ((b * x.seq + t0 + i / group) * x.heads + g * group + i % group) * dim;
    const float inverse = sums[i] > 0.0f ? 1.0f / sums[i] : 0.0f;
    for (int64_t d = 0; d < dim; ++d) target[d] = o[i * dim + d] * inverse;
  }
}

}  // namespace
}  // namespace secateurs

// q [batch, heads, seq, dim] and k, v [batch, kv_heads, seq, dim] given by element strides
// (unit stride along dim); out [batch, seq, heads, dim] contiguous. path: a Path (kernels.h).
// causal: each query sees the keys up to its own position; key_mask (uint8 [batch, seq], nonzero
// = attend; nullptr = all) removes keys for every query of its batch entry.
extern "C" __attribute__((visibility("default"))) int secateurs_attention(
    int path, int threads, const float* q, const int64_t* q_strides, const float* k, const int64_t* k_strides,
    const float* v, const int64_t* v_strides, float* out, int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads,
    int64_t dim, float scale, int causal, const uint8_t* key_mask) {
  using namespace secateurs;
  if (batch < 0 || seq < 0 || kv_heads < 1 || heads < 1 || heads % kv_heads || dim < 1 || dim % kCols)
    return kInvalidArgument;
  if (path < kPortable || path > kAvx512Vbmi2) return kInvalidArgument;
  if (!cpu_supports(path)) return kUnsupportedPath;
  const KernelTable& table = kernels_for(path);
  const Shape x{batch, seq, heads, kv_heads, dim};
  const View query{q, q_strides[0], q_strides[1], q_strides[2]};
  const View key{k, k_strides[0], k_strides[1], k_strides[2]};
  const View value{v, v_strides[0], v_strides[1], v_strides[2]};
  const int64_t stride = x.padded_seq(), pairs = batch * kv_heads;
  std::vector<float> biases(key_mask ? batch * stride : 0, 0.0f), keeps(key_mask ? batch * stride : 0, 1.0f);
  std::vector<int64_t> first_keys(batch, key_mask ? seq : 0);
  for (int64_t b = 0; key_mask && b < batch; ++b)
    for (int64_t t = seq - 1; t >= 0; --t) {
      if (key_mask[b * seq + t]) {
        first_keys[b] = t;
      } else {
        biases[b * stride + t] = -INFINITY;
        keeps[b * stride + t] = 0.0f;
      }
    }
  // Causal blocks are short so that the threads share the triangle evenly; bidirectional ones take
  // up to kTaskRows query rows (M is padded to a multiple of kAttentionPad: less waste).
  const int64_t block = causal ? kPositions : std::max<int64_t>(1, std::min(seq, kTaskRows / x.group()));
  const int64_t blocks = (seq + block - 1) / block, tasks = pairs * blocks;
  const int64_t m_pad = Shape::padded_rows(block * x.group()), pair_floats = dim * stride;
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
      const float* keep = key_mask ? keeps.data() + b * stride : nullptr;
      attend_block(table, x, query, kt, vp, bias, keep, first_keys[b], scale, causal != 0, block, b, g, index * block,
                   work, out);
    }
  }
  return kOk;
}
