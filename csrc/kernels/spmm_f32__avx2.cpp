// AVX2 + FMA kernels: 8 floats per register, register tiles of 1 row x 8..64 tokens.
#include <immintrin.h>

#include "spmm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace sparsecpu {
namespace kernels {
namespace {

struct Vec {
  using T = __m256;
  static constexpr int64_t kWidth = 8;
  static constexpr int kMaxVectors = 8;  // 8 accumulators hide the FMA latency
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T and_(T a, T b) { return _mm256_and_ps(a, b); }
  static T xor_(T a, T b) { return _mm256_xor_ps(a, b); }
  static T floor(T a) { return _mm256_floor_ps(a); }
  static T pow2(T n) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
};

#include "spmm_f32_simd-inl.h"

}  // namespace
}  // namespace kernels
}  // namespace sparsecpu

#pragma GCC pop_options

namespace sparsecpu {
namespace kernels {
const SpmmKernels kSpmmAvx2 = {"avx2", Vec::kWidth, Vec::kWidth * Vec::kMaxVectors,
                               &pack_panel_simd, &spmm_row_block_simd};
}  // namespace kernels
}  // namespace sparsecpu
