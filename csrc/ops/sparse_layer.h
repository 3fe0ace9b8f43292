// One sparse layer over tokens, split over torch's threads (sparse_layer.cpp), and the
// building blocks linear_chain.cpp reuses. The kernel table `k` (fp32 buffers) or `qk`
// (int8 buffers) is resolved once per op call (kernels::active_kernels(),
// kernels::active_qd8_kernels()) and passed down, so one call runs one ISA throughout.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <memory>
#include <new>
#include <vector>

#include "../kernels/spmm.h"

namespace sparsecpu {

// Copies features [first_feature, first_feature + features) of tokens [first_token,
// first_token + tokens) of a layer's input into `rows`, feature-major (row i at
// rows + i * width), zero-padding tokens past `tokens` up to `width`.
using PanelSource = std::function<void(int64_t first_token, int64_t tokens, int64_t first_feature,
                                       int64_t features, int64_t width, float* rows)>;

// The source of a 2-D x[token, feature] of any strides (in floats), copied by k.pack_panel.
PanelSource strided_source(const kernels::SpmmKernels& k, const float* x, int64_t token_stride,
                           int64_t feature_stride);

// Quantizes tokens [first_token, first_token + tokens) of an int8 layer's input into
// `panel` (kernels::QuantizedPanel), zero-padding tokens past `tokens` up to `width`.
using QuantizedPanelSource = std::function<void(int64_t first_token, int64_t tokens, int64_t width,
                                                const kernels::QuantizedPanel& panel)>;

// The quantized source of a 2-D x[token, feature] of any strides, quantized in one pass
// by qk.quantize_panel.
QuantizedPanelSource quantized_strided_source(const kernels::Qd8Kernels& qk, const float* x, int64_t in_features,
                                              int64_t token_stride, int64_t feature_stride);

// The quantized source of any float source: each panel copied feature-major (a
// thread's scratch buffer), then quantized (a convolution's input).
QuantizedPanelSource quantized_source(const kernels::Qd8Kernels& qk, const PanelSource& source, int64_t in_features);

// Where a layer's output goes: y[t * token_stride + o * feature_stride] for token t
// and output feature o. Linear writes token-major rows (feature_stride 1); a
// convolution into NCHW writes feature-major planes (token_stride 1).
struct OutputLayout {
  int64_t token_stride;
  int64_t feature_stride;
};

// y[t, o] = act(bias[o] + sum_i W[o, i] x[t, i]) for the `tokens` tokens that
// `source` copies into panels, with the kernels of `k`, split over torch's threads.
void sparse_linear_2d(const kernels::SpmmKernels& k, const kernels::PackedLinearView& w,
                      const PanelSource& source, int64_t tokens, const float* bias, kernels::Activation act,
                      float* y, OutputLayout out);

// The same for an int8 buffer (w.datatype == kInt8), whose tokens `source` quantizes.
void sparse_linear_2d_int8(const kernels::Qd8Kernels& qk, const kernels::PackedLinearView& w,
                           const QuantizedPanelSource& source, int64_t tokens, const float* bias,
                           kernels::Activation act, float* y, OutputLayout out);

// A contiguous output of a linear op: input's sizes with the last one out_features.
at::Tensor linear_output(const at::Tensor& input, int64_t out_features);

// ---- building blocks (sparse_layer.cpp, linear_chain.cpp) -----------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row blocks are scheduled in groups whose partial sums (the tile) fit in
// kTileGroupBytes; each group's tile is unpacked while it is still in cache.
// Within a group, a panel that fits in L2 is swept row block by row block (the
// weights then stream in storage order, which the prefetcher follows: it decides
// GEMV speed); a larger panel is swept K-block by K-block over the whole group,
// so each K-block's activations are read from L1 by every row of the group and the
// panel comes from L3 once per group rather than once per row block.
constexpr int64_t kPanelInL2Bytes = 256 * 1024;
constexpr int64_t kTileGroupBytes = 256 * 1024;

// Bytes of one activation of a panel for w: a float, or an int8 buffer's quantized byte.
inline int64_t panel_element_bytes(const kernels::PackedLinearView& w) {
  return w.datatype == kernels::Datatype::kInt8 ? 1 : 4;
}

inline bool panel_fits_l2(const kernels::PackedLinearView& w, int64_t width) {
  return w.in_features * width * panel_element_bytes(w) <= kPanelInL2Bytes;
}

// Row blocks per group for a panel of `width` tokens: small groups (the tile near
// L1) when the panel fits in L2 and sweeping it again is cheap.
inline int64_t row_blocks_per_group(const kernels::PackedLinearView& w, int64_t width) {
  const int64_t group_bytes = panel_fits_l2(w, width) ? kTileGroupBytes / 4 : kTileGroupBytes;
  return std::max<int64_t>(1, group_bytes / (w.row_block * width * 4));
}

// The work of row block rb over one token: its stored nonzeros and two per output row
// (bias, store). What threads are balanced by (for_each_group, conv_chain's teams).
inline int64_t row_block_work(const kernels::PackedLinearView& w, int64_t rb) {
  return w.block_nnz(rb) + 2 * w.rows_in_block(rb);
}

// Starts of `parts` contiguous chunks of the items whose work's prefix sums are
// `work_prefix` (one more entry than items, from 0), balanced by that work: chunk c is
// [starts[c], starts[c + 1]); starts has parts + 1 entries, the last the item count.
// Each cut is the item boundary nearest its share of the work, not the first past it:
// with few, large items (a team's 4 row blocks of 128 rows) the first past it gave
// the first chunk 3 of 4.
inline std::vector<int64_t> balanced_chunk_starts(const std::vector<int64_t>& work_prefix, int64_t parts) {
  const int64_t items = static_cast<int64_t>(work_prefix.size()) - 1;
  std::vector<int64_t> starts(parts + 1, items);
  for (int64_t c = 1; c < parts; ++c) {
    const int64_t target = work_prefix[items] * c / parts;
    int64_t cut = std::lower_bound(work_prefix.begin(), work_prefix.end(), target) - work_prefix.begin();
    if (cut > 0 && target - work_prefix[cut - 1] < work_prefix[cut] - target) --cut;
    starts[c] = cut;
  }
  starts[0] = 0;
  return starts;
}

// Grow-only scratch memory for one call site and thread: a fresh std::vector per
// call would zero it and, past glibc's mmap threshold, page-fault it every time.
// Buffers above kRetainedFloats are released after each use (release_if_large),
// so a thread keeps at most a few of 4 MiB each between calls.
//
// Cache-line aligned: panel and tile rows are whole lines (16 floats per AVX-512
// register, 64 per AVX2 panel), so no vector load splits across two lines. Plain
// `new float[]` returns 16-byte alignment (page + 16 above glibc's mmap threshold),
// which splits every other AVX2 load (cost measured in
// docs/kernels.md#panels-and-tiles-are-cache-line-aligned).
class ScratchBuffer {
 public:
  float* get(size_t floats) {
    if (floats > capacity_) {
      data_.reset(static_cast<float*>(::operator new[](floats * sizeof(float), std::align_val_t{kCacheLine})));
      capacity_ = floats;
    }
    return data_.get();
  }
  void release_if_large() {
    if (capacity_ > kRetainedFloats) {
      data_.reset();
      capacity_ = 0;
    }
  }

 private:
  static constexpr size_t kRetainedFloats = size_t{1} << 20;  // 4 MiB
  static constexpr size_t kCacheLine = 64;
  struct AlignedDelete {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t{kCacheLine}); }
  };
  std::unique_ptr<float[], AlignedDelete> data_;
  size_t capacity_ = 0;
};

// The quantized panel (kernels::QuantizedPanel) of an int8 layer w in a scratch buffer:
// w.panel_rows(gemv) x width bytes of quads and one spare word (a 1-token GEMV kernel
// gathers whole dwords, 3 bytes past its last feature), then the tokens' scales and
// zero points.
inline int64_t quantized_panel_floats(const kernels::PackedLinearView& w, bool gemv, int64_t width) {
  return ceil_div(w.panel_rows(gemv) * width, 4) + 1 + 2 * width;
}
inline kernels::QuantizedPanel quantized_panel_at(float* buffer, const kernels::PackedLinearView& w, bool gemv,
                                                 int64_t width) {
  float* scales = buffer + ceil_div(w.panel_rows(gemv) * width, 4) + 1;
  return {reinterpret_cast<uint8_t*>(buffer), scales, reinterpret_cast<int32_t*>(scales + width)};
}

// How a layer's tokens are cut into panels for the kernels of one ISA (vector_width
// tokens per register).
struct PanelPlan {
  int64_t vector_width;
  int64_t tokens;
  int64_t max_width;  // tokens per full panel

  int64_t num_panels() const { return ceil_div(tokens, max_width); }
  int64_t tokens_in(int64_t p) const { return std::min(max_width, tokens - p * max_width); }
  // Panels of up to kMaxGemvTokens tokens run the GEMV kernels unpadded; wider
  // panels are padded to whole registers.
  bool is_gemv(int64_t p) const { return vector_width > 1 && tokens_in(p) <= kernels::kMaxGemvTokens; }
  int64_t width_of(int64_t p) const {
    return is_gemv(p) ? tokens_in(p) : ceil_div(tokens_in(p), vector_width) * vector_width;
  }
  // Floats of a buffer that holds any panel of the plan as the input of layer w: the
  // rows the kernels may read whatever w's buffer holds (PackedLinearView::panel_rows,
  // more than in_features) times the width, floats or (int8) quantized bytes with their
  // scales. Every panel but the last is full.
  int64_t panel_floats(const kernels::PackedLinearView& w) const {
    const auto floats = [&](int64_t p) {
      return w.datatype == kernels::Datatype::kInt8 ? quantized_panel_floats(w, is_gemv(p), width_of(p))
                                                    : w.panel_rows(is_gemv(p)) * width_of(p);
    };
    return std::max(floats(0), floats(num_panels() - 1));
  }
};

// Runs row blocks [rb_begin, rb_end) of one layer over one panel into `tile`
// (row block rb at tile + (rb - rb_begin) * row_block * width, i.e. the rows of
// the output panel in order), group by group of row_blocks_per_group, calling
// row_block(rb, kb_begin, kb_end, tile of rb) (a kernel of the layer's datatype). For a
// panel larger than L2, `before_k_block(kb)`, when given, runs before each group starts
// on K-block kb (to pack that slice of the panel just in time).
template <typename RowBlock>
void run_row_blocks(const kernels::PackedLinearView& w, int64_t rb_begin, int64_t rb_end, int64_t width,
                    float* tile, RowBlock row_block, const std::function<void(int64_t)>& before_k_block = nullptr) {
  const auto tile_of = [&](int64_t rb) { return tile + (rb - rb_begin) * w.row_block * width; };
  if (panel_fits_l2(w, width)) {
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) row_block(rb, int64_t{0}, w.num_k_blocks, tile_of(rb));
    return;
  }
  const int64_t group = row_blocks_per_group(w, width);
  for (int64_t g = rb_begin; g < rb_end; g += group) {
    const int64_t g_end = std::min(rb_end, g + group);
    for (int64_t kb = 0; kb < w.num_k_blocks; ++kb) {
      if (before_k_block) before_k_block(kb);
      for (int64_t rb = g; rb < g_end; ++rb) row_block(rb, kb, kb + 1, tile_of(rb));
    }
  }
}

// run_row_blocks with the fp32 kernels of `k` (GEMV kernels for a gemv panel).
void run_row_blocks(const kernels::SpmmKernels& k, const kernels::PackedLinearView& w, int64_t rb_begin,
                    int64_t rb_end, const float* panel, int64_t width, bool gemv, const float* bias,
                    kernels::Activation act, float* tile,
                    const std::function<void(int64_t)>& before_k_block = nullptr);

// run_row_blocks with the int8 kernels of `qk` over a quantized panel.
void run_row_blocks(const kernels::Qd8Kernels& qk, const kernels::PackedLinearView& w, int64_t rb_begin,
                    int64_t rb_end, const kernels::QuantizedPanel& panel, int64_t width, bool gemv,
                    const float* bias, kernels::Activation act, float* tile);

}  // namespace sparsecpu
