// AVX-512 with BW, VL and VBMI2 (Ice Lake and later, Zen 4 and 5): the avx512 path, with int8
// values under a bitmask expanded by one vpexpandb per 32 columns (a masked expand-load that
// reads only the kept bytes) and multiplied with the int16 activations on 512-bit vpmaddwd,
// instead of the AVX2 path's pshufb table on two 256-bit halves; dense int8 codes take the
// 512-bit vpmaddwd too. Everything else is the avx512 path's.
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,popcnt,bmi,bmi2")

#include "avx2_int16.h"
#include "avx512_simd.h"

namespace secateurs {
namespace {

struct Simd : Simd512 {
  static I madd(const int8_t* codes, const int16_t* q) {
    return _mm512_madd_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))),
                             _mm512_loadu_si512(q));
  }
  static I madd(const uint8_t* codes, const int16_t* q) {
    return _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))),
                             _mm512_loadu_si512(q));
  }
  static I expand_madd(unsigned bits, const int8_t* values, const int16_t* q, int& count) {
    count = __builtin_popcount(bits);
    const __m256i expanded = _mm256_maskz_expandloadu_epi8(static_cast<__mmask32>(bits), values);
    return _mm512_madd_epi16(_mm512_cvtepi8_epi16(expanded), _mm512_loadu_si512(q));
  }
};

}  // namespace
}  // namespace secateurs

#include "row_kernels.h"

namespace secateurs {
const KernelTable& avx512vbmi2_kernels() { return kTable; }
}  // namespace secateurs
