// AVX2 + FMA path (8 floats per vector). Compiled with a target pragma so the library itself
// still loads on CPUs without AVX2; the dispatcher only calls it when the CPU reports AVX2+FMA.
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2")

#include "avx2_int16.h"

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

// For each 8-bit mask, what expands 8 packed values (read from the running value offset) into the
// lanes of its set bits, with zeros in the others:
// - fp32: per lane the vpermps index of its value (its rank among the set bits), or -1 for a
//   cleared lane, whose sign bit then drives the blend with zero;
// - bf16 / int8: vpshufb controls over the 8 values broadcast to both 128-bit halves, putting
//   value `rank` into the upper 16 bits (bf16 -> its fp32 bits) or upper 8 bits (int8 ->
//   int32 * 2^24) of the lane; 0x80 bytes give the zeros for free.
struct ExpandTables {
  alignas(64) int32_t fp32[256][8];
  alignas(64) uint8_t bf16[256][32];
  alignas(64) uint8_t int8[256][32];
  constexpr ExpandTables() : fp32(), bf16(), int8() {
    for (int bits = 0; bits < 256; ++bits) {
      int rank = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool kept = bits >> lane & 1;
        fp32[bits][lane] = kept ? rank : -1;
        for (int byte = 0; byte < 4; ++byte) {
          bf16[bits][4 * lane + byte] = kept && byte >= 2 ? static_cast<uint8_t>(2 * rank + byte - 2) : 0x80;
          int8[bits][4 * lane + byte] = kept && byte == 3 ? static_cast<uint8_t>(rank) : 0x80;
        }
        rank += kept;
      }
    }
  }
};
constexpr ExpandTables kExpandTables;

// Expansions given the table entry of the mask byte.
inline __m256 expand_entry(const uint8_t* entry, const float* p) {
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(entry));
  const __m256 packed = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), index);
  // Hidden from the compiler, which would otherwise turn the one-uop blend with zero into a
  // compare and an and-not.
  __m256 zero = _mm256_setzero_ps();
  asm("" : "+x"(zero));
  return _mm256_blendv_ps(packed, zero, _mm256_castsi256_ps(index));
}
inline __m256 expand_entry(const uint8_t* entry, const uint16_t* p) {
  const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(entry));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(packed, control));
}
inline __m256 expand_entry(const uint8_t* entry, const int8_t* p) {
  int64_t eight;
  std::memcpy(&eight, p, sizeof eight);
  const __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(entry));
  return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(_mm256_set1_epi64x(eight), control));
}

// Table (as bytes) and log2 of its entry size per value type: all entries are 32 bytes.
inline const uint8_t* expand_table(float) { return reinterpret_cast<const uint8_t*>(kExpandTables.fp32[0]); }
inline const uint8_t* expand_table(uint16_t) { return kExpandTables.bf16[0]; }
inline const uint8_t* expand_table(int8_t) { return kExpandTables.int8[0]; }
constexpr unsigned kExpandEntryShift = 5;

struct Simd {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float half_value(uint16_t h) { return _cvtsh_ss(h); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
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
  static I round_to_int(F v) { return _mm256_cvtps_epi32(v); }
  static F pow2(I n) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23)); }

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
  template <class T>
  static F expand(unsigned bits, const T* p) {
    return expand_entry(expand_table(T{}) + (bits << kExpandEntryShift), p);
  }
  // Two chunks (16 mask bits): one pdep spreads both bytes into their table offsets, whose
  // popcounts are those of the bytes.
  template <class T>
  static int expand_pair(unsigned bits, const T* p, F& low, F& high) {
    constexpr unsigned shift = kExpandEntryShift;
    const unsigned offsets = _pdep_u32(bits, (0xffu << shift) | (0xffu << (16 + shift)));
    const unsigned low_offset = offsets & 0xffffu;
    low = expand_entry(expand_table(T{}) + low_offset, p);
    high = expand_entry(expand_table(T{}) + (offsets >> 16), p + __builtin_popcount(low_offset));
    return __builtin_popcount(offsets);
  }
  static float expand_unit(float) { return 1.0f; }
  static float expand_unit(uint16_t) { return 1.0f; }
  static float expand_unit(int8_t) { return 1.0f / 16777216.0f; }  // the int8 lanes come out * 2^24

  static void in_register(F& v) { asm("" : "+x"(v)); }
  static void transpose_block(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
    transpose8x8(in, in_stride, out, out_stride);
  }

  template <class Code>
  static I madd(const Code* codes, const int16_t* q) { return madd16(codes, q); }
  static I expand_madd(unsigned bits, const int8_t* values, const int16_t* q, int& count) {
    return expand_madd16(bits, values, q, count);
  }
  static int gather_int16(unsigned bits, const int16_t* q, int16_t* out) { return gather_int16x8(bits, q, out); }
  template <int kBooks>
  static void vq_int8_rows4(const int8_t* books, int64_t codewords, const uint8_t* codes, int64_t per_row, int64_t groups,
                            const int8_t* q, int32_t* total) {
    vq_int8_rows4_avx2<kBooks>(books, codewords, codes, per_row, groups, q, total);
  }
  // One int4 deinterleave block (16 columns, 8 bytes): low nibbles, then high ones.
  static I madd_int4(const uint8_t* bytes, const int16_t* q) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    return madd16_codes(_mm_unpacklo_epi64(low_nibbles16(raw), high_nibbles16(raw)), q);
  }

  static constexpr int kSparseInt4 = kSparseInt4Spread;
  static void spread_int4(const uint8_t* codes, int zero, int8_t* out) { spread_int4_block(codes, zero, out); }
  static I spread_int4_madd(uint64_t bits, const int8_t* spread, const int16_t* q) {
    return spread_int4_madd16(bits, spread, q);
  }
  static F load_halves(const float* low, const float* high) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(low)), _mm_loadu_ps(high), 1);
  }
  static F load_halves(const uint16_t* low, const uint16_t* high) {  // 4 halves from each
    const __m128i pair = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(low)),
                                            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(high)));
    return _mm256_cvtph_ps(pair);
  }
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
