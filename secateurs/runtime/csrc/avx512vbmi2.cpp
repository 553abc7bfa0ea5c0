// AVX-512 with BW, VL and VBMI2 (Ice Lake and later, Zen 4 and 5): the avx512 path, with int8
// values under a bitmask expanded by one vpexpandb per 32 columns (a masked expand-load that
// reads only the kept bytes) and multiplied with the int16 activations on 512-bit vpmaddwd,
// instead of the AVX2 path's pshufb table on two 256-bit halves; dense int8 codes take the
// 512-bit vpmaddwd too. With VNNI (every CPU with VBMI2 has it), int8 activations times int8 blocks
// of weights on vpdpbusd (int8_blocks_rows, below). Everything else is the avx512 path's.
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,avx2,fma,f16c,popcnt,bmi,bmi2")

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

#define SECATEURS_INT8_BLOCKS
#include "row_kernels.h"

namespace secateurs {
namespace {

constexpr int64_t kBlockBytes = kInt8Tile * 4;  // one block of a tile: [token][4 columns] bytes

// The lanes of the 16 columns from j that exist (j < cols).
inline __mmask16 columns_from(int64_t j, int64_t cols) {
  return cols - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (cols - j)) - 1);
}

// Tokens [token0, token0 + lanes) of x as a tile of unsigned bytes, [group][kInt8Tile][4] (q + 128;
// missing tokens and columns past `cols` are q = 0), and each token's scale (0 past `lanes`).
// False when a token holds a NaN or an infinity. 16 tokens x 16 columns at a time: each token's 16
// bytes (4 groups) into one 128-bit lane, then a 16 x 4 transpose of 32-bit words gives each group's
// 16 tokens as one 64-byte store (storing every token's 4 bytes on their own cost 3x the time).
bool quantize_tile(const Activations& x, int64_t cols, int64_t token0, int64_t lanes, uint8_t* tile, float* scale) {
  const int64_t groups = (cols + 3) / 4;
  alignas(64) float inverse[kInt8Tile];
  bool finite = true;
  for (int64_t lane = 0; lane < kInt8Tile; ++lane) {
    scale[lane] = inverse[lane] = 0.0f;
    if (lane >= lanes) continue;
    const float* row = x.rows + (token0 + lane) * x.row_stride;
    __m512 largest = _mm512_setzero_ps(), poison = _mm512_setzero_ps();  // poison: x * 0 is NaN only for NaN / inf
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 live = columns_from(j, cols);
      const __m512 v = _mm512_maskz_loadu_ps(live, row + j);
      largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
      poison = _mm512_add_ps(poison, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    const float amax = _mm512_reduce_max_ps(largest);
    if (_mm512_reduce_add_ps(poison) != 0.0f || !(amax <= 3.0e38f)) {
      finite = false;  // q = 0 and scale 0: the caller recomputes this token in float32
      continue;
    }
    const bool zero = amax < 1e-30f;  // below it a token rounds to zero: its inverse scale would overflow
    scale[lane] = zero ? 0.0f : amax / 127.0f;
    inverse[lane] = zero ? 0.0f : 127.0f / amax;
  }
  const __m512i within = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t t0 = 0; t0 < kInt8Tile; t0 += 16) {
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 live = columns_from(j, cols);
      __m512i words[4];  // words[k]: tokens t0 + 4k .. + 3, a 128-bit lane each (their 4 groups' bytes)
      for (int k = 0; k < 4; ++k) {
        __m512i packed = _mm512_setzero_si512();
        for (int i = 0; i < 4; ++i) {
          const int64_t lane = t0 + 4 * k + i;
          // round to nearest even (the default MXCSR), as torch.round does; missing tokens are q = 0
          const __m512 v = lane < lanes ? _mm512_maskz_loadu_ps(live, x.rows + (token0 + lane) * x.row_stride + j)
                                        : _mm512_setzero_ps();
          const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inverse[lane]))),
                                             _mm512_set1_epi32(128));
          packed = _mm512_inserti32x4(packed, _mm512_cvtepi32_epi8(q), i);
        }
        words[k] = _mm512_permutexvar_epi32(within, packed);  // lane g: group g of the 4 tokens
      }
      const __m512i low01 = _mm512_shuffle_i32x4(words[0], words[1], 0x44), high01 = _mm512_shuffle_i32x4(words[0], words[1], 0xEE);
      const __m512i low23 = _mm512_shuffle_i32x4(words[2], words[3], 0x44), high23 = _mm512_shuffle_i32x4(words[2], words[3], 0xEE);
      const __m512i group[4] = {_mm512_shuffle_i32x4(low01, low23, 0x88), _mm512_shuffle_i32x4(low01, low23, 0xDD),
                                _mm512_shuffle_i32x4(high01, high23, 0x88), _mm512_shuffle_i32x4(high01, high23, 0xDD)};
      for (int64_t g = 0; g < 4 && j / 4 + g < groups; ++g)
        _mm512_store_si512(tile + (j / 4 + g) * kBlockBytes + t0 * 4, group[g]);
    }
  }
  return finite;
}

}  // namespace

// Each tile of 64 tokens is quantized once per thread and stays in L1 for every row of the range up
// to ~190 columns of groups (48 KiB), in L2 beyond; a block costs one broadcast and four vpdpbusd
// (64 tokens x 4 columns) against four loads, where the fp32 bitmask kernel spends four FMAs and four
// loads on each single weight, from a tile four times the bytes.
void int8_blocks_rows(const Int8BlockArgs& a, int64_t row_begin, int64_t row_end, float*) {
  constexpr int kChains = 3, kVecs = kInt8Tile / 16;
  const int64_t groups = (a.cols + 3) / 4, range = row_end - row_begin;
  const Buffer tile_storage = zeroed_floats(groups * kBlockBytes / 4 + 16), out = zeroed_floats(range * kInt8Tile);
  uint8_t* tile = reinterpret_cast<uint8_t*>(tile_storage.get());
  alignas(64) float scale[kInt8Tile];
  for (int64_t token0 = 0; token0 < a.x.batch; token0 += kInt8Tile) {
    const int64_t lanes = std::min(kInt8Tile, a.x.batch - token0);
    if (!quantize_tile(a.x, a.cols, token0, lanes, tile, scale)) __atomic_store_n(a.nonfinite, 1, __ATOMIC_RELAXED);
    for (int64_t r = row_begin; r < row_end; ++r) {
      __m512i acc[kChains][kVecs];
      for (auto& chain : acc)
        for (__m512i& v : chain) v = _mm512_setzero_si512();
      const int64_t end = a.block_offsets[r + 1];
      int64_t k = a.block_offsets[r];
      for (; k + kChains <= end; k += kChains)
        for (int c = 0; c < kChains; ++c) {
          const __m512i weights = _mm512_set1_epi32(a.codes[k + c]);
          const uint8_t* block = tile + static_cast<int64_t>(a.groups[k + c]) * kBlockBytes;
          for (int v = 0; v < kVecs; ++v)
            acc[c][v] = _mm512_dpbusd_epi32(acc[c][v], _mm512_load_si512(block + 64 * v), weights);
        }
      for (; k < end; ++k) {
        const __m512i weights = _mm512_set1_epi32(a.codes[k]);
        const uint8_t* block = tile + static_cast<int64_t>(a.groups[k]) * kBlockBytes;
        for (int v = 0; v < kVecs; ++v) acc[0][v] = _mm512_dpbusd_epi32(acc[0][v], _mm512_load_si512(block + 64 * v), weights);
      }
      const __m512i offset = _mm512_set1_epi32(128 * a.code_sums[r]);
      const __m512 row_scale = _mm512_set1_ps(a.row_scale[r]);
      float* lanes_out = out.get() + (r - row_begin) * kInt8Tile;
      for (int v = 0; v < kVecs; ++v) {
        __m512i total = acc[0][v];
        for (int c = 1; c < kChains; ++c) total = _mm512_add_epi32(total, acc[c][v]);
        const __m512 factor = _mm512_mul_ps(_mm512_load_ps(scale + 16 * v), row_scale);
        _mm512_store_ps(lanes_out + 16 * v, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(total, offset)), factor));
      }
      bias_activation(lanes_out, lanes, a.bias ? a.bias + r : nullptr, 0, a.activation);
    }
    transpose(out.get(), kInt8Tile, range, lanes, a.y + token0 * a.rows + row_begin, a.rows);
  }
}

const KernelTable& avx512vbmi2_kernels() { return kTable; }
}  // namespace secateurs
