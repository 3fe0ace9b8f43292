// Scalar reference kernels: the same packed layout and panel contract as the SIMD
// kernels, written plainly. Always available; the tests hold every ISA to it.
#include <algorithm>
#include <cmath>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {
namespace {

float activate_none(float x) { return x; }
float activate_relu(float x) { return x < 0.0f ? 0.0f : x; }  // NaN stays NaN, as in F.relu
float activate_gelu(float x) { return 0.5f * x * std::erfc(-x * 0.70710678118654752f); }
float activate_gelu_tanh(float x) {
  return x / (1.0f + std::exp(-2.0f * 0.79788456080286536f * (x + 0.044715f * x * x * x)));
}
float activate_silu(float x) { return x / (1.0f + std::exp(-x)); }
float activate_relu6(float x) { return x < 0.0f ? 0.0f : (x > 6.0f ? 6.0f : x); }
float activate_hardswish(float x) { return x * std::min(std::max(x + 3.0f, 0.0f), 6.0f) / 6.0f; }

void spmm_row_block_scalar(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                           const float* panel, int64_t panel_width, const float* bias, Activation act,
                           float* tile) {
  const int64_t rows = w.rows_in_block(rb), groups = w.segments_in_block(rb);
  // Segments and offsets bounded as in the SIMD kernels (PackedLinearView in spmm.h).
  const uint32_t last_row = static_cast<uint32_t>(rows - w.block_rows);
  if (kb_begin == 0) fill_tile_with_bias(w, rb, bias, panel_width, tile);
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t feature_stride = w.feature_stride != 0 ? w.feature_stride : panel_width;
    const float* panel_kb = panel + kb * w.k_block * feature_stride;  // this K-block's features
    for (int64_t s = w.segment(rb, kb, 0); s < w.segment(rb, kb, 0) + groups; ++s) {
      const int32_t begin = clamp_index(w.seg_ptr[s], w.blocks), end = clamp_index(w.seg_ptr[s + 1], w.blocks);
      for (int64_t m = 0; m < w.block_rows; ++m) {  // each row of the segment's row group
        float* out = tile + (clamp_index(w.seg_rows[s], last_row) + m) * panel_width;
        for (int32_t j = begin; j < end; ++j) {
          const float value = w.values[j * w.block_rows + m];
          const float* x = panel_kb + (w.offsets[j] & w.offset_mask) * feature_stride;
          for (int64_t t = 0; t < panel_width; ++t) out[t] += value * x[t];
        }
      }
    }
  }
  if (kb_end == w.num_k_blocks) {
    for (int64_t i = 0; i < rows * panel_width; ++i) tile[i] = activate_scalar(tile[i], act);
  }
}

}  // namespace

float activate_scalar(float x, Activation act) {
  SPARSECPU_RETURN_ACTIVATED(act, x);
}

void depthwise_row_scalar(const float* const* taps, const float* w, int64_t num_taps, float bias,
                          Activation act, int64_t count, float* out) {
  for (int64_t x = 0; x < count; ++x) {
    float sum = bias;
    for (int64_t t = 0; t < num_taps; ++t) sum += w[t] * taps[t][x];
    out[x] = activate_scalar(sum, act);
  }
}

void residual_row_scalar(const float* a, const float* b, Activation act, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = activate_scalar(a[i] + b[i], act);
}

void copy_row_scalar(const float* from, int64_t step, int64_t count, float* to) {
  for (int64_t i = 0; i < count; ++i) to[i] = from[i * step];
}

void copy_rows_scalar(const float* from, int64_t from_pitch, int64_t step, int64_t count, int64_t rows, float* to,
                      int64_t to_pitch) {
  for (int64_t r = 0; r < rows; ++r) copy_row_scalar(from + r * from_pitch, step, count, to + r * to_pitch);
}

void pack_panel_scalar(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                       int64_t feature_stride, int64_t panel_width, float* panel) {
  for (int64_t i = 0; i < in_features; ++i) {
    for (int64_t t = 0; t < panel_width; ++t) {
      panel[i * panel_width + t] = t < tokens ? x[t * token_stride + i * feature_stride] : 0.0f;
    }
  }
}

void unpack_tile_scalar(const float* tile, int64_t rows, int64_t panel_width, int64_t tokens,
                        float* y, int64_t y_stride) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t o = 0; o < rows; ++o) y[t * y_stride + o] = tile[o * panel_width + t];
  }
}

const SpmmKernels kSpmmScalar = {"scalar", 1, 64, &pack_panel_scalar, &spmm_row_block_scalar,
                                 &spmm_row_block_scalar, &unpack_tile_scalar, &depthwise_row_scalar,
                                 &residual_row_scalar, &copy_row_scalar, &copy_rows_scalar};

}  // namespace kernels
}  // namespace sparsecpu
