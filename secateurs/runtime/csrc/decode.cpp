// Whole-model forward of a decoder-only LM for greedy generation (secateurs/runtime/decode.py):
// one call runs n tokens (n = 1: a decode step, n > 1: prefill with causal attention) through
// every block, appends their keys / values to a preallocated fp32 cache and writes the last
// token's logits, so the per-token cost outside the linear kernels is a few microseconds instead
// of the per-module Python overhead of an eager forward.
//
// The plan holds the model's shape, pointers to tensors owned (and kept alive) by the Python
// object, and every buffer a forward needs, allocated once. Linear layers run on the row kernels
// of kernels.h (dense, bitmask, N:M, quantized) chosen per instruction set; activations are fp32.
// Supported blocks: Llama (pre-norm, SiLU gated MLP) and Gemma 3 (q/k norms, post-attention and
// pre/post-feed-forward norms, GELU-tanh, sliding-window layers), described by LayerSpec.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "kernels.h"

namespace secateurs {

// --- the plan's description, mirrored by ctypes structures in decode.py (8-byte fields only) ---

enum LinearKind : int64_t { kDense = 0, kBitmask = 1, kNM = 2, kQuant = 3, kVQ = 4, kSparseInt4 = 5 };

struct LinearSpec {
  int64_t kind;        // LinearKind
  int64_t value_type;  // dense / bitmask: fp32, bf16, int8 (with row_scale); N:M: fp32, bf16
  int64_t rows, cols;
  const void* values;  // dense weight [rows, cols], bitmask / N:M values, quantized codes
  const uint8_t* mask;          // bitmask [rows, ceil(cols / 8)]
  const int64_t* row_offsets;   // bitmask [rows + 1]
  const float* row_scale;       // int8 dense / bitmask [rows]
  const uint8_t* indices;       // N:M in-group indices, shaped like the values
  int64_t n, m;                 // N:M
  int64_t bits, group_size;     // quantized: 4 or 8; group_size = cols for per channel
  const float* scale;           // quantized [rows, cols / group_size]
  const float* zero;            // quantized, same shape
  const float* bias;            // [rows] or nullptr
  // vector-quantized (VQArgs): values are the codes [rows, cols / group_size, codebooks], uint8 for
  // up to 256 codewords, else 16 bits; row_scale the per-row scale
  int64_t codebooks, codewords;
  const float* codebook_values;  // [codebooks][codewords][group_size]
  // bitmask-sparse 4-bit (SparseInt4Args): values are the packed codes, mask and row_offsets (bytes)
  // as for bitmask, scale and zero as for quantized, group_size a multiple of 64 (or cols)
  int64_t mask_group;  // bitmask: rows in groups of mask_group share a mask (BitmaskArgs), 0 or 1: none
  const uint16_t* codebook_half;  // vector-quantized: the codebooks as IEEE halves, or nullptr (VQArgs)
  const int8_t* codebook_int8;    // vector-quantized, integer decode: int8 codebooks, or nullptr (VQArgs)
  const float* position_scale;    // with codebook_int8: one scale per position of a group
};

struct LayerSpec {
  LinearSpec q, k, v, o, gate, up, down;
  // RMSNorm weights [hidden], already (1 + w) for Gemma; attn_out / mlp_out are Gemma's
  // post-attention and post-feed-forward norms (nullptr for Llama).
  const float* attn_in_norm;
  const float* attn_out_norm;
  const float* mlp_in_norm;
  const float* mlp_out_norm;
  const float* q_norm;  // [head_dim] per-head norms (Gemma) or nullptr
  const float* k_norm;
  int64_t sliding_window;  // a token sees the last `sliding_window` positions, itself included; 0 = all
  int64_t rope_table;      // 0 or 1: which cos / sin table
  double attention_scale;
};

struct ModelSpec {
  int64_t n_layers, hidden, n_heads, n_kv_heads, head_dim, vocab, max_length;
  int64_t activation;  // GatedActivation
  double rms_eps, embed_scale, final_softcap;  // final_softcap <= 0: none
  const void* embed;   // [vocab, hidden] in embed_type (int8: times embed_row_scale)
  int64_t embed_type;
  const float* embed_row_scale;
  const float* final_norm;
  LinearSpec lm_head;
  const float* cos[2];  // [max_length, head_dim]
  const float* sin[2];
  const LayerSpec* layers;
};

namespace {

// --- small helpers -------------------------------------------------------------------------------

// Zeroed floats for large buffers: calloc takes fresh zero pages from the OS without touching them.
Buffer zeroed_pages(int64_t count) {
  void* p = std::calloc(static_cast<size_t>(std::max<int64_t>(count, 1)), sizeof(float));
  if (!p) throw std::bad_alloc();
  return Buffer(static_cast<float*>(p));
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Weight bytes per row of a linear layer (thread split and small-problem thresholds).
int64_t value_bytes(int64_t type) { return type == kFloat32 ? 4 : type == kBFloat16 ? 2 : 1; }

// Below this much work (weight bytes x batch rows) per thread, waking a thread costs more than it saves.
constexpr double kMinWorkPerThread = 1 << 17;

void rms_norm(const float* x, const float* weight, float* out, int64_t n, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  const float inverse = 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(n)) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inverse);
}

// HF's rotate_half convention: the first and second halves of the head form the pairs.
void rope(float* x, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + (-b) * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// --- checks of the description (decode.py builds it from checked tensors; this is the backstop) --

struct SpecError {
  char message[256];
};

// Throws "layer <layer> <name>: <what>" (or "<name>: <what>" for layer -1: the model, the LM head).
[[noreturn]] void fail(const char* what, const char* name, int64_t layer) {
  SpecError error{};
  if (layer >= 0)
    std::snprintf(error.message, sizeof error.message, "layer %lld %s: %s", static_cast<long long>(layer), name, what);
  else
    std::snprintf(error.message, sizeof error.message, "%s: %s", name, what);
  throw error;
}

void check_linear(const LinearSpec& l, int64_t rows, int64_t cols, const char* name, int64_t layer) {
  if (l.rows != rows || l.cols != cols) fail("unexpected shape", name, layer);
  if (rows <= 0 || cols <= 0 || !l.values) fail("empty or missing weights", name, layer);
  switch (l.kind) {
    case kDense:
      if (l.value_type < kFloat32 || l.value_type > kInt8) fail("bad value type", name, layer);
      if ((l.value_type == kInt8) != (l.row_scale != nullptr)) fail("int8 weights need a row scale", name, layer);
      break;
    case kBitmask:
      if (l.value_type < kFloat32 || l.value_type > kInt8 || !l.mask || !l.row_offsets) fail("bad bitmask", name, layer);
      if ((l.value_type == kInt8) != (l.row_scale != nullptr)) fail("int8 values need a row scale", name, layer);
      if (l.mask_group < 0) fail("mask_group must be >= 0", name, layer);
      if (l.row_offsets[0] != 0) fail("row offsets must start at 0", name, layer);
      for (int64_t r = 0; r < rows; ++r)
        if (l.row_offsets[r + 1] < l.row_offsets[r] || l.row_offsets[r + 1] - l.row_offsets[r] > cols)
          fail("row offsets out of range", name, layer);
      break;
    case kNM:
      if ((l.value_type != kFloat32 && l.value_type != kBFloat16) || !l.indices || l.n <= 0 || l.m < l.n ||
          l.m > 256 || cols % l.m != 0)
        fail("bad N:M layout", name, layer);
      break;
    case kQuant:
      if ((l.bits != 4 && l.bits != 8) || l.group_size <= 0 || cols % l.group_size != 0 || !l.scale || !l.zero)
        fail("bad quantized layout", name, layer);
      break;
    case kSparseInt4:
      if (cols % 64 != 0 || l.group_size <= 0 || l.group_size % 64 != 0 || cols % l.group_size != 0 || !l.mask ||
          !l.row_offsets || !l.scale || !l.zero)
        fail("bad sparse int4 layout", name, layer);
      break;
    case kVQ:
      if (l.group_size <= 0 || cols % l.group_size != 0 || l.codebooks < 1 || l.codebooks > 16 || l.codewords < 1 ||
          l.codewords > 65536 || !l.codebook_values || !l.row_scale)
        fail("bad vector-quantized layout", name, layer);
      break;
    default: fail("unknown layer kind", name, layer);
  }
}

// --- the plan ----------------------------------------------------------------------------------

class Plan {
 public:
  Plan(const ModelSpec& spec, int path, int threads, int64_t chunk)
      : spec_(spec), layers_(spec.layers, spec.layers + spec.n_layers), table_(&kernels_for(path)), chunk_(chunk) {
    spec_.layers = nullptr;  // layers_ holds the copy
    check();
    q_dim_ = spec_.n_heads * spec_.head_dim;
    kv_dim_ = spec_.n_kv_heads * spec_.head_dim;
    int64_t intermediate = 0, max_groups = 1;
    max_cols_ = std::max(spec_.hidden, q_dim_);
    for (const LayerSpec& layer : layers_) {
      intermediate = std::max(intermediate, layer.gate.rows);
      for (const LinearSpec* l : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down})
        if (l->kind == kQuant) max_groups = std::max(max_groups, l->cols / l->group_size);
    }
    if (spec_.lm_head.kind == kQuant) max_groups = std::max(max_groups, spec_.lm_head.cols / spec_.lm_head.group_size);
    max_cols_ = std::max(max_cols_, intermediate);
    x_ = zeroed_floats(chunk_ * spec_.hidden);
    h_ = zeroed_floats(chunk_ * spec_.hidden);
    t_ = zeroed_floats(chunk_ * spec_.hidden);
    q_ = zeroed_floats(chunk_ * q_dim_);
    att_ = zeroed_floats(chunk_ * q_dim_);
    k_ = zeroed_floats(chunk_ * kv_dim_);
    v_ = zeroed_floats(chunk_ * kv_dim_);
    gate_ = zeroed_floats(chunk_ * intermediate);
    up_ = zeroed_floats(chunk_ * intermediate);
    logits_ = zeroed_floats(spec_.vocab);
    rows_ = zeroed_floats(chunk_ * padded_stride(max_cols_));
    // Tiles of up to 2W batch lanes (W <= 16) per column, plus one tile the kernels may read past.
    tiles_ = zeroed_floats((chunk_ + 32) * max_cols_ + 64);
    group_sums_ = zeroed_floats(chunk_ * max_groups);
    int16_row_ = zeroed_floats(int16_row_floats(max_cols_));
    // Keys [layer][kv head][block][head_dim][kKeyBlock] (see AttentionArgs), values [layer][kv
    // head][position][head_dim]. Zeroed pages from the OS, committed as positions are written.
    key_blocks_ = (spec_.max_length + kKeyBlock - 1) / kKeyBlock;
    keys_ = zeroed_pages(spec_.n_layers * kv_dim_ * key_blocks_ * kKeyBlock);
    values_ = zeroed_pages(spec_.n_layers * kv_dim_ * spec_.max_length);
    set_threads(threads);
  }

  // Per-thread scratch for `threads` threads; on bad_alloc the plan keeps its previous threads.
  void set_threads(int threads) {
    threads = std::max(1, threads);
    const int64_t scratch_stride = (scratch_floats(max_cols_, table_->simd_width) + 15) / 16 * 16;
    const int64_t scores_stride = (spec_.max_length + kKeyBlock + 15) / 16 * 16;
    Buffer scratch = zeroed_floats(threads * scratch_stride), scores = zeroed_floats(threads * scores_stride);
    scratch_ = std::move(scratch);
    scores_ = std::move(scores);
    scratch_stride_ = scratch_stride, scores_stride_ = scores_stride, threads_ = threads;
  }

  int forward(const int64_t* tokens, int64_t n, int64_t start, float* logits, int64_t* next) {
    if (!tokens || n <= 0 || start < 0 || start > spec_.max_length - n) return kInvalidArgument;
    for (int64_t i = 0; i < n; ++i)
      if (tokens[i] < 0 || tokens[i] >= spec_.vocab) return kInvalidArgument;
    const Clock::time_point begin = Clock::now();
    int64_t batch = 0;
    for (int64_t done = 0; done < n; done += batch) {
      batch = std::min(chunk_, n - done);
      embed(tokens + done, batch);
      for (int64_t layer = 0; layer < spec_.n_layers; ++layer) block(layer, batch, start + done);
    }
    float* out = logits ? logits : logits_.get();
    rms_norm(x_.get() + (batch - 1) * spec_.hidden, spec_.final_norm, h_.get(), spec_.hidden, eps());
    linear(spec_.lm_head, h_.get(), 1, out);
    int64_t best = 0;
    for (int64_t i = 0; i < spec_.vocab; ++i) {
      if (spec_.final_softcap > 0) {
        const float cap = static_cast<float>(spec_.final_softcap);
        out[i] = std::tanh(out[i] / cap) * cap;
      }
      if (out[i] > out[best]) best = i;
    }
    if (next) *next = best;
    total_seconds_ += seconds_since(begin);
    ++calls_;
    return kOk;
  }

  void counters(double* out) const {
    out[0] = kernel_seconds_;
    out[1] = total_seconds_;
    out[2] = static_cast<double>(calls_);
  }
  void reset_counters() { kernel_seconds_ = total_seconds_ = 0.0, calls_ = 0; }

 private:
  float eps() const { return static_cast<float>(spec_.rms_eps); }

  void check() const {
    const ModelSpec& s = spec_;
    if (s.n_layers <= 0 || s.hidden <= 0 || s.n_heads <= 0 || s.n_kv_heads <= 0 || s.n_heads % s.n_kv_heads != 0 ||
        s.head_dim <= 0 || s.head_dim % 2 != 0 || s.vocab <= 0 || s.max_length <= 0 || s.activation < kSilu ||
        s.activation > kGeluErf || !s.embed || s.embed_type < kFloat32 || s.embed_type > kInt8 ||
        (s.embed_type == kInt8) != (s.embed_row_scale != nullptr) || !s.final_norm || !s.cos[0] || !s.sin[0] ||
        chunk_ <= 0)
      fail("inconsistent model description", "model", -1);
    const int64_t q_dim = s.n_heads * s.head_dim, kv_dim = s.n_kv_heads * s.head_dim;
    for (int64_t i = 0; i < s.n_layers; ++i) {
      const LayerSpec& l = layers_[i];
      check_linear(l.q, q_dim, s.hidden, "q_proj", i);
      check_linear(l.k, kv_dim, s.hidden, "k_proj", i);
      check_linear(l.v, kv_dim, s.hidden, "v_proj", i);
      check_linear(l.o, s.hidden, q_dim, "o_proj", i);
      check_linear(l.gate, l.gate.rows, s.hidden, "gate_proj", i);
      check_linear(l.up, l.gate.rows, s.hidden, "up_proj", i);
      check_linear(l.down, s.hidden, l.gate.rows, "down_proj", i);
      if (!l.attn_in_norm || !l.mlp_in_norm || (l.q_norm == nullptr) != (l.k_norm == nullptr))
        fail("missing norm weights", "norms", i);
      if (l.rope_table < 0 || l.rope_table > 1 || !s.cos[l.rope_table] || !s.sin[l.rope_table] ||
          l.sliding_window < 0 || !(l.attention_scale > 0))
        fail("bad attention settings", "self_attn", i);
    }
    check_linear(s.lm_head, s.vocab, s.hidden, "lm_head", -1);
  }

  void embed(const int64_t* tokens, int64_t batch) {
    const int64_t d = spec_.hidden;
    const float scale = static_cast<float>(spec_.embed_scale);
    for (int64_t b = 0; b < batch; ++b) {
      float* x = x_.get() + b * d;
      const int64_t row = tokens[b];
      switch (spec_.embed_type) {
        case kFloat32: {
          const float* e = static_cast<const float*>(spec_.embed) + row * d;
          for (int64_t i = 0; i < d; ++i) x[i] = e[i] * scale;
          break;
        }
        case kBFloat16: {
          const uint16_t* e = static_cast<const uint16_t*>(spec_.embed) + row * d;
          for (int64_t i = 0; i < d; ++i) x[i] = bf16_to_float(e[i]) * scale;
          break;
        }
        default: {
          const int8_t* e = static_cast<const int8_t*>(spec_.embed) + row * d;
          const float row_scale = spec_.embed_row_scale[row];
          for (int64_t i = 0; i < d; ++i) x[i] = (static_cast<float>(e[i]) * row_scale) * scale;
        }
      }
    }
  }

  void block(int64_t index, int64_t batch, int64_t start) {
    const LayerSpec& l = layers_[index];
    const int64_t d = spec_.hidden, hd = spec_.head_dim;
    for (int64_t b = 0; b < batch; ++b) rms_norm(x_.get() + b * d, l.attn_in_norm, h_.get() + b * d, d, eps());
    const Product qkv[] = {{&l.q, q_.get()}, {&l.k, k_.get()}, {&l.v, v_.get()}};
    linears(qkv, 3, h_.get(), batch);
    const float* cos = spec_.cos[l.rope_table];
    const float* sin = spec_.sin[l.rope_table];
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t position = start + b;
      for (int64_t h = 0; h < spec_.n_heads; ++h) {
        float* q = q_.get() + b * q_dim_ + h * hd;
        if (l.q_norm) rms_norm(q, l.q_norm, q, hd, eps());
        rope(q, cos + position * hd, sin + position * hd, hd);
      }
      for (int64_t h = 0; h < spec_.n_kv_heads; ++h) {
        float* k = k_.get() + b * kv_dim_ + h * hd;
        if (l.k_norm) rms_norm(k, l.k_norm, k, hd, eps());
        rope(k, cos + position * hd, sin + position * hd, hd);
        const int64_t head = index * spec_.n_kv_heads + h;
        float* keys = keys_.get() + (head * key_blocks_ + position / kKeyBlock) * hd * kKeyBlock + position % kKeyBlock;
        for (int64_t d = 0; d < hd; ++d) keys[d * kKeyBlock] = k[d];
        std::memcpy(values_.get() + (head * spec_.max_length + position) * hd, v_.get() + b * kv_dim_ + h * hd,
                    hd * sizeof(float));
      }
    }
    attention(index, l, batch, start);
    linear(l.o, att_.get(), batch, t_.get());
    residual(l.attn_out_norm, batch);
    for (int64_t b = 0; b < batch; ++b) rms_norm(x_.get() + b * d, l.mlp_in_norm, h_.get() + b * d, d, eps());
    const Product gate_up[] = {{&l.gate, gate_.get()}, {&l.up, up_.get()}};
    linears(gate_up, 2, h_.get(), batch);
    table_->gated_activation(static_cast<int>(spec_.activation), up_.get(), gate_.get(), batch * l.gate.rows);
    linear(l.down, gate_.get(), batch, t_.get());
    residual(l.mlp_out_norm, batch);
  }

  // x += norm(t) (or x += t without a norm).
  void residual(const float* norm, int64_t batch) {
    const int64_t d = spec_.hidden;
    for (int64_t b = 0; b < batch; ++b) {
      float* t = t_.get() + b * d;
      float* x = x_.get() + b * d;
      if (norm) rms_norm(t, norm, t, d, eps());
      for (int64_t i = 0; i < d; ++i) x[i] += t[i];
    }
  }

  void attention(int64_t index, const LayerSpec& l, int64_t batch, int64_t start) {
    const int64_t hd = spec_.head_dim, heads = spec_.n_heads, group = heads / spec_.n_kv_heads;
    const float scale = static_cast<float>(l.attention_scale);
    auto head = [&](int64_t pair, float* scores) {
      const int64_t b = pair / heads, h = pair % heads, position = start + b;
      const int64_t first = l.sliding_window > 0 ? std::max<int64_t>(0, position - l.sliding_window + 1) : 0;
      const int64_t head = index * spec_.n_kv_heads + h / group;
      const AttentionArgs args{q_.get() + b * q_dim_ + h * hd, keys_.get() + head * key_blocks_ * hd * kKeyBlock,
                               values_.get() + head * spec_.max_length * hd, hd, first, position - first + 1,
                               scale, scores, att_.get() + b * q_dim_ + h * hd};
      table_->attention(args);
    };
    const int64_t pairs = batch * heads;
    // Work ~ 2 x positions x head_dim floats per head.
    const double work = static_cast<double>(pairs) * static_cast<double>(start + batch) * static_cast<double>(hd) * 8;
    const int threads = static_cast<int>(std::min<double>(threads_, std::min<double>(pairs, work / kMinWorkPerThread + 1)));
    if (threads <= 1) {
      for (int64_t pair = 0; pair < pairs; ++pair) head(pair, scores_.get());
      return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) head(pair, scores_.get() + omp_get_thread_num() * scores_stride_);
  }

  // y [batch, l.rows] = x [batch, l.cols] W^T (+ bias), on the kernel of the layer's layout.
  void linear(const LinearSpec& l, const float* x, int64_t batch, float* y) {
    const Product one{&l, y};
    linears(&one, 1, x, batch);
  }

  // The products of layers that read the same x (q, k, v; gate, up). Layers of one layout share the
  // activations' preparation and one parallel region whose threads split all their rows by cost:
  // small layers (k and v, 192 rows on SmolLM2) no longer run alone or on one thread, and the group
  // pays one fork / join. Layers of different layouts run one after the other.
  struct Product {
    const LinearSpec* layer;
    float* y;
  };
  static constexpr int kMaxGroup = 3;

  static bool same_layout(const LinearSpec& a, const LinearSpec& b) {
    return a.kind == b.kind && a.value_type == b.value_type && a.cols == b.cols && a.bits == b.bits &&
           a.group_size == b.group_size;
  }

  void linears(const Product* group, int n, const float* x, int64_t batch) {
    for (int i = 1; i < n; ++i)
      if (!same_layout(*group[0].layer, *group[i].layer)) {
        for (int j = 0; j < n; ++j) linears(group + j, 1, x, batch);
        return;
      }
    const Clock::time_point begin = Clock::now();
    const LinearSpec& l = *group[0].layer;
    const int64_t cols = l.cols, w = table_->simd_width;
    auto layer = [group](int i) -> const LinearSpec& { return *group[i].layer; };
    switch (l.kind) {
      case kDense: {
        Activations xa = activation_rows(x, batch, cols, 0);
        if (l.value_type == kInt8) attach_int16(xa, cols, int16_row_.get());
        const int64_t row_bytes = cols * value_bytes(l.value_type);
        run(table_->dense, n, [&](int i) {
          return DenseArgs{xa, layer(i).rows, cols, layer(i).values, static_cast<int>(l.value_type),
                           layer(i).row_scale, group[i].y};
        }, [&](const DenseArgs&, int64_t r) { return r * row_bytes; });
        break;
      }
      case kBitmask: {
        Activations xa = sparse_activations(x, batch, cols);
        if (l.value_type == kInt8) attach_int16(xa, cols, int16_row_.get());
        const int64_t mask_stride = (cols + 7) / 8, bytes = value_bytes(l.value_type);
        run(table_->bitmask, n, [&](int i) {
          return BitmaskArgs{xa, layer(i).rows, cols, mask_stride, layer(i).mask, layer(i).values,
                             static_cast<int>(l.value_type), layer(i).row_offsets, layer(i).row_scale, group[i].y,
                             std::max<int64_t>(layer(i).mask_group, 1)};
        }, [&](const BitmaskArgs& a, int64_t r) { return a.row_offsets[r] * bytes + r * mask_stride; });
        break;
      }
      case kNM: {
        const Activations xa = sparse_activations(x, batch, cols);
        run(table_->nm, n, [&](int i) {
          return NMArgs{xa, layer(i).rows, cols, layer(i).n, layer(i).m, layer(i).values,
                        static_cast<int>(l.value_type), layer(i).indices, group[i].y};
        }, [&](const NMArgs& a, int64_t r) { return r * (cols / a.m * a.n * (value_bytes(l.value_type) + 1)); });
        break;
      }
      case kSparseInt4: {  // a one-row kernel: a prefill chunk runs it row by row
        for (int64_t b = 0; b < batch; ++b) {
          Activations xa = activation_rows(x + b * cols, 1, cols, 0);
          attach_int16(xa, cols, int16_row_.get());
          run(table_->sparse_int4, n, [&](int i) {
            const LinearSpec& li = layer(i);
            return SparseInt4Args{xa, li.rows, cols, li.group_size, cols / li.group_size, li.mask,
                                  static_cast<const uint8_t*>(li.values), li.row_offsets, li.scale, li.zero,
                                  group[i].y + b * li.rows};
          }, [&](const SparseInt4Args& a, int64_t r) { return a.row_offsets[r] + r * (cols / 8); });
        }
        break;
      }
      case kVQ: {
        const Activations xa = activation_rows(x, batch, cols, 0);
        run(table_->vq, n, [&](int i) {
          const LinearSpec& li = layer(i);
          const bool narrow = li.codewords <= 256;
          return VQArgs{xa, li.rows, cols, li.group_size, li.codebooks, li.codewords, li.codebook_values,
                        narrow ? static_cast<const uint8_t*>(li.values) : nullptr,
                        narrow ? nullptr : static_cast<const uint16_t*>(li.values), li.row_scale, group[i].y,
                        li.codebook_half, li.position_scale ? li.codebook_int8 : nullptr, li.position_scale};
        }, [](const VQArgs& a, int64_t r) { return vq_cost(a, r); });
        break;
      }
      default: {
        const int64_t n_groups = cols / l.group_size, int4_block = 2 * w;
        Activations xa = activation_rows(x, batch, cols, l.bits == 4 ? int4_block : 0);
        if (quant_takes_int16(l.bits, batch, cols, n_groups, l.group_size)) attach_int16(xa, cols, int16_row_.get());
        activation_group_sums(xa, n_groups, l.group_size, [&](int64_t b, int64_t j) { return x[b * cols + j]; },
                              group_sums_.get());
        const int64_t row_bytes = l.bits == 8 ? cols : (cols + 1) / 2;
        run(table_->quant, n, [&](int i) {
          return QuantArgs{xa, layer(i).rows, cols, l.bits, l.group_size, n_groups, int4_block,
                           static_cast<const uint8_t*>(layer(i).values), layer(i).scale, layer(i).zero,
                           group_sums_.get(), group[i].y};
        }, [&](const QuantArgs&, int64_t r) { return r * row_bytes; });
      }
    }
    for (int i = 0; i < n; ++i) {
      const LinearSpec& li = layer(i);
      if (li.bias)
        for (int64_t b = 0; b < batch; ++b)
          for (int64_t r = 0; r < li.rows; ++r) group[i].y[b * li.rows + r] += li.bias[r];
    }
    kernel_seconds_ += seconds_since(begin);
  }

  // x [batch, cols] as zero-padded rows; with block > 0 deinterleaved for int4 (see QuantArgs).
  Activations activation_rows(const float* x, int64_t batch, int64_t cols, int64_t block) {
    const int64_t stride = padded_stride(cols);
    for (int64_t b = 0; b < batch; ++b) {
      float* row = rows_.get() + b * stride;
      const float* in = x + b * cols;
      if (block > 0) {  // a partial last block scatters past `cols`: zero the row first
        std::memset(row, 0, stride * sizeof(float));
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t in_block = j % block;
          row[j - in_block + in_block / 2 + (in_block % 2) * (block / 2)] = in[j];
        }
      } else {
        std::memcpy(row, in, cols * sizeof(float));
        std::memset(row + cols, 0, (stride - cols) * sizeof(float));
      }
    }
    return Activations{batch, rows_.get(), stride, nullptr, 0};
  }

  // A padded row for batch 1, else tiles [n_tiles][cols][tile] of W or 2W batch lanes.
  Activations sparse_activations(const float* x, int64_t batch, int64_t cols) {
    const int64_t w = table_->simd_width;
    if (batch == 1) {
      Activations a = activation_rows(x, 1, cols, 0);
      a.tile = w;
      return a;
    }
    const int64_t tile = sparse_tile(batch, w);
    std::memset(tiles_.get(), 0, tile_floats(batch, cols, tile) * sizeof(float));  // reused between calls
    write_tiles([x](int64_t i) { return x[i]; }, batch, cols, tile, tiles_.get());
    return Activations{batch, nullptr, padded_stride(cols), tiles_.get(), tile};
  }

  // The rows of n layers (args_of(i) -> their kernel arguments) on up to threads_ OpenMP threads:
  // contiguous ranges of equal cost over the layers' rows laid end to end, cost(args, r) the work of
  // a layer's rows [0, r); no parallel region at all when one thread is enough.
  template <class Args, class ArgsOf, class Cost>
  void run(RowKernel<Args> kernel, int n, const ArgsOf& args_of, const Cost& cost) {
    Args args[kMaxGroup];
    double layer_cost[kMaxGroup], total = 0.0;
    for (int i = 0; i < n; ++i) {
      args[i] = args_of(i);
      layer_cost[i] = static_cast<double>(cost(args[i], args[i].rows));
      total += layer_cost[i];
    }
    const int threads = static_cast<int>(std::min<double>(threads_, total * args[0].x.batch / kMinWorkPerThread + 1));
    if (threads <= 1) {
      for (int i = 0; i < n; ++i) kernel(args[i], 0, args[i].rows, scratch_.get());
      return;
    }
#pragma omp parallel num_threads(threads)
    {
      const int part = omp_get_thread_num(), parts = omp_get_num_threads();
      double offset = 0.0;  // cost of the layers before layer i
      for (int i = 0; i < n; ++i) {
        const auto layer_cost_of = [&](int64_t r) { return cost(args[i], r); };
        // both ends from the same expressions as the neighbouring parts': every row exactly once
        const int64_t first = row_at_cost(args[i].rows, total * part / parts - offset, layer_cost_of);
        const int64_t last = part + 1 == parts ? args[i].rows
                                               : row_at_cost(args[i].rows, total * (part + 1) / parts - offset, layer_cost_of);
        if (first < last) kernel(args[i], first, last, scratch_.get() + part * scratch_stride_);
        offset += layer_cost[i];
      }
    }
  }

  ModelSpec spec_;
  std::vector<LayerSpec> layers_;
  const KernelTable* table_;
  int64_t chunk_, q_dim_ = 0, kv_dim_ = 0, max_cols_ = 0;
  int threads_ = 1;
  int64_t scratch_stride_ = 0, scores_stride_ = 0, key_blocks_ = 0;
  Buffer x_, h_, t_, q_, att_, k_, v_, gate_, up_, logits_, rows_, tiles_, group_sums_, int16_row_, keys_, values_, scratch_, scores_;
  double kernel_seconds_ = 0.0, total_seconds_ = 0.0;
  int64_t calls_ = 0;
};

void write_message(char* buffer, int64_t size, const char* message) {
  if (buffer && size > 0) std::snprintf(buffer, static_cast<size_t>(size), "%s", message);
}

}  // namespace
}  // namespace secateurs

using namespace secateurs;

#define SECATEURS_EXPORT __attribute__((visibility("default")))

extern "C" {

// A plan for `spec` on kernel path `path`, or nullptr with *status set (and a message in `error`).
SECATEURS_EXPORT void* secateurs_decode_create(const ModelSpec* spec, int path, int threads, int64_t chunk,
                                               int* status, char* error, int64_t error_size) {
  *status = kOk;
  if (!cpu_supports(path)) {
    *status = kUnsupportedPath;
    write_message(error, error_size, "this CPU does not support the kernel path");
    return nullptr;
  }
  if (!spec || !spec->layers || spec->n_layers <= 0) {
    *status = kInvalidArgument;
    write_message(error, error_size, "empty model description");
    return nullptr;
  }
  try {
    return new Plan(*spec, path, threads, chunk);
  } catch (const SpecError& e) {
    *status = kInvalidArgument;
    write_message(error, error_size, e.message);
  } catch (const std::bad_alloc&) {
    *status = kOutOfMemory;
    write_message(error, error_size, "out of memory allocating the decode buffers");
  }
  return nullptr;
}

SECATEURS_EXPORT void secateurs_decode_destroy(void* plan) { delete static_cast<Plan*>(plan); }

SECATEURS_EXPORT int secateurs_decode_set_threads(void* plan, int threads) {
  if (!plan || threads < 1) return kInvalidArgument;
  try {
    static_cast<Plan*>(plan)->set_threads(threads);
  } catch (const std::bad_alloc&) {
    return kOutOfMemory;
  }
  return kOk;
}

// Runs tokens [n] at positions start .. start + n - 1 (their keys / values replace the cache's
// there; earlier positions must have been run before), writes the last token's logits [vocab]
// to `logits` (if not null) and its argmax to `next` (if not null).
SECATEURS_EXPORT int secateurs_decode_forward(void* plan, const int64_t* tokens, int64_t n, int64_t start,
                                              float* logits, int64_t* next) {
  if (!plan) return kInvalidArgument;
  return static_cast<Plan*>(plan)->forward(tokens, n, start, logits, next);
}

// [seconds in linear kernels (incl. LM head), seconds in forward calls, forward calls] since the last reset.
SECATEURS_EXPORT void secateurs_decode_counters(void* plan, double* out, int reset) {
  if (!plan || !out) return;
  static_cast<Plan*>(plan)->counters(out);
  if (reset) static_cast<Plan*>(plan)->reset_counters();
}

}  // extern "C"
