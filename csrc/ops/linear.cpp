// ATen glue of sparsecpu::pack_linear and sparsecpu::linear. No SIMD here: the
// kernels come from kernels::active_kernels(), resolved once per call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "packed_weights.h"
#include "sparse_layer.h"

namespace sparsecpu {
namespace {

using kernels::Activation;
using kernels::PackedLinearView;

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias, c10::string_view activation, bool weight_transposed) {
  const at::Tensor packed_now = packed_for(weight, packed, weight_transposed);
  const PackedLinearView w = checked_view(packed_now);
  const Activation act = parse_activation(activation);
  check_input(input, w.in_features, "sparsecpu::linear");
  const at::Tensor bias_c = checked_bias(w, weight_transposed ? weight.t() : weight, bias, "sparsecpu::linear");
  at::Tensor y = linear_output(input, w.out_features);
  const at::Tensor x2d = input.reshape({-1, w.in_features});
  const int64_t tokens = x2d.size(0);
  if (tokens == 0 || w.out_features == 0) return y;
  const kernels::SpmmKernels& k = kernels::active_kernels();
  sparse_linear_2d(k, w, strided_source(k, x2d.data_ptr<float>(), x2d.stride(0), x2d.stride(1)), tokens,
                   data_or_null(bias_c), act, y.data_ptr<float>(), OutputLayout{w.out_features, 1});
  return y;
}

at::Tensor pack_linear_cpu(const at::Tensor& weight, int64_t k_block, int64_t row_block, int64_t block_rows) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
                    "sparsecpu::pack_linear: weight must be a 2-D float32 CPU tensor, got ",
                    weight.scalar_type(), " of shape ", weight.sizes(), " on ", weight.device());
  TORCH_CHECK_VALUE(k_block >= 0 && k_block <= kernels::kMaxKBlock,
                    "sparsecpu::pack_linear: k_block must be in [0, ", kernels::kMaxKBlock,
                    "] (0: one K-block), got ", k_block);
  TORCH_CHECK_VALUE(row_block >= 1, "sparsecpu::pack_linear: row_block must be >= 1, got ", row_block);
  TORCH_CHECK_VALUE(block_rows == 1 || block_rows == kernels::kTallBlockRows,
                    "sparsecpu::pack_linear: block_rows must be 1 or ", kernels::kTallBlockRows, ", got ",
                    block_rows);
  TORCH_CHECK_VALUE(weight.size(0) % block_rows == 0 && row_block % block_rows == 0,
                    "sparsecpu::pack_linear: block_rows=", block_rows, " must divide out_features (",
                    weight.size(0), ") and row_block (", row_block, ")");
  TORCH_CHECK_VALUE(weight.numel() < (int64_t{1} << 30),
                    "sparsecpu::pack_linear: weights of 2^30 or more elements are not supported");
  const at::Tensor w = weight.contiguous();
  std::vector<int32_t> words = kernels::pack_linear_f32(w.data_ptr<float>(), w.size(0), w.size(1),
                                                        w.size(1), k_block, row_block, block_rows);
  at::Tensor packed = at::empty({static_cast<int64_t>(words.size())}, weight.options().dtype(at::kInt));
  std::copy(words.begin(), words.end(), packed.data_ptr<int32_t>());
  return packed;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecpu, CPU, m) {
  m.impl("pack_linear", &pack_linear_cpu);
  m.impl("linear", &linear_cpu);
}

}  // namespace sparsecpu
