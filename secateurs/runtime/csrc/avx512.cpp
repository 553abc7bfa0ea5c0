// AVX-512F path (16 floats per vector): expanding a chunk's kept values is one vexpandps, packing
// the kept column offsets (batch > 1) one vcompressps and the N:M gather one vpermt2ps.
// Only AVX-512F instructions (and AVX2 ones) are used: what the dispatcher checks for.
#include <immintrin.h>

#include "kernels.h"

#pragma GCC target("avx512f,avx2,fma,f16c,popcnt,bmi,bmi2")

#include "avx2_int16.h"

#include "avx512_simd.h"

namespace secateurs {
namespace {

using Simd = Simd512;

}  // namespace
}  // namespace secateurs

#include "row_kernels.h"

namespace secateurs {
const KernelTable& avx512_kernels() { return kTable; }
}  // namespace secateurs
