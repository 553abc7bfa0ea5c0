// The inner loop of the OBS column sweep (secateurs/algorithms/obs.py) over a span of columns
// that share one mask decision and one quantization grid. In Python every column costs about ten
// tensor operations (~70 us of dispatch) for a few microseconds of arithmetic; here a span of a
// 128-column block is one call.
//
// Layout: the block is W^T, [size, rows] row-major, so column i of W is the contiguous row i.
// For each column i in [begin, end): q = round-to-grid(w_i) (with a grid), q = 0 where not kept
// (with a mask), e_i = (w_i - q) / U[i, i], w_k -= U[i, k] * e_i for every later column k of the
// block, w_i = q. Rows are independent, so OpenMP threads take contiguous row ranges.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace secateurs {
namespace {

struct SpanArgs {
  int64_t rows, size, begin, end, hinv_stride;
  const uint8_t* keep;  // [end - begin, rows] or null
  int64_t max_code;
};

template <class T>
void sweep_rows(const SpanArgs& a, T* block, T* errors, const T* hinv, const T* scale, const T* zero, int64_t r0,
                int64_t r1) {
  const T max_code = static_cast<T>(a.max_code);
  for (int64_t i = a.begin; i < a.end; ++i) {
    T* w = block + i * a.rows;
    T* e = errors + i * a.rows;
    const T* u = hinv + i * a.hinv_stride;
    const uint8_t* keep = a.keep ? a.keep + (i - a.begin) * a.rows : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      T q = w[r];
      if (scale) {  // as fake_quantize: scale * (clamp(round(w / scale + zero), 0, max) - zero)
        const T code = std::min(std::max(std::nearbyint(q / scale[r] + zero[r]), T(0)), max_code);
        q = scale[r] * (code - zero[r]);
      }
      if (keep && !keep[r]) q = T(0);
      e[r] = (w[r] - q) / u[i];
      w[r] = q;
    }
    for (int64_t k = i + 1; k < a.size; ++k) {
      const T h = u[k];
      T* later = block + k * a.rows;
      for (int64_t r = r0; r < r1; ++r) later[r] -= h * e[r];
    }
  }
}

template <class T>
void sweep(const SpanArgs& a, int threads, void* block, void* errors, const void* hinv, const void* scale,
           const void* zero) {
  // A thread needs a few hundred thousand multiply-adds to be worth waking.
  const int64_t work = a.rows * (a.end - a.begin) * (a.size - a.begin);
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, work / (1 << 18) + 1)));
#pragma omp parallel num_threads(threads)
  {
    const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
    // Row ranges on 16-element boundaries keep each thread's rows in its own cache lines.
    const int64_t chunks = (a.rows + 15) / 16;
    const int64_t r0 = std::min(a.rows, chunks * part / parts * 16), r1 = std::min(a.rows, chunks * (part + 1) / parts * 16);
    sweep_rows<T>(a, static_cast<T*>(block), static_cast<T*>(errors), static_cast<const T*>(hinv),
                  static_cast<const T*>(scale), static_cast<const T*>(zero), r0, r1);
  }
}

}  // namespace
}  // namespace secateurs

extern "C" __attribute__((visibility("default"))) int secateurs_obs_span(
    int threads, int type, void* block, void* errors, const void* hinv, int64_t hinv_stride, int64_t rows,
    int64_t size, int64_t begin, int64_t end, const uint8_t* keep, const void* scale, const void* zero,
    int64_t max_code) {
  using namespace secateurs;
  const bool ok = (type == 0 || type == 1) && rows >= 0 && 0 <= begin && begin <= end && end <= size &&
                  hinv_stride >= size && (scale == nullptr) == (zero == nullptr) && max_code >= 1;
  if (!ok) return kInvalidArgument;
  const SpanArgs args{rows, size, begin, end, hinv_stride, keep, max_code};
  if (type == 0)
    sweep<float>(args, threads, block, errors, hinv, scale, zero);
  else
    sweep<double>(args, threads, block, errors, hinv, scale, zero);
  return kOk;
}
