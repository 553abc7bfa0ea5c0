// AVX2 pieces of the int16-activation kernels (kernels.h, quantize_int16) and the 8 x 8 float
// transpose of the batched kernels' tiles, shared by the AVX2 and AVX-512 units (512-bit vpmaddwd /
// vpshufb need AVX-512BW, which the dispatcher does not check, so the AVX-512 unit runs these on
// 256-bit halves). Include after the unit's `#pragma GCC target`.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace secateurs {
namespace {

// out[j * out_stride + i] = in[i * in_stride + j] for i, j < 8: pairs of rows interleaved, then
// pairs of pairs, then the 128-bit halves exchanged.
inline void transpose8x8(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * in_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      r[i + 2 * h] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 2 * h + 1] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(out + j * out_stride, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(out + (j + 4) * out_stride, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}

// 16 codes times 16 int16: lane i = c[2i] q[2i] + c[2i + 1] q[2i + 1] in int32.
inline __m256i madd16(const int8_t* codes, const int16_t* q) {
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
}
inline __m256i madd16(const uint8_t* codes, const int16_t* q) {
  return _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
}

// 4-bit codes on int16 activations (QuantArgs' int4 layout: activations deinterleaved in blocks,
// so a run of bytes' low nibbles meets one contiguous half of a block and their high nibbles the
// other): the low / high nibbles of 16 bytes, and 16 of them times 16 int16 as madd16.
inline __m128i low_nibbles16(__m128i bytes) { return _mm_and_si128(bytes, _mm_set1_epi8(15)); }
inline __m128i high_nibbles16(__m128i bytes) { return _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15)); }
inline __m256i madd16_codes(__m128i codes, const int16_t* q) {
  return _mm256_madd_epi16(_mm256_cvtepu8_epi16(codes), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
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

// For each mask byte, the vpshufb control gathering the int16 lanes of its set bits, in order, to
// the front (the other bytes zero).
struct Int16GatherTable {
  alignas(16) uint8_t control[256][16];
  constexpr Int16GatherTable() : control() {
    for (int bits = 0; bits < 256; ++bits) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (bits >> lane & 1) {
          control[bits][next++] = static_cast<uint8_t>(2 * lane);
          control[bits][next++] = static_cast<uint8_t>(2 * lane + 1);
        }
      while (next < 16) control[bits][next++] = 0x80;
    }
  }
};
constexpr Int16GatherTable kInt16Gather;

// The int16 activations of the set bits of `bits` (8 columns) stored contiguously at out (16
// bytes written); returns their count.
inline int gather_int16x8(unsigned bits, const int16_t* q, int16_t* out) {
  const __m128i gathered = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)),
                                            _mm_load_si128(reinterpret_cast<const __m128i*>(kInt16Gather.control[bits])));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), gathered);
  return __builtin_popcount(bits);
}

// Bitmask-sparse 4-bit codes (SparseInt4Args) in two passes over a row, because expanding
// straight from a just-stored buffer stalls on store forwarding (the 16-byte loads at a running
// offset straddle the stores): first every 64-column block's packed nibbles (up to 32 bytes,
// loaded whole: the layout keeps 32 spare bytes past the last row) are spread one code per byte in
// column order, minus the zero point (|code - zero| <= 15 fits int8), into 64 bytes of a row
// buffer; then each block's bytes are expanded 16 columns at a time by expand_madd16, so a pruned
// column contributes 0 whatever the zero point.
inline void spread_int4_block(const uint8_t* codes, int zero, int8_t* out) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i nibble = _mm256_set1_epi8(15), z = _mm256_set1_epi8(static_cast<char>(zero));
  const __m256i low = _mm256_sub_epi8(_mm256_and_si256(raw, nibble), z);
  const __m256i high = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble), z);
  // Per 128-bit half: interleaved (low, high) of its bytes 0-7, then of bytes 8-15.
  const __m256i first = _mm256_unpacklo_epi8(low, high), second = _mm256_unpackhi_epi8(low, high);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(first, second, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32), _mm256_permute2x128_si256(first, second, 0x31));
}

// The block's int32 lane sums of (code - zero) * q; reads up to 24 bytes past the block's 64.
inline __m256i spread_int4_madd16(uint64_t bits, const int8_t* spread, const int16_t* q) {
  int count;
  __m256i sum = expand_madd16(static_cast<unsigned>(bits & 0xffff), spread, q, count);
  for (int step = 1; step < 4; ++step) {
    spread += count;
    sum = _mm256_add_epi32(sum, expand_madd16(static_cast<unsigned>(bits >> (16 * step) & 0xffff), spread, q + 16 * step, count));
  }
  return sum;
}

// Integer-codebook VQ (VQArgs::codebook_int8): 4 weight rows against one int8 activation row, 4
// groups of 8 values (32 bytes) a step. A group's codeword of each book is 8 bytes, so its address is
// the code scaled by the addressing mode (one bit-field extract per code, where half codebooks need a
// shift and a mask), two codewords fill a 128-bit half and the books' sum is one byte add: the sum of
// every position fits int8 (layouts.vq_int8_codebooks), so |w| * sign(x, w) multiplies in vpmaddubsw
// without saturating (2 * 127 * 127 < 2^15). 1.10-1.24x the half-codebook tile on SmolLM2's shapes
// (Zen 3, two books, through the C entry point).

// One BMI1 bextr, in asm: under generic tuning GCC rewrites the intrinsic as a shift and a mask (or a
// high-byte move), the two uops this loop cannot spare.
template <int kByte>
inline uint64_t vq_code(uint64_t word) {
  static_assert(kByte < 8);
  constexpr uint64_t kControl = (8u << 8) | (8u * kByte);  // length 8, start
  uint64_t code;
  asm("bextr %2, %1, %0" : "=r"(code) : "r"(word), "r"(kControl));
  return code;
}

// Book kBook's codewords of 4 groups: groups 0 and 1 from the code bytes of `first`, groups 2 and 3
// from the same byte positions of `second` (the codes from byte 2 * kBooks on), so that only
// 2 * kBooks bit-field controls stay live.
template <int kBooks, int kBook>
inline __m256i vq_int8_codewords(const int8_t* book, uint64_t first, uint64_t second) {
  const auto at = [&](uint64_t code) { return reinterpret_cast<const double*>(book + code * 8); };
  const auto pair = [&](uint64_t word) {
    const __m128i low = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at(vq_code<kBook>(word))));
    return _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(low), at(vq_code<kBooks + kBook>(word))));
  };
  return _mm256_inserti128_si256(_mm256_castsi128_si256(pair(first)), pair(second), 1);
}

// The int32 partial sums of one row's 4 groups (codes at `row`) times x (32 int8 activations).
template <int kBooks>
inline __m256i vq_int8_step(const int8_t* const* book, const uint8_t* row, __m256i x) {
  uint64_t first = 0, second = 0;
  if constexpr (kBooks <= 2) {  // the 4 groups' codes in one word
    std::memcpy(&first, row, 4 * kBooks);
    second = first >> (16 * kBooks);
  } else {
    std::memcpy(&first, row, 2 * kBooks);
    std::memcpy(&second, row + 2 * kBooks, 2 * kBooks);
  }
  __m256i w = vq_int8_codewords<kBooks, 0>(book[0], first, second);
  if constexpr (kBooks > 1) w = _mm256_add_epi8(w, vq_int8_codewords<kBooks, 1>(book[1], first, second));
  if constexpr (kBooks > 2) w = _mm256_add_epi8(w, vq_int8_codewords<kBooks, 2>(book[2], first, second));
  if constexpr (kBooks > 3) w = _mm256_add_epi8(w, vq_int8_codewords<kBooks, 3>(book[3], first, second));
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// total[i] = sum over groups [0, groups) (a multiple of 4) of row i's weights (the books' int8 sum)
// times q, for the 4 rows whose codes start at codes + i * per_row. Four named accumulators: as an
// array GCC kept them on the stack, a store and a load on every step's dependency chain.
template <int kBooks>
inline void vq_int8_rows4_avx2(const int8_t* books, int64_t codewords, const uint8_t* codes, int64_t per_row, int64_t groups,
                               const int8_t* q, int32_t* total) {
  const int8_t* book[kBooks];
  for (int m = 0; m < kBooks; ++m) book[m] = books + m * codewords * 8;
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const bool prefetch = per_row >= 256;
  for (int64_t j = 0; j < groups; j += 4) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j * 8));
    const uint8_t* row = codes + j * kBooks;
    if (prefetch && (j * kBooks) % 64 < 4 * kBooks)
      for (int i = 4; i < 8; ++i) __builtin_prefetch(row + i * per_row);
    acc0 = _mm256_add_epi32(acc0, vq_int8_step<kBooks>(book, row, x));
    acc1 = _mm256_add_epi32(acc1, vq_int8_step<kBooks>(book, row + per_row, x));
    acc2 = _mm256_add_epi32(acc2, vq_int8_step<kBooks>(book, row + 2 * per_row, x));
    acc3 = _mm256_add_epi32(acc3, vq_int8_step<kBooks>(book, row + 3 * per_row, x));
  }
  total[0] = hsum_i32(acc0), total[1] = hsum_i32(acc1), total[2] = hsum_i32(acc2), total[3] = hsum_i32(acc3);
}
}  // namespace
}  // namespace secateurs
