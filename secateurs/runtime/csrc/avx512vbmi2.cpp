// AVX-512 with BW, VL and VBMI2 (Ice Lake and later, Zen 4 and 5): the avx512 path, with int8
// values under a bitmask expanded by one vpexpandb per 32 columns (a masked expand-load that
// reads only the kept bytes) and multiplied with the int16 activations on 512-bit vpmaddwd,
// instead of the AVX2 path's pshufb table on two 256-bit halves; dense int8 codes take the
// 512-bit vpmaddwd too. Everything else is the avx512 path's.
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt,bmi,bmi2")

#include "avx2_int16.h"
#include "avx512_simd.h"

namespace secateurs {
namespace {

struct Simd : Simd512 {
  static constexpr int kSparseInt4 = kSparseInt4Expand;
  static I madd(const int8_t* codes, const int16_t* q) {
    return _mm512_madd_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))),
                             _mm512_loadu_si512(q));
  }
  static I madd(const uint8_t* codes, const int16_t* q) {
    return _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))),
                             _mm512_loadu_si512(q));
  }

  // A 64-column block of bitmask-sparse 4-bit codes: its (kept + 1) / 2 bytes loaded (masked: no
  // read past them), each byte's two nibbles spread into two bytes (still in column order), one
  // vpexpandb puts every code at its column, then (code - zero) at kept columns times q on two
  // 512-bit vpmaddwd.
  static I sparse_int4_madd(uint64_t bits, const uint8_t* codes, const int16_t* q, int zero) {
    const int bytes = (__builtin_popcountll(bits) + 1) / 2;
    const __m256i raw = _mm256_maskz_loadu_epi8(static_cast<__mmask32>(bytes == 32 ? ~0u : (1u << bytes) - 1), codes);
    const __m512i wide = _mm512_cvtepu8_epi16(raw);
    const __m512i nibbles = _mm512_or_si512(_mm512_and_si512(wide, _mm512_set1_epi16(0x000f)),
                                            _mm512_slli_epi16(_mm512_and_si512(wide, _mm512_set1_epi16(0x00f0)), 4));
    const __m512i expanded = _mm512_maskz_expand_epi8(static_cast<__mmask64>(bits), nibbles);
    const __m512i z = _mm512_set1_epi16(static_cast<int16_t>(zero));
    const __m512i low = _mm512_maskz_sub_epi16(static_cast<__mmask32>(bits),
                                               _mm512_cvtepu8_epi16(_mm512_castsi512_si256(expanded)), z);
    const __m512i high = _mm512_maskz_sub_epi16(static_cast<__mmask32>(bits >> 32),
                                                _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(expanded, 1)), z);
    return _mm512_add_epi32(_mm512_madd_epi16(low, _mm512_loadu_si512(q)), _mm512_madd_epi16(high, _mm512_loadu_si512(q + 32)));
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
