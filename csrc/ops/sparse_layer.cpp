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
PanelPlan balanced_plan(int64_t vector_width, int64_t max_panel_width, int64_t tokens) {
  int64_t width = max_panel_width;
  if (tokens > max_panel_width) {
    width = ceil_div(ceil_div(tokens, ceil_div(tokens, max_panel_width)), vector_width) * vector_width;
  }
  return PanelPlan{vector_width, tokens, width};
}

// Tile [rows][width] (tokens [0, tokens) valid) into y laid out as `out`, y pointing
// at the tile's first token and row; unpack_tile for token-major rows.
template <typename UnpackTile>
void write_tile(UnpackTile unpack_tile, const float* tile, int64_t rows, int64_t width, int64_t tokens, float* y,
                OutputLayout out) {
  if (out.feature_stride == 1) return unpack_tile(tile, rows, width, tokens, y, out.token_stride);
  for (int64_t o = 0; o < rows; ++o) std::copy_n(tile + o * width, tokens, y + o * out.feature_stride);
}

// Every (panel, row block) pair of `plan` is a work item. Items are split into one
// contiguous chunk per thread, balanced by nonzeros; a chunk runs group by group of
// consecutive row blocks of one panel (at most one tile group), each group's tile
// computed by run_group(worker, p, rb_begin, rb_end, tile) (one make_worker() per thread,
// a LayerWork, start_chunk() before each chunk, its panel buffer released at the end if
// large) and written into y (unpack_tile) while it is still in cache.
template <typename MakeWorker, typename UnpackTile>
void for_each_group(const PanelPlan& plan, const PackedLinearView& w, UnpackTile unpack_tile, float* y,
                    OutputLayout out, MakeWorker make_worker) {
  const int64_t num_items = plan.num_panels() * w.num_row_blocks;
  std::vector<int64_t> cost_prefix(num_items + 1, 0);
  for (int64_t item = 0; item < num_items; ++item) {
    const int64_t p = item / w.num_row_blocks, rb = item % w.num_row_blocks;
    cost_prefix[item + 1] = cost_prefix[item] + plan.width_of(p) * row_block_work(w, rb);
  }
  const int64_t num_chunks = std::min<int64_t>(num_items, at::get_num_threads());
  const std::vector<int64_t> chunk_start = balanced_chunk_starts(cost_prefix, num_chunks);

  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    thread_local ScratchBuffer tile_buffer;
    auto worker = make_worker();
    for (int64_t c = begin; c < end; ++c) {
      worker.start_chunk();
      for (int64_t item = chunk_start[c]; item < chunk_start[c + 1];) {
        const int64_t p = item / w.num_row_blocks, rb_begin = item % w.num_row_blocks;
        const int64_t width = plan.width_of(p);
        const int64_t rb_end = std::min({w.num_row_blocks, rb_begin + chunk_start[c + 1] - item,
                                         rb_begin + row_blocks_per_group(w, width)});
        const int64_t first_row = rb_begin * w.row_block;
        const int64_t rows = std::min(w.out_features, rb_end * w.row_block) - first_row;
        float* tile = tile_buffer.get(static_cast<size_t>((rb_end - rb_begin) * w.row_block * width + plan.vector_width));
        run_group(worker, p, rb_begin, rb_end, tile);
        write_tile(unpack_tile, tile, rows, width, plan.tokens_in(p),
                   y + p * plan.max_width * out.token_stride + first_row * out.feature_stride, out);
        item += rb_end - rb_begin;
      }
    }
    worker.panel_buffer.release_if_large();
  });
}

// One thread's work for one call: the layer, its kernels and input, and the thread's
// panel buffer with the panel now in it (run_group below, by datatype).
template <typename Kernels, typename Source>
struct LayerWork {
  const Kernels& k;
  const PackedLinearView& w;
  const PanelPlan& plan;
  const Source& source;
  const float* bias;
  Activation act;
  ScratchBuffer& panel_buffer;
  int64_t panel_in_buffer = -1;  // the panel whole in the buffer, if any

  void start_chunk() { panel_in_buffer = -1; }
};

// fp32: each thread packs the panels it uses into its own buffer right before using
// them, so a panel is read from L2, never from L3, and no thread waits for another's
// packing: a panel that fits in L2 whole, when the chunk reaches it; a larger one slice
// by slice, right before each K-block is swept.
void run_group(LayerWork<kernels::SpmmKernels, PanelSource>& work, int64_t p, int64_t rb_begin, int64_t rb_end,
               float* tile) {
  const PackedLinearView& w = work.w;
  float* panel = work.panel_buffer.get(static_cast<size_t>(work.plan.panel_floats(w)));
  const int64_t width = work.plan.width_of(p);
  const auto pack_features = [&](int64_t first, int64_t count) {
    work.source(p * work.plan.max_width, work.plan.tokens_in(p), first, count, width, panel + first * width);
  };
  const bool gemv = work.plan.is_gemv(p);
  if (panel_fits_l2(w, width)) {
    if (work.panel_in_buffer != p) pack_features(0, w.in_features);
    work.panel_in_buffer = p;
    run_row_blocks(work.k, w, rb_begin, rb_end, panel, width, gemv, work.bias, work.act, tile);
    return;
  }
  const auto pack_slice = [&](int64_t kb) {
    const int64_t first = kb * w.k_block;
    pack_features(first, std::min(w.k_block, w.in_features - first));
  };
  work.panel_in_buffer = -1;
  run_row_blocks(work.k, w, rb_begin, rb_end, panel, width, gemv, work.bias, work.act, tile, pack_slice);
}

// int8: a panel is quantized whole (each token's range needs all its features), once
// per chunk.
void run_group(LayerWork<kernels::Qd8Kernels, QuantizedPanelSource>& work, int64_t p, int64_t rb_begin,
               int64_t rb_end, float* tile) {
  const int64_t width = work.plan.width_of(p);
  const bool gemv = work.plan.is_gemv(p);
  const kernels::QuantizedPanel panel = quantized_panel_at(
      work.panel_buffer.get(static_cast<size_t>(work.plan.panel_floats(work.w))), work.w, gemv, width);
  if (work.panel_in_buffer != p) work.source(p * work.plan.max_width, work.plan.tokens_in(p), width, panel);
  work.panel_in_buffer = p;
  run_row_blocks(work.k, work.w, rb_begin, rb_end, panel, width, gemv, work.bias, work.act, tile);
}

}  // namespace

void run_row_blocks(const kernels::SpmmKernels& k, const PackedLinearView& w, int64_t rb_begin, int64_t rb_end,
                    const float* panel, int64_t width, bool gemv, const float* bias, Activation act, float* tile,
                    const std::function<void(int64_t)>& before_k_block) {
  const auto kernel = gemv ? k.spmv_row_block : k.spmm_row_block;
  run_row_blocks(
      w, rb_begin, rb_end, width, tile,
      [&](int64_t rb, int64_t kb_begin, int64_t kb_end, float* rb_tile) {
        kernel(w, rb, kb_begin, kb_end, panel, width, bias, act, rb_tile);
      },
      before_k_block);
}

void run_row_blocks(const kernels::Qd8Kernels& qk, const PackedLinearView& w, int64_t rb_begin, int64_t rb_end,
                    const kernels::QuantizedPanel& panel, int64_t width, bool gemv, const float* bias, Activation act,
                    float* tile) {
  const auto kernel = gemv ? qk.spmv_row_block : qk.spmm_row_block;
  run_row_blocks(w, rb_begin, rb_end, width, tile, [&](int64_t rb, int64_t kb_begin, int64_t kb_end, float* rb_tile) {
    kernel(w, rb, kb_begin, kb_end, panel, width, bias, act, rb_tile);
  });
}

PanelSource strided_source(const kernels::SpmmKernels& k, const float* x, int64_t token_stride,
                           int64_t feature_stride) {
  return [&k, x, token_stride, feature_stride](int64_t first_token, int64_t tokens, int64_t first_feature,
                                               int64_t features, int64_t width, float* rows) {
    k.pack_panel(x + first_token * token_stride + first_feature * feature_stride, tokens, features, token_stride,
                 feature_stride, width, rows);
  };
}

QuantizedPanelSource quantized_strided_source(const kernels::Qd8Kernels& qk, const float* x, int64_t in_features,
                                              int64_t token_stride, int64_t feature_stride) {
  return [&qk, x, in_features, token_stride, feature_stride](int64_t first_token, int64_t tokens, int64_t width,
                                                             const kernels::QuantizedPanel& panel) {
    qk.quantize_panel(x + first_token * token_stride, tokens, in_features, token_stride, feature_stride, width, panel);
  };
}

QuantizedPanelSource quantized_source(const kernels::Qd8Kernels& qk, const PanelSource& source, int64_t in_features) {
  return [&qk, &source, in_features](int64_t first_token, int64_t tokens, int64_t width,
                                     const kernels::QuantizedPanel& panel) {
    thread_local ScratchBuffer rows_buffer;
    float* rows = rows_buffer.get(static_cast<size_t>(in_features * width));
    source(first_token, tokens, 0, in_features, width, rows);
    qk.quantize_panel(rows, tokens, in_features, 1, width, width, panel);
    rows_buffer.release_if_large();
  };
}

// y[t, o] = act(bias[o] + sum_i W[o, i] x[t, i]) for the `tokens` tokens that `source`
// copies into panels, into a y laid out as `out`, in balanced panels (balanced_plan)
// over threads (for_each_group).
void sparse_linear_2d(const kernels::SpmmKernels& k, const PackedLinearView& w, const PanelSource& source,
                      int64_t tokens, const float* bias, Activation act, float* y, OutputLayout out) {
  const PanelPlan plan = balanced_plan(k.vector_width, k.max_panel_width, tokens);
  for_each_group(plan, w, k.unpack_tile, y, out, [&] {
    thread_local ScratchBuffer panel_buffer;
    return LayerWork<kernels::SpmmKernels, PanelSource>{k, w, plan, source, bias, act, panel_buffer};
  });
}

void sparse_linear_2d_int8(const kernels::Qd8Kernels& qk, const PackedLinearView& w,
                           const QuantizedPanelSource& source, int64_t tokens, const float* bias, Activation act,
                           float* y, OutputLayout out) {
  const PanelPlan plan = balanced_plan(qk.vector_width, qk.max_panel_width, tokens);
  for_each_group(plan, w, qk.unpack_tile, y, out, [&] {
    thread_local ScratchBuffer panel_buffer;
    return LayerWork<kernels::Qd8Kernels, QuantizedPanelSource>{qk, w, plan, source, bias, act, panel_buffer};
  });
}

at::Tensor linear_output(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().end());
  out_sizes.back() = out_features;
  return at::empty(out_sizes, input.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace sparsecpu
