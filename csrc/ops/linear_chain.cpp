// sparsecpu::linear_chain: consecutive sparse layers run as tensor columns, every layer
// over one panel of tokens before the next panel (docs/tile_planner.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "checks.h"
#include "packed_weights.h"
#include "sparse_layer.h"

namespace sparsecpu {
namespace {

using kernels::Activation;
using kernels::PackedLinearView;

// Tokens per chain panel at most, whatever the ISA's full panel: on the AVX-512 machine
// (1 MiB L2), 128-token panels ran the 3-layer MLP 768 -> 3072 -> 3072 -> 768 at 90%
// 1.01-1.32x slower than 64-token ones, and were never faster at 70-95%, in 1 x 1 or 4 x 1
// blocks (docs/tile_planner.md#panel-width-of-a-chain). AVX2's panels are 64 tokens already.
constexpr int64_t kMaxChainPanelTokens = 64;

// A pair of chained layers whose second layer reads a panel larger than L2 but
// writes a tile that fits in one tile group runs as a pipeline (run_layer_pair):
// the intermediate then never makes a round trip through L3.
bool pipelines_into(const PackedLinearView& second, int64_t width, bool gemv) {
  return !gemv && !panel_fits_l2(second, width) &&
         second.num_row_blocks * second.row_block * width * 4 <= kTileGroupBytes;
}

// Layer `first` over `input` into `middle`, group by group; as soon as the rows
// first has finished cover one of `second`'s K-blocks, second runs that K-block
// over all its row blocks into `output` (its whole tile, waiting in L2), reading
// rows of `middle` that were written moments ago and are still in L1/L2.
void run_layer_pair(const kernels::SpmmKernels& k, const PackedLinearView& first,
                    const PackedLinearView& second, const float* input, int64_t width,
                    const float* first_bias, Activation first_act, const float* second_bias,
                    Activation second_act, float* middle, float* output) {
  const int64_t group = row_blocks_per_group(first, width);
  int64_t next_kb = 0;  // second's next K-block to run
  for (int64_t g = 0; g < first.num_row_blocks; g += group) {
    const int64_t g_end = std::min(first.num_row_blocks, g + group);
    run_row_blocks(k, first, g, g_end, input, width, /*gemv=*/false, first_bias, first_act,
                   middle + g * first.row_block * width);
    const int64_t rows_done = std::min(first.out_features, g_end * first.row_block);
    for (; next_kb < second.num_k_blocks &&
           std::min((next_kb + 1) * second.k_block, second.in_features) <= rows_done;
         ++next_kb) {
      for (int64_t rb = 0; rb < second.num_row_blocks; ++rb) {
        k.spmm_row_block(second, rb, next_kb, next_kb + 1, middle, width, second_bias, second_act,
                         output + rb * second.row_block * width);
      }
    }
  }
}

// Tensor columns: every layer of a chain over one panel of tokens before the next panel,
// so intermediate activations never leave the thread's caches as a whole tensor and
// never change layout: a layer's output tile is already the next layer's input panel
// (an int8 layer quantizes it first, into a buffer of its own). Threads take whole
// panels of at most kMaxChainPanelTokens tokens; panels shrink (down to one register)
// when there are fewer panels than threads.
void sparse_linear_chain_2d(const kernels::SpmmKernels& k, const kernels::Qd8Kernels& qk,
                            const std::vector<PackedLinearView>& layers, const float* x, int64_t tokens,
                            int64_t token_stride, int64_t feature_stride, const std::vector<const float*>& biases,
                            const std::vector<Activation>& acts, float* y) {
  const auto is_int8 = [](const PackedLinearView& w) { return w.datatype == kernels::Datatype::kInt8; };
  const bool any_int8 = std::any_of(layers.begin(), layers.end(), is_int8);
  // Panels every layer's kernels take: whole registers of both tables, at most both full panels.
  const int64_t vector_width = any_int8 ? std::max(k.vector_width, qk.vector_width) : k.vector_width;
  const int64_t max_panel_width = any_int8 ? std::min(k.max_panel_width, qk.max_panel_width) : k.max_panel_width;
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = ceil_div(ceil_div(tokens, threads), vector_width) * vector_width;
  const int64_t max_width = std::min(max_panel_width, kMaxChainPanelTokens);
  const PanelPlan plan{vector_width, tokens, std::max(vector_width, std::min(max_width, per_thread))};
  // Each of the three buffers holds a layer's float panel (PanelPlan::panel_floats) or its
  // output tile, which is the next layer's panel; the fourth an int8 layer's quantized panel.
  int64_t max_floats = 0, max_quantized_floats = 0;
  for (const PackedLinearView& w : layers) {
    max_floats = std::max(max_floats, w.num_row_blocks * w.row_block * plan.max_width);
    if (is_int8(w)) {
      max_quantized_floats = std::max(max_quantized_floats, plan.panel_floats(w));
    } else {
      max_floats = std::max(max_floats, plan.panel_floats(w));
    }
  }
  const PackedLinearView& last = layers.back();
  const size_t n = layers.size();
  at::parallel_for(0, plan.num_panels(), 1, [&](int64_t begin, int64_t end) {
    const size_t buffer_floats = static_cast<size_t>(max_floats + vector_width);
    thread_local ScratchBuffer buffers[4];
    float* panels[3];
    for (int b = 0; b < 3; ++b) panels[b] = buffers[b].get(buffer_floats);
    float* quantized = max_quantized_floats > 0 ? buffers[3].get(static_cast<size_t>(max_quantized_floats)) : nullptr;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t width = plan.width_of(p), first_tokens = plan.tokens_in(p);
      const bool gemv = plan.is_gemv(p);
      const float* x_panel = x + p * plan.max_width * token_stride;
      int current = 0;  // panels[current] holds the input of layer l (but an int8 first layer's)
      if (!is_int8(layers.front())) {
        k.pack_panel(x_panel, first_tokens, layers.front().in_features, token_stride, feature_stride, width,
                     panels[current]);
      }
      for (size_t l = 0; l < n;) {
        float* next = panels[(current + 1) % 3];
        if (is_int8(layers[l])) {
          const kernels::QuantizedPanel panel = quantized_panel_at(quantized, layers[l], gemv, width);
          if (l == 0) {  // straight from the input
            qk.quantize_panel(x_panel, first_tokens, layers[l].in_features, token_stride, feature_stride, width, panel);
          } else {  // from the previous layer's tile, feature-major
            qk.quantize_panel(panels[current], first_tokens, layers[l].in_features, 1, width, width, panel);
          }
          run_row_blocks(qk, layers[l], 0, layers[l].num_row_blocks, panel, width, gemv, biases[l], acts[l], next);
          current = (current + 1) % 3;
          l += 1;
        } else if (l + 1 < n && !is_int8(layers[l + 1]) && pipelines_into(layers[l + 1], width, gemv)) {
          float* after = panels[(current + 2) % 3];
          run_layer_pair(k, layers[l], layers[l + 1], panels[current], width, biases[l], acts[l],
                         biases[l + 1], acts[l + 1], next, after);
          current = (current + 2) % 3;
          l += 2;
        } else {
          run_row_blocks(k, layers[l], 0, layers[l].num_row_blocks, panels[current], width, gemv,
                         biases[l], acts[l], next);
          current = (current + 1) % 3;
          l += 1;
        }
      }
      k.unpack_tile(panels[current], last.out_features, width, first_tokens,
                    y + p * plan.max_width * last.out_features, last.out_features);
    }
    for (ScratchBuffer& buffer : buffers) buffer.release_if_large();
  });
}

at::Tensor linear_chain_cpu(const at::Tensor& input, at::TensorList weights, at::TensorList packed,
                            const c10::List<std::optional<at::Tensor>>& biases,
                            const std::vector<std::string>& activations) {
  const char* op = "sparsecpu::linear_chain";
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(n >= 1 && packed.size() == n && biases.size() == n && activations.size() == n, op,
                    ": weights, packed, biases and activations must have the same length >= 1, got ",
                    weights.size(), ", ", packed.size(), ", ", biases.size(), ", ", activations.size());
  std::vector<PackedLinearView> layers;
  std::vector<at::Tensor> packed_now, bias_tensors;  // packed_now: held while the views are used
  std::vector<const float*> bias_ptrs;
  std::vector<Activation> acts;
  for (size_t l = 0; l < n; ++l) {
    packed_now.push_back(packed_for(weights[l], packed[l]));
    layers.push_back(checked_view(packed_now.back()));
    TORCH_CHECK_VALUE(l == 0 || layers[l].in_features == layers[l - 1].out_features, op, ": layer ", l,
                      " takes ", layers[l].in_features, " features but layer ", l - 1, " gives ",
                      layers[l - 1].out_features);
    bias_tensors.push_back(checked_bias(layers[l], weights[l], biases.get(l), op));
    bias_ptrs.push_back(data_or_null(bias_tensors.back()));
    acts.push_back(parse_activation(activations[l]));
  }
  check_input(input, layers.front().in_features, op);
  at::Tensor y = linear_output(input, layers.back().out_features);
  const at::Tensor x2d = input.reshape({-1, layers.front().in_features});
  const int64_t tokens = x2d.size(0);
  if (tokens == 0 || layers.back().out_features == 0) return y;
  sparse_linear_chain_2d(kernels::active_kernels(), kernels::active_qd8_kernels(), layers, x2d.data_ptr<float>(),
                         tokens, x2d.stride(0), x2d.stride(1), bias_ptrs, acts, y.data_ptr<float>());
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecpu, CPU, m) {
  m.impl("linear_chain", &linear_chain_cpu);
}

}  // namespace sparsecpu
