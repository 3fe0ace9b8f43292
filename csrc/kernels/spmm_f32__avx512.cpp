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

#include "vec_avx512-inl.h"

#include "spmm_f32_simd-inl.h"

}  // namespace
}  // namespace kernels
}  // namespace sparsecpu

#pragma GCC pop_options

namespace sparsecpu {
namespace kernels {
const SpmmKernels kSpmmAvx512 = {"avx512", Vec::kWidth, Vec::kWidth * kMaxTileVectors,
                                 &pack_panel_avx2, &spmm_row_block_simd, &spmv_row_block_simd,
                                 &unpack_tile_avx2, &depthwise_row_simd, &residual_row_simd,
                                 &copy_row_simd, &copy_rows_simd};
}  // namespace kernels
}  // namespace sparsecpu
