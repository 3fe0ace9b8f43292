// AVX2 + FMA kernels: 8 floats per register, register tiles of 1 row x 8..64 tokens.
#include <immintrin.h>

#include "spmm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace sparsecpu {
namespace kernels {
namespace {

#include "vec_avx2-inl.h"

#include "spmm_f32_simd-inl.h"

// rows[i] holds 8 floats; on return rows[i] holds column i (an 8x8 transpose).
inline void transpose8x8(__m256 rows[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(rows[0], rows[1]), t1 = _mm256_unpackhi_ps(rows[0], rows[1]);
  const __m256 t2 = _mm256_unpacklo_ps(rows[2], rows[3]), t3 = _mm256_unpackhi_ps(rows[2], rows[3]);
  const __m256 t4 = _mm256_unpacklo_ps(rows[4], rows[5]), t5 = _mm256_unpackhi_ps(rows[4], rows[5]);
  const __m256 t6 = _mm256_unpacklo_ps(rows[6], rows[7]), t7 = _mm256_unpackhi_ps(rows[6], rows[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  rows[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  rows[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  rows[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  rows[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  rows[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  rows[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  rows[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  rows[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Any strides and token counts, zero-padding tokens >= `tokens`.
void pack_panel_any(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                    int64_t feature_stride, int64_t panel_width, float* panel) {
  if (token_stride == 1) {  // feature-major already (NCHW pixels): row copies
    for (int64_t i = 0; i < in_features; ++i) {
      const float* src = x + i * feature_stride;
      float* dst = panel + i * panel_width;
      for (int64_t t = 0; t < tokens; ++t) dst[t] = src[t];
      for (int64_t t = tokens; t < panel_width; ++t) dst[t] = 0.0f;
    }
    return;
  }
  for (int64_t t = 0; t < tokens; ++t) {
    const float* src = x + t * token_stride;
    for (int64_t i = 0; i < in_features; ++i) panel[i * panel_width + t] = src[i * feature_stride];
  }
  for (int64_t i = 0; i < in_features; ++i) {
    for (int64_t t = tokens; t < panel_width; ++t) panel[i * panel_width + t] = 0.0f;
  }
}

}  // namespace

// Token-major x -> feature-major panel, 8x8 blocks at a time when features are contiguous.
void pack_panel_avx2(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                     int64_t feature_stride, int64_t panel_width, float* panel) {
  if (feature_stride != 1 || tokens != panel_width || tokens % 8 != 0) {
    return pack_panel_any(x, tokens, in_features, token_stride, feature_stride, panel_width, panel);
  }
  const int64_t full = in_features / 8 * 8;
  for (int64_t t = 0; t < tokens; t += 8) {
    for (int64_t i = 0; i < full; i += 8) {
      __m256 block[8];
      for (int k = 0; k < 8; ++k) block[k] = _mm256_loadu_ps(x + (t + k) * token_stride + i);
      transpose8x8(block);
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(panel + (i + k) * panel_width + t, block[k]);
    }
    for (int64_t i = full; i < in_features; ++i) {
      for (int64_t k = 0; k < 8; ++k) panel[i * panel_width + t + k] = x[(t + k) * token_stride + i];
    }
  }
}

// Tile -> token-major y, 8 tokens x 8 output rows at a time. Tokens outside: the
// 8 rows of y being written get whole cache lines in turn (y's rows are often a
// multiple of 4 KiB apart and share cache sets).
void unpack_tile_avx2(const float* tile, int64_t rows, int64_t panel_width, int64_t tokens,
                      float* y, int64_t y_stride) {
  const int64_t full_rows = rows / 8 * 8, full_tokens = tokens / 8 * 8;
  for (int64_t t = 0; t < full_tokens; t += 8) {
    for (int64_t o = 0; o < full_rows; o += 8) {
      __m256 block[8];
      for (int k = 0; k < 8; ++k) block[k] = _mm256_loadu_ps(tile + (o + k) * panel_width + t);
      transpose8x8(block);
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(y + (t + k) * y_stride + o, block[k]);
    }
  }
  for (int64_t t = 0; t < tokens; ++t) {  // the edges
    const int64_t first_row = t < full_tokens ? full_rows : 0;
    for (int64_t o = first_row; o < rows; ++o) y[t * y_stride + o] = tile[o * panel_width + t];
  }
}

}  // namespace kernels
}  // namespace sparsecpu

#pragma GCC pop_options

namespace sparsecpu {
namespace kernels {
const SpmmKernels kSpmmAvx2 = {"avx2", Vec::kWidth, Vec::kWidth * kMaxTileVectors,
                               &pack_panel_avx2, &spmm_row_block_simd, &spmv_row_block_simd,
                               &unpack_tile_avx2, &depthwise_row_simd, &residual_row_simd,
                               &copy_row_simd, &copy_rows_simd};
}  // namespace kernels
}  // namespace sparsecpu
