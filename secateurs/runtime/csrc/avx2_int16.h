// AVX2 pieces of the int16-activation kernels (kernels.h, quantize_int16), shared by the AVX2 and
// AVX-512 units (512-bit vpmaddwd / vpshufb need AVX-512BW, which the dispatcher does not check,
// so the AVX-512 unit runs these on 256-bit halves). Include after the unit's `#pragma GCC target`.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace secateurs {
namespace {

// 16 codes times 16 int16: lane i = c[2i] q[2i] + c[2i + 1] q[2i + 1] in int32.
inline __m256i madd16(const int8_t* codes, const int16_t* q) {
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
}
inline __m256i madd16(const uint8_t* codes, const int16_t* q) {
  return _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
}

// For each mask byte, the vpshufb control putting its `rank`-th kept value (of 16 loaded int8
// values) into the high byte of int16 lane i when bit i is set; 0x80 (a zero byte) elsewhere.
struct Int16ExpandTable {
  alignas(16) uint8_t control[256][16];
  constexpr Int16ExpandTable() : control() {
    for (int bits = 0; bits < 256; ++bits) {
      int rank = 0;
      for (int lane = 0; lane < 8; ++lane) {
        control[bits][2 * lane] = 0x80;
        control[bits][2 * lane + 1] = bits >> lane & 1 ? static_cast<uint8_t>(rank++) : 0x80;
      }
    }
  }
};
constexpr Int16ExpandTable kInt16Expand;

// Bitmask int8 values times int16 activations over 16 columns (16 mask bits): the kept values,
// read from `values` on, expanded into int16 lanes and multiplied pairwise with q (as madd16).
// One pdep turns both mask bytes into their table offsets (their popcounts are the bytes');
// each 128-bit half loads its own 16 values. Reads up to 24 values; `count` = the kept ones.
inline __m256i expand_madd16(unsigned bits, const int8_t* values, const int16_t* q, int& count) {
  const unsigned offsets = _pdep_u32(bits, 0xff0u | 0xff00000u);  // byte 0 << 4, byte 1 << 20
  const unsigned low_offset = offsets & 0xffffu;
  const int low_count = __builtin_popcount(low_offset);
  count = __builtin_popcount(offsets);
  const uint8_t* table = kInt16Expand.control[0];
  const __m256i packed = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(values + low_count),
                                             reinterpret_cast<const __m128i*>(values));
  const __m256i control = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(table + (offsets >> 16)),
                                              reinterpret_cast<const __m128i*>(table + low_offset));
  const __m256i expanded = _mm256_srai_epi16(_mm256_shuffle_epi8(packed, control), 8);
  return _mm256_madd_epi16(expanded, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
}

}  // namespace
}  // namespace secateurs
