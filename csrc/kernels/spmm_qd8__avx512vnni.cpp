// AVX-512 VNNI kernels of int8 buffers: 16 tokens per register, 4-way dot products by
// vpdpbusd (unsigned activations x signed weights, summed into int32 in one instruction,
// without saturation). The panel quantizer and the tile copy are the AVX2 ones. Run by
// the avx512 ISA where the CPU has AVX512-VNNI (lists.h).
// GCC 12's AVX-512 headers warn about their own _mm512_undefined_ps() once inlined
// (GCC bug 105593, see spmm_f32__avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "spmm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,fma")

namespace sparsecpu {
namespace kernels {
namespace {

#include "vec_avx512-inl.h"

struct IVec {
  using T = __m512i;
  static constexpr int64_t kWidth = 16;
  static T zero() { return _mm512_setzero_si512(); }
  static T set1(int32_t v) { return _mm512_set1_epi32(v); }
  static T load(const void* p) { return _mm512_loadu_si512(p); }
  static void store(void* p, T v) { _mm512_storeu_si512(p, v); }
  static T load_first(const void* p, Vec::Mask m) { return _mm512_maskz_loadu_epi32(m, p); }
  static T add(T a, T b) { return _mm512_add_epi32(a, b); }
  static T sub(T a, T b) { return _mm512_sub_epi32(a, b); }
  static T mullo(T a, T b) { return _mm512_mullo_epi32(a, b); }
  static Vec::T to_float(T v) { return _mm512_cvtepi32_ps(v); }
  static T dot4(T acc, T x, T w) { return _mm512_dpbusd_epi32(acc, x, w); }
};

#include "spmm_qd8_simd-inl.h"

}  // namespace
}  // namespace kernels
}  // namespace sparsecpu

#pragma GCC pop_options

namespace sparsecpu {
namespace kernels {
const Qd8Kernels kQd8Avx512Vnni = {"avx512vnni", IVec::kWidth, IVec::kWidth * kMaxTileVectors, &quantize_panel_avx2,
                                   &spmm_qd8_row_block_simd, &spmv_qd8_row_block_simd, &unpack_tile_avx2};
}  // namespace kernels
}  // namespace sparsecpu
