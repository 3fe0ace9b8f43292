// Scalar reference kernels of int8 buffers: the same packed layout, quantized panel and
// integers as the SIMD kernels, written plainly. Always available; the tests hold every
// ISA to the integer reference these compute.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {
namespace {

// a + b * c modulo 2^32: the int32 arithmetic of the SIMD kernels (which wraps), without
// the undefined behaviour of a signed overflow, which only a corrupted buffer could cause.
inline int32_t wrapping_madd(int32_t a, int32_t b, int32_t c) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b) * static_cast<uint32_t>(c));
}

void spmm_qd8_row_block_scalar(const PackedLinearView& w, int64_t rb, int64_t kb_begin, int64_t kb_end,
                               const QuantizedPanel& panel, int64_t panel_width, const float* bias, Activation act,
                               float* tile) {
  const int64_t rows = w.rows_in_block(rb), first_row = rb * w.row_block;
  int32_t* sums = reinterpret_cast<int32_t*>(tile);  // int32 partial sums until the last K-block
  // Segments and offsets bounded as in the SIMD kernels (PackedLinearView in spmm.h).
  const uint32_t last_row = static_cast<uint32_t>(rows - 1);
  if (kb_begin == 0) std::fill(sums, sums + rows * panel_width, 0);
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const uint8_t* quads_kb = panel.quads + kb * w.k_block * panel_width;  // this K-block's quads
    for (int64_t s = w.segment(rb, kb, 0); s < w.segment(rb, kb, 0) + w.segments_in_block(rb); ++s) {
      const int32_t begin = clamp_index(w.seg_ptr[s], w.blocks), end = clamp_index(w.seg_ptr[s + 1], w.blocks);
      int32_t* out = sums + clamp_index(w.seg_rows[s], last_row) * panel_width;
      for (int32_t j = begin; j < end; ++j) {
        const int64_t offset = w.offsets[j] & w.offset_mask;
        // Feature `offset + c` of the block: byte (offset + c) % 4 of quad offset / 4 (a
        // 1 x 4 block starts a quad).
        for (int64_t c = 0; c < w.block_cols; ++c) {
          const int32_t value = w.int8_values[j * w.block_cols + c];
          const uint8_t* x = quads_kb + (offset / 4) * 4 * panel_width + (offset + c) % 4;
          for (int64_t t = 0; t < panel_width; ++t) out[t] = wrapping_madd(out[t], value, x[4 * t]);
        }
      }
    }
  }
  if (kb_end != w.num_k_blocks) return;
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale = w.row_scales[first_row + r], b = bias != nullptr ? bias[first_row + r] : 0.0f;
    const int32_t row_wsum = w.row_wsums[first_row + r];
    for (int64_t t = 0; t < panel_width; ++t) {
      const int32_t acc = wrapping_madd(sums[r * panel_width + t], -panel.zero_points[t], row_wsum);
      const float y = std::fma(row_scale * panel.scales[t], static_cast<float>(acc), b);
      tile[r * panel_width + t] = activate_scalar(y, act);
    }
  }
}

}  // namespace

// Any strides: each token's range, then its quantized values quad by quad.
void quantize_panel_scalar(const float* x, int64_t tokens, int64_t in_features, int64_t token_stride,
                           int64_t feature_stride, int64_t panel_width, const QuantizedPanel& panel) {
  const int64_t quads = (in_features + kWideBlockCols - 1) / kWideBlockCols;
  std::memset(panel.quads, 0, static_cast<size_t>(quads * panel_width * kWideBlockCols));
  for (int64_t t = 0; t < panel_width; ++t) {
    if (t >= tokens) {
      panel.scales[t] = 0.0f;
      panel.zero_points[t] = 0;
      continue;
    }
    const float* row = x + t * token_stride;
    float lowest = 0.0f, highest = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < in_features; ++i) {
      const float v = row[i * feature_stride];
      lowest = v < lowest ? v : lowest;
      highest = v > highest ? v : highest;
      finite = finite && v == v;  // a NaN; infinities make the range infinite
    }
    const TokenQuantization q = quantize_token(lowest, highest, finite);
    panel.scales[t] = q.scale;
    panel.zero_points[t] = q.zero_point;
    for (int64_t i = 0; i < in_features; ++i) {
      panel.quads[((i / 4) * panel_width + t) * 4 + i % 4] =
          static_cast<uint8_t>(quantize_activation(row[i * feature_stride], q.inv_scale, static_cast<float>(q.zero_point)));
    }
  }
}

const Qd8Kernels kQd8Scalar = {"scalar", 1, 64, &quantize_panel_scalar, &spmm_qd8_row_block_scalar,
                               &spmm_qd8_row_block_scalar, &unpack_tile_scalar};

}  // namespace kernels
}  // namespace sparsecpu
