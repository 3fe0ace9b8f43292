// AVX2 kernels of int8 buffers: 8 tokens per register, 4-way dot products by vpmaddubsw
// (unsigned activations x signed weights, pairs summed to int16) then vpmaddwd by ones
// (pairs summed to int32): exact, since 7-bit activations keep each int16 pair sum
// within 2 x 127 x 127 = 32258 (docs/kernels.md#int8-kernels). Also the quantizer of
// the AVX-512 VNNI table.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "spmm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace sparsecpu {
namespace kernels {
namespace {

#include "vec_avx2-inl.h"

struct IVec {
  using T = __m256i;
  static constexpr int64_t kWidth = 8;
  static T zero() { return _mm256_setzero_si256(); }
  static T set1(int32_t v) { return _mm256_set1_epi32(v); }
  static T load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void store(void* p, T v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static T load_first(const void* p, Vec::Mask m) { return _mm256_maskload_epi32(static_cast<const int*>(p), m); }
  static T add(T a, T b) { return _mm256_add_epi32(a, b); }
  static T sub(T a, T b) { return _mm256_sub_epi32(a, b); }
  static T mullo(T a, T b) { return _mm256_mullo_epi32(a, b); }
  static Vec::T to_float(T v) { return _mm256_cvtepi32_ps(v); }
  static T dot4(T acc, T x, T w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)));
  }
  static int32_t sum(T v) {
    const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const __m128i quarter = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
    return _mm_cvtsi128_si32(_mm_add_epi32(quarter, _mm_shuffle_epi32(quarter, 1)));
  }
  static T widen_bytes(const int8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static T gather(const uint8_t* base, const uint16_t* offsets, uint32_t mask) {
    const __m256i lanes = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(offsets))),
                                           _mm256_set1_epi32(static_cast<int32_t>(mask)));
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), lanes, 1);
  }
};

#include "spmm_qd8_simd-inl.h"

// quantize_activation on 8 lanes: the same float operations, lane by lane.
inline __m256i quantize8(__m256 x, __m256 inv_scale, __m256 zero_point) {
  __m256 v = _mm256_round_ps(_mm256_mul_ps(x, inv_scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_add_ps(v, zero_point);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(127.0f));  // a NaN becomes 0
  return _mm256_cvttps_epi32(v);
}

// Token t's range over its contiguous features [0, in_features), 8 at a time (a masked
// tail: zeros do not move a range that includes 0), as its TokenQuantization.
TokenQuantization quantize_contiguous_token(const float* row, int64_t in_features) {
  const int64_t full = in_features / 8 * 8;
  __m256 lowest = _mm256_setzero_ps(), highest = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  const auto take = [&](__m256 v) {
    lowest = _mm256_min_ps(v, lowest);  // a NaN lane keeps the second operand; `nan` sees it
    highest = _mm256_max_ps(v, highest);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  };
  for (int64_t i = 0; i < full; i += 8) take(_mm256_loadu_ps(row + i));
  if (full < in_features) take(_mm256_maskload_ps(row + full, Vec::first(static_cast<int>(in_features - full))));
  float lo[8], hi[8];
  _mm256_storeu_ps(lo, lowest);
  _mm256_storeu_ps(hi, highest);
  float low = 0.0f, high = 0.0f;
  for (int k = 0; k < 8; ++k) {
    low = lo[k] < low ? lo[k] : low;
    high = hi[k] > high ? hi[k] : high;
  }
  return quantize_token(low, high, _mm256_movemask_ps(nan) == 0);
}

// 4 features of 8 tokens (two per register, 4 lanes each) quantized into one 32-byte quad
// row: [t][4] bytes for t = 0..7. pairs[p] holds tokens 2p and 2p + 1's parameters.
inline __m256i quantize_quad_of_rows(const float* const rows[8], int64_t feature, const __m256 inv_scales[4],
                                     const __m256 zero_points[4]) {
  __m256i q[4];
  for (int p = 0; p < 4; ++p) {
    const __m256 v = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(rows[2 * p] + feature)),
                                          _mm_loadu_ps(rows[2 * p + 1] + feature), 1);
    q[p] = quantize8(v, inv_scales[p], zero_points[p]);
  }
  // packs: [t0, t2 | t1, t3] and [t4, t6 | t5, t7] (int16); packus: [t0, t2, t4, t6 | t1, t3, t5, t7] (bytes)
  const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Token-major input with contiguous features (a linear's x), 8 tokens at a time: their
// ranges, then their quads 4 features x 8 tokens per step while their rows are in cache.
// Tokens past the last 8, and the features of a last partial quad, one by one.
void quantize_token_major(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                          int64_t panel_width, const QuantizedPanel& panel) {
  const int64_t full_quads = in_features / 4;
  for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
    const int64_t group = std::min<int64_t>(8, tokens - t0);
    const float* rows[8];
    float inv[8], zero[8];
    for (int64_t k = 0; k < group; ++k) {
      rows[k] = x + (t0 + k) * token_stride;
      const TokenQuantization q = quantize_contiguous_token(rows[k], in_features);
      panel.scales[t0 + k] = q.scale;
      panel.zero_points[t0 + k] = q.zero_point;
      inv[k] = q.inv_scale;
      zero[k] = static_cast<float>(q.zero_point);
    }
    int64_t first_scalar_feature = 0;
    if (group == 8) {
      __m256 inv_scales[4], zero_points[4];
      for (int p = 0; p < 4; ++p) {
        inv_scales[p] = _mm256_setr_m128(_mm_set1_ps(inv[2 * p]), _mm_set1_ps(inv[2 * p + 1]));
        zero_points[p] = _mm256_setr_m128(_mm_set1_ps(zero[2 * p]), _mm_set1_ps(zero[2 * p + 1]));
      }
      for (int64_t q = 0; q < full_quads; ++q) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel.quads + (q * panel_width + t0) * 4),
                            quantize_quad_of_rows(rows, 4 * q, inv_scales, zero_points));
      }
      first_scalar_feature = full_quads * 4;
    }
    for (int64_t k = 0; k < group; ++k) {
      for (int64_t i = first_scalar_feature; i < in_features; ++i) {
        panel.quads[((i / 4) * panel_width + t0 + k) * 4 + i % 4] =
            static_cast<uint8_t>(quantize_activation(rows[k][i], inv[k], zero[k]));
      }
    }
  }
}

// Feature-major input (a convolution's pixels, a chain's intermediate tile): each token's
// range 8 tokens at a time down the features, then 4 features x 8 tokens per step,
// transposed in registers into [t][4] bytes. A last partial group of tokens is masked.
void quantize_feature_major(const float* x, int64_t tokens, int64_t in_features, int64_t feature_stride,
                            int64_t panel_width, const QuantizedPanel& panel) {
  const int64_t full_quads = in_features / 4;
  // Within each 128-bit lane: bytes [c][t] (4 features x 4 tokens) to [t][c].
  const __m256i transpose = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5,
                                             9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
    const int group = static_cast<int>(std::min<int64_t>(8, tokens - t0));
    const Vec::Mask lanes = Vec::first(group);
    const auto load = [&](int64_t feature) { return _mm256_maskload_ps(x + feature * feature_stride + t0, lanes); };
    __m256 lowest = _mm256_setzero_ps(), highest = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < in_features; ++i) {
      const __m256 v = load(i);
      lowest = _mm256_min_ps(v, lowest);
      highest = _mm256_max_ps(v, highest);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lo[8], hi[8], inv[8] = {}, zero[8] = {};
    _mm256_storeu_ps(lo, lowest);
    _mm256_storeu_ps(hi, highest);
    const int nan_lanes = _mm256_movemask_ps(nan);
    for (int k = 0; k < group; ++k) {
      const TokenQuantization q = quantize_token(lo[k], hi[k], (nan_lanes >> k & 1) == 0);
      panel.scales[t0 + k] = q.scale;
      panel.zero_points[t0 + k] = q.zero_point;
      inv[k] = q.inv_scale;
      zero[k] = static_cast<float>(q.zero_point);
    }
    const __m256 inv_scales = _mm256_loadu_ps(inv), zero_points = _mm256_loadu_ps(zero);
    for (int64_t q = 0; q < full_quads; ++q) {
      __m256i features[4];
      for (int c = 0; c < 4; ++c) features[c] = quantize8(load(4 * q + c), inv_scales, zero_points);
      // packs + packus: [f0 t0-3, f1 t0-3, f2 t0-3, f3 t0-3 | the same for t4-7] (bytes)
      const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(features[0], features[1]),
                                                _mm256_packs_epi32(features[2], features[3]));
      // Padding tokens of a partial group quantize their (masked) zeros with zero point 0: to 0.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel.quads + (q * panel_width + t0) * 4),
                          _mm256_shuffle_epi8(bytes, transpose));
    }
    for (int k = 0; k < group; ++k) {
      for (int64_t i = full_quads * 4; i < in_features; ++i) {
        panel.quads[((i / 4) * panel_width + t0 + k) * 4 + i % 4] =
            static_cast<uint8_t>(quantize_activation(x[i * feature_stride + t0 + k], inv[k], zero[k]));
      }
    }
  }
}

}  // namespace

// The layouts of a linear's and a convolution's input by registers; any other by the
// scalar quantizer (the same integers). Padding tokens and the last quad's missing
// features are zeroed first (a panel of whole groups of 8 tokens and quads needs none).
void quantize_panel_avx2(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                         int64_t feature_stride, int64_t panel_width, const QuantizedPanel& panel) {
  // The feature-major steps store 8 tokens at a time: whole groups of 8 (not a GEMV panel).
  if ((feature_stride != 1 && token_stride != 1) || (feature_stride != 1 && panel_width % 8 != 0)) {
    return quantize_panel_scalar(x, tokens, in_features, token_stride, feature_stride, panel_width, panel);
  }
  const int64_t quads = (in_features + 3) / 4;
  if (tokens % 8 != 0 || tokens < panel_width || in_features % 4 != 0) {
    std::memset(panel.quads, 0, static_cast<size_t>(quads * panel_width * 4));
  }
  for (int64_t t = tokens; t < panel_width; ++t) {
    panel.scales[t] = 0.0f;
    panel.zero_points[t] = 0;
  }
  if (feature_stride == 1) {
    quantize_token_major(x, tokens, in_features, token_stride, panel_width, panel);
  } else {
    quantize_feature_major(x, tokens, in_features, feature_stride, panel_width, panel);
  }
}

}  // namespace kernels
}  // namespace sparsecpu

#pragma GCC pop_options

namespace sparsecpu {
namespace kernels {
const Qd8Kernels kQd8Avx2 = {"avx2", IVec::kWidth, IVec::kWidth * kMaxTileVectors, &quantize_panel_avx2,
                             &spmm_qd8_row_block_simd, &spmv_qd8_row_block_simd, &unpack_tile_avx2};
}  // namespace kernels
}  // namespace sparsecpu
