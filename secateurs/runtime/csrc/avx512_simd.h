// The AVX-512F Simd wrapper (row_kernels.h) of the avx512 path, shared by the avx512vbmi2 path,
// which overrides its int8 expansion. Include after the unit's `#pragma GCC target` and
// avx2_int16.h; defines secateurs::{anonymous}::Simd512.
#pragma once

#include <immintrin.h>

#include "kernels.h"

namespace secateurs {
namespace {

struct Simd512 {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }

  static I load_i32(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I load_u8(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static I add_i32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I low_nibbles(I v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
  static I high_nibbles(I v) { return _mm512_srli_epi32(v, 4); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static I round_to_int(F v) { return _mm512_cvtps_epi32(v); }
  static F pow2(I n) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23)); }

  static F as_float(I v) { return _mm512_castsi512_ps(v); }

  static F load_values(const float* p) { return load(p); }
  static F load_values(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F load_values(const uint16_t* p) {
    const I widened = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));
  }

  static F compress(unsigned bits, F v) { return _mm512_maskz_compress_ps(static_cast<__mmask16>(bits), v); }
  // vexpandps: fp32 reads only the kept values; bf16 / int8 convert W values first.
  static F expand(unsigned bits, const float* p) { return _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(bits), p); }
  template <class T>
  static F expand(unsigned bits, const T* p) { return _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load_values(p)); }
  template <class T>
  static int expand_pair(unsigned bits, const T* p, F& low, F& high) {
    const unsigned low_bits = bits & ((1u << W) - 1);
    low = expand(low_bits, p);
    high = expand(bits >> W, p + __builtin_popcount(low_bits));
    return __builtin_popcount(bits);
  }
  template <class T>
  static float expand_unit(T) { return 1.0f; }

  static void in_register(F& v) { asm("" : "+v"(v)); }
  // 16 x 16 as four 8 x 8 blocks (AVX2 shuffles): a 512-bit transpose (64 shuffles for 256 floats
  // instead of 96) left a 90%-sparse MiniLM encoder no faster, in interleaved A/B runs
  static void transpose_block(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
    for (int i = 0; i < 16; i += 8)
      for (int j = 0; j < 16; j += 8) transpose8x8(in + i * in_stride + j, in_stride, out + j * out_stride + i, out_stride);
  }

  // The int16 kernels on two 256-bit halves (avx2_int16.h).
  static I join(__m256i low, __m256i high) { return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1); }
  template <class Code>
  static I madd(const Code* codes, const int16_t* q) { return join(madd16(codes, q), madd16(codes + 16, q + 16)); }
  // One int4 deinterleave block (32 columns, 16 bytes): the low nibbles meet its first 16
  // activations, the high ones its last 16.
  static I madd_int4(const uint8_t* bytes, const int16_t* q) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    return join(madd16_codes(low_nibbles16(raw), q), madd16_codes(high_nibbles16(raw), q + 16));
  }
  static I expand_madd(unsigned bits, const int8_t* values, const int16_t* q, int& count) {
    int high_count;
    const __m256i low = expand_madd16(bits & 0xffffu, values, q, count);
    const __m256i high = expand_madd16(bits >> 16, values + count, q + 16, high_count);
    count += high_count;
    return join(low, high);
  }
  static int gather_int16(unsigned bits, const int16_t* q, int16_t* out) { return gather_int16x8(bits, q, out); }
  template <int kBooks>
  static void vq_int8_rows4(const int8_t* books, int64_t codewords, const uint8_t* codes, int64_t per_row, int64_t groups,
                            const int8_t* q, int32_t* total) {
    vq_int8_rows4_avx2<kBooks>(books, codewords, codes, per_row, groups, q, total);
  }

  // AVX-512F has no byte expand (VBMI2 has): the AVX2 two passes, summed in the low half.
  static constexpr int kSparseInt4 = kSparseInt4Spread;
  static void spread_int4(const uint8_t* codes, int zero, int8_t* out) { spread_int4_block(codes, zero, out); }
  static I spread_int4_madd(uint64_t bits, const int8_t* spread, const int16_t* q) {
    return _mm512_zextsi256_si512(spread_int4_madd16(bits, spread, q));
  }
  static F load_halves(const float* low, const float* high) {
    const __m512d joined = _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(low))),
                                              _mm256_castps_pd(_mm256_loadu_ps(high)), 1);  // AVX-512F only
    return _mm512_castpd_ps(joined);
  }
  static F load_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load_halves(const uint16_t* low, const uint16_t* high) {  // 8 halves from each
    const __m256i pair = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(high)), 1);
    return _mm512_cvtph_ps(pair);
  }
  static float half_value(uint16_t h) { return _cvtsh_ss(h); }
  static F lookup2(const float* window, I idx) {
    return _mm512_permutex2var_ps(load(window), idx, load(window + 16));
  }
};

}  // namespace
}  // namespace secateurs
