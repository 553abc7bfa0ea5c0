// AVX2 + FMA path (8 floats per vector). Compiled with a target pragma so the library itself
// still loads on CPUs without AVX2; the dispatcher only calls it when the CPU reports AVX2+FMA.
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")

namespace secateurs {
namespace {

// For each 8-bit mask, the lanes of its set bits in increasing order (then zeros): the vpermps
// indices that compress a vector. 8 bytes per entry keep the table at 2 KiB.
struct CompressTable {
  alignas(64) uint8_t lanes[256][8];
  constexpr CompressTable() : lanes() {
    for (int bits = 0; bits < 256; ++bits) {
      int rank = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (bits >> lane & 1) lanes[bits][rank++] = static_cast<uint8_t>(lane);
    }
  }
};
constexpr CompressTable kCompressTable;

struct Simd {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static I load_i32(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I load_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static I add_i32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I low_nibbles(I v) { return _mm256_and_si256(v, _mm256_set1_epi32(15)); }
  static I high_nibbles(I v) { return _mm256_srli_epi32(v, 4); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }

  static F as_float(I v) { return _mm256_castsi256_ps(v); }

  static F load_values(const float* p) { return load(p); }
  static F load_values(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F load_values(const uint16_t* p) {
    const I widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));
  }

  static F compress(unsigned bits, F v) { return _mm256_permutevar8x32_ps(v, load_u8(kCompressTable.lanes[bits])); }
  static F lookup2(const float* window, I idx) {
    const F low = _mm256_permutevar8x32_ps(load(window), idx);
    const F high = _mm256_permutevar8x32_ps(load(window + 8), idx);
    // Index bit 3 picks the upper half; shifted into the sign bit it drives the blend.
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
};

}  // namespace
}  // namespace secateurs

#include "row_kernels.h"

namespace secateurs {
const KernelTable& avx2_kernels() { return kTable; }
}  // namespace secateurs
