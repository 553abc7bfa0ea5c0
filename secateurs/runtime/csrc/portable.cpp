// Portable path: standard C++ over fixed-size lane arrays (the compiler vectorizes what the
// baseline ISA allows). It is the reference the SIMD paths are tested against, and runs anywhere.
#include "kernels.h"

namespace secateurs {
namespace {

struct Simd {
  static constexpr int W = 8;
  struct F { float lane[W]; };
  struct I { int32_t lane[W]; };

  template <class Fn>
  static F map(Fn&& fn) {
    F r;
    for (int i = 0; i < W; ++i) r.lane[i] = fn(i);
    return r;
  }
  template <class Fn>
  static I map_i32(Fn&& fn) {
    I r;
    for (int i = 0; i < W; ++i) r.lane[i] = fn(i);
    return r;
  }

  static F zero() { return F{}; }
  static F set1(float v) { return map([&](int) { return v; }); }
  static F load(const float* p) { return map([&](int i) { return p[i]; }); }
  static F load_half(const uint16_t* p) { return map([&](int i) { return half_to_float(p[i]); }); }
  static float half_value(uint16_t h) { return half_to_float(h); }
  static void store(float* p, F v) { std::memcpy(p, v.lane, sizeof v.lane); }
  static F add(F a, F b) { return map([&](int i) { return a.lane[i] + b.lane[i]; }); }
  static F mul(F a, F b) { return map([&](int i) { return a.lane[i] * b.lane[i]; }); }
  static F sub(F a, F b) { return map([&](int i) { return a.lane[i] - b.lane[i]; }); }
  static F div(F a, F b) { return map([&](int i) { return a.lane[i] / b.lane[i]; }); }
  static F min(F a, F b) { return map([&](int i) { return a.lane[i] < b.lane[i] ? a.lane[i] : b.lane[i]; }); }
  static F max(F a, F b) { return map([&](int i) { return a.lane[i] > b.lane[i] ? a.lane[i] : b.lane[i]; }); }
  static F fma(F a, F b, F c) { return map([&](int i) { return a.lane[i] * b.lane[i] + c.lane[i]; }); }
  static float hsum(F v) {
    float total = 0.0f;
    for (float x : v.lane) total += x;
    return total;
  }

  static I load_i32(const int32_t* p) { return map_i32([&](int i) { return p[i]; }); }
  static I load_u8(const uint8_t* p) { return map_i32([&](int i) { return p[i]; }); }
  static I add_i32(I a, I b) { return map_i32([&](int i) { return a.lane[i] + b.lane[i]; }); }
  static I low_nibbles(I v) { return map_i32([&](int i) { return v.lane[i] & 15; }); }
  static I high_nibbles(I v) { return map_i32([&](int i) { return v.lane[i] >> 4; }); }
  static F to_float(I v) { return map([&](int i) { return static_cast<float>(v.lane[i]); }); }
  static I round_to_int(F v) { return map_i32([&](int i) { return static_cast<int32_t>(std::nearbyint(v.lane[i])); }); }
  static F pow2(I n) {
    F r;
    for (int i = 0; i < W; ++i) {
      const uint32_t bits = static_cast<uint32_t>(n.lane[i] + 127) << 23;
      std::memcpy(&r.lane[i], &bits, sizeof bits);
    }
    return r;
  }

  static F as_float(I v) {
    F r;
    std::memcpy(r.lane, v.lane, sizeof r.lane);
    return r;
  }

  static F load_values(const float* p) { return load(p); }
  static F load_values(const int8_t* p) { return map([&](int i) { return static_cast<float>(p[i]); }); }
  static F load_values(const uint16_t* p) {
    return map([&](int i) {
      const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
      float v;
      std::memcpy(&v, &bits, sizeof v);
      return v;
    });
  }

  static F compress(unsigned bits, F v) {
    F r{};
    int rank = 0;
    for (int i = 0; i < W; ++i)
      if (bits >> i & 1u) r.lane[rank++] = v.lane[i];
    return r;
  }
  template <class T>
  static F expand(unsigned bits, const T* p) {
    const F values = load_values(p);
    F r{};
    int rank = 0;
    for (int i = 0; i < W; ++i)
      if (bits >> i & 1u) r.lane[i] = values.lane[rank++];
    return r;
  }
  template <class T>
  static int expand_pair(unsigned bits, const T* p, F& low, F& high) {
    const unsigned low_bits = bits & ((1u << W) - 1);
    low = expand(low_bits, p);
    high = expand(bits >> W, p + __builtin_popcount(low_bits));
    return __builtin_popcount(bits);
  }
  template <class T>
  static float expand_unit(T) { return 1.0f; }

  static void in_register(F&) {}
  static void transpose_block(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
    for (int i = 0; i < W; ++i)
      for (int j = 0; j < W; ++j) out[j * out_stride + i] = in[i * in_stride + j];
  }

  static constexpr int kSparseInt4 = kSparseInt4Scalar;
  static F load_halves(const float* low, const float* high) {
    return map([&](int i) { return i < W / 2 ? low[i] : high[i - W / 2]; });
  }
  static F load_halves(const uint16_t* low, const uint16_t* high) {
    return map([&](int i) { return half_to_float(i < W / 2 ? low[i] : high[i - W / 2]); });
  }
  static F lookup2(const float* window, I idx) { return map([&](int i) { return window[idx.lane[i]]; }); }

  template <class Code>
  static I madd(const Code* codes, const int16_t* q) {
    return map_i32([&](int i) { return int32_t{codes[2 * i]} * q[2 * i] + int32_t{codes[2 * i + 1]} * q[2 * i + 1]; });
  }
  // One int4 deinterleave block (2W columns, W bytes): low nibbles, then high ones.
  static I madd_int4(const uint8_t* bytes, const int16_t* q) {
    uint8_t codes[2 * W];
    for (int i = 0; i < W; ++i) codes[i] = bytes[i] & 15, codes[W + i] = bytes[i] >> 4;
    return madd(codes, q);
  }
  template <int kBooks>
  static void vq_int8_rows4(const int8_t* books, int64_t codewords, const uint8_t* codes, int64_t per_row, int64_t groups,
                            const int8_t* q, int32_t* total) {
    for (int i = 0; i < 4; ++i) total[i] = vq_int8_dot(books, codewords, kBooks, codes + i * per_row, 0, groups, q);
  }
  static int gather_int16(unsigned bits, const int16_t* q, int16_t* out) {
    int count = 0;
    for (int lane = 0; lane < 8; ++lane)
      if (bits >> lane & 1u) out[count++] = q[lane];
    return count;
  }
  static I expand_madd(unsigned bits, const int8_t* values, const int16_t* q, int& count) {
    int8_t codes[2 * W] = {};
    count = 0;
    for (int i = 0; i < 2 * W; ++i)
      if (bits >> i & 1u) codes[i] = values[count++];
    return madd(codes, q);
  }
};

}  // namespace
}  // namespace secateurs

#include "row_kernels.h"

namespace secateurs {
const KernelTable& portable_kernels() { return kTable; }
}  // namespace secateurs
