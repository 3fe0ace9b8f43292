// AVX-512 kernels: 16 floats per register, register tiles of 1 row x 16..128 tokens.
// GCC 12's AVX-512 headers warn, once inlined at -O3, that their own
// _mm512_undefined_ps() "may be used uninitialized" (GCC bug 105593, fixed in GCC 13).
// The same kernel template compiled for AVX2 keeps the warning.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "spmm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")

namespace sparsecpu {
namespace kernels {
namespace {

struct Vec {
  using T = __m512;
  static constexpr int64_t kWidth = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T xor_(T a, T b) { return _mm512_xor_ps(a, b); }
  static T floor(T a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static T pow2(T n) {
    const __m512i biased = _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  // The first n lanes (masked lanes are neither read nor written).
  using Mask = __mmask16;
  static Mask first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static T load_first(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store_first(float* p, T v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
};

#include "spmm_f32_simd-inl.h"

}  // namespace
}  // namespace kernels
}  // namespace sparsecpu

#pragma GCC pop_options

namespace sparsecpu {
namespace kernels {
const SpmmKernels kSpmmAvx512 = {"avx512", Vec::kWidth, Vec::kWidth * kMaxTileVectors,
                                 &pack_panel_avx2, &spmm_row_block_simd, &spmv_row_block_simd,
                                 &unpack_tile_avx2};
}  // namespace kernels
}  // namespace sparsecpu
