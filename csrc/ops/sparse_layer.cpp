// One sparse layer over tokens: panels, work split over threads, tiles into the
// output (sparse_layer.h). No SIMD here: the kernels are those of the table passed in.
#include "sparse_layer.h"

#include <ATen/Parallel.h>

#include <vector>

namespace sparsecpu {
using kernels::Activation;
using kernels::PackedLinearView;

namespace {

// Panels as wide as possible but equal, in whole registers (the last takes the rest):
// on AVX2, 196 tokens (a 14 x 14 feature map) make panels of 56, 56, 56 and 28 rather
// than 3 of 64 and a 4-token remainder, which would run the GEMV kernel over the whole
// weight for 2% of the tokens (docs/tile_planner.md#token-panels).
int64_t balanced_panel_width(const kernels::SpmmKernels& k, int64_t tokens) {
  if (tokens <= k.max_panel_width) return k.max_panel_width;
  const int64_t panels = ceil_div(tokens, k.max_panel_width);
  return ceil_div(ceil_div(tokens, panels), k.vector_width) * k.vector_width;
}

// Tile [rows][width] (tokens [0, tokens) valid) into y laid out as `out`, y pointing
// at the tile's first token and row.
void write_tile(const kernels::SpmmKernels& k, const float* tile, int64_t rows, int64_t width, int64_t tokens,
                float* y, OutputLayout out) {
  if (out.feature_stride == 1) return k.unpack_tile(tile, rows, width, tokens, y, out.token_stride);
  for (int64_t o = 0; o < rows; ++o) std::copy_n(tile + o * width, tokens, y + o * out.feature_stride);
}

}  // namespace

void run_row_blocks(const kernels::SpmmKernels& k, const PackedLinearView& w, int64_t rb_begin,
                    int64_t rb_end, const float* panel, int64_t width, bool gemv, const float* bias,
                    Activation act, float* tile, const std::function<void(int64_t)>& before_k_block) {
  const auto row_block_fn = gemv ? k.spmv_row_block : k.spmm_row_block;
  const auto tile_of = [&](int64_t rb) { return tile + (rb - rb_begin) * w.row_block * width; };
  if (panel_fits_l2(w, width)) {
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      row_block_fn(w, rb, 0, w.num_k_blocks, panel, width, bias, act, tile_of(rb));
    }
    return;
  }
  const int64_t group = row_blocks_per_group(w, width);
  for (int64_t g = rb_begin; g < rb_end; g += group) {
    const int64_t g_end = std::min(rb_end, g + group);
    for (int64_t kb = 0; kb < w.num_k_blocks; ++kb) {
      if (before_k_block) before_k_block(kb);
      for (int64_t rb = g; rb < g_end; ++rb) row_block_fn(w, rb, kb, kb + 1, panel, width, bias, act, tile_of(rb));
    }
  }
}

PanelSource strided_source(const kernels::SpmmKernels& k, const float* x, int64_t token_stride,
                           int64_t feature_stride) {
  return [&k, x, token_stride, feature_stride](int64_t first_token, int64_t tokens, int64_t first_feature,
                                               int64_t features, int64_t width, float* rows) {
    k.pack_panel(x + first_token * token_stride + first_feature * feature_stride, tokens, features, token_stride,
                 feature_stride, width, rows);
  };
}

// y[t, o] = act(bias[o] + sum_i W[o, i] x[t, i]) for the `tokens` tokens that `source`
// copies into panels, into a y laid out as `out`.
//
// The tokens are cut into balanced panels; every (panel, row block) pair
// is a work item. Items are split into one contiguous chunk per thread, balanced by
// nonzeros; a chunk runs group by group of row blocks, each group unpacked into y as
// soon as it is done. Each thread packs the panels it uses into its own buffer right
// before using them, so a panel is read from L2, never from L3, and no thread waits
// for another's packing: a panel that fits in L2 whole, when the chunk reaches it; a
// larger one slice by slice, right before each K-block is swept.
void sparse_linear_2d(const kernels::SpmmKernels& k, const PackedLinearView& w, const PanelSource& source,
                      int64_t tokens, const float* bias, Activation act, float* y, OutputLayout out) {
  const PanelPlan plan{k, tokens, balanced_panel_width(k, tokens)};
  const int64_t num_panels = plan.num_panels();
  const int64_t panel_floats = plan.panel_floats(w);
  const auto pack_features = [&](int64_t p, int64_t first, int64_t count, float* panel) {
    const int64_t width = plan.width_of(p);
    source(p * plan.max_width, plan.tokens_in(p), first, count, width, panel + first * width);
  };

  const int64_t num_items = num_panels * w.num_row_blocks;
  std::vector<int64_t> cost_prefix(num_items + 1, 0);
  for (int64_t item = 0; item < num_items; ++item) {
    const int64_t p = item / w.num_row_blocks, rb = item % w.num_row_blocks;
    cost_prefix[item + 1] = cost_prefix[item] +
                            plan.width_of(p) * (w.block_nnz(rb) + 2 * w.rows_in_block(rb));
  }
  const int64_t num_chunks = std::min<int64_t>(num_items, at::get_num_threads());
  std::vector<int64_t> chunk_start(num_chunks + 1, num_items);
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t target = cost_prefix[num_items] * c / num_chunks;
    chunk_start[c] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), target) - cost_prefix.begin();
  }
  chunk_start[0] = 0;

  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    thread_local ScratchBuffer tile_buffer, panel_buffer;
    float* panel = panel_buffer.get(static_cast<size_t>(panel_floats));
    for (int64_t c = begin; c < end; ++c) {
      int64_t packed_panel = -1;  // the panel whole in `panel`, if any
      for (int64_t item = chunk_start[c]; item < chunk_start[c + 1];) {
        // One group: consecutive row blocks of one panel, at most one tile group.
        const int64_t p = item / w.num_row_blocks, rb_begin = item % w.num_row_blocks;
        const int64_t width = plan.width_of(p);
        const int64_t rb_end = std::min({w.num_row_blocks, rb_begin + chunk_start[c + 1] - item,
                                         rb_begin + row_blocks_per_group(w, width)});
        const int64_t first_row = rb_begin * w.row_block;
        const int64_t rows = std::min(w.out_features, rb_end * w.row_block) - first_row;
        float* tile = tile_buffer.get(static_cast<size_t>((rb_end - rb_begin) * w.row_block * width + k.vector_width));
        if (panel_fits_l2(w, width)) {
          if (packed_panel != p) pack_features(p, 0, w.in_features, panel);
          packed_panel = p;
          run_row_blocks(k, w, rb_begin, rb_end, panel, width, plan.is_gemv(p), bias, act, tile);
        } else {
          const auto pack_slice = [&](int64_t kb) {
            const int64_t first = kb * w.k_block;
            pack_features(p, first, std::min(w.k_block, w.in_features - first), panel);
          };
          packed_panel = -1;
          run_row_blocks(k, w, rb_begin, rb_end, panel, width, plan.is_gemv(p), bias, act, tile, pack_slice);
        }
        write_tile(k, tile, rows, width, plan.tokens_in(p),
                   y + p * plan.max_width * out.token_stride + first_row * out.feature_stride, out);
        item += rb_end - rb_begin;
      }
    }
    panel_buffer.release_if_large();
  });
}

at::Tensor linear_output(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().end());
  out_sizes.back() = out_features;
  return at::empty(out_sizes, input.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace sparsecpu
