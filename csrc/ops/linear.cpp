// ATen glue of sparsecpu::pack_linear and sparsecpu::linear. No SIMD here: the
// kernels come from kernels::active_kernels() (fp32 buffers) or
// kernels::active_qd8_kernels() (int8 buffers), resolved once per call.
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
  const float* x = x2d.data_ptr<float>();
  const OutputLayout rows{w.out_features, 1};
  if (w.datatype == kernels::Datatype::kInt8) {
    const kernels::Qd8Kernels& qk = kernels::active_qd8_kernels();
    sparse_linear_2d_int8(qk, w, quantized_strided_source(qk, x, w.in_features, x2d.stride(0), x2d.stride(1)), tokens,
                          data_or_null(bias_c), act, y.data_ptr<float>(), rows);
    return y;
  }
  const kernels::SpmmKernels& k = kernels::active_kernels();
  sparse_linear_2d(k, w, strided_source(k, x, x2d.stride(0), x2d.stride(1)), tokens, data_or_null(bias_c), act,
                   y.data_ptr<float>(), rows);
  return y;
}

// The datatype `quantize` names: fp32 for None, else one of lists.h's datatypes.
kernels::Datatype parse_quantize(const std::optional<c10::string_view>& quantize) {
  if (!quantize.has_value()) return kernels::Datatype::kF32;
  for (size_t i = 1; i < kernels::kNumDatatypes; ++i) {  // kF32 (0) is quantize=None
    if (*quantize == kernels::kDatatypeNames[i]) return static_cast<kernels::Datatype>(i);
  }
  TORCH_CHECK_VALUE(false, "sparsecpu::pack_linear: quantize must be None or one of ",
                    kernels::joined(kernels::kDatatypeNames + 1, kernels::kNumDatatypes - 1), ", got '", *quantize,
                    "'");
}

at::Tensor pack_linear_cpu(const at::Tensor& weight, int64_t k_block, int64_t row_block, int64_t block_rows,
                           std::optional<c10::string_view> quantize, int64_t block_cols) {
  const char* op = "sparsecpu::pack_linear";
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(), op,
                    ": weight must be a 2-D float32 CPU tensor, got ", weight.scalar_type(), " of shape ",
                    weight.sizes(), " on ", weight.device());
  TORCH_CHECK_VALUE(k_block >= 0 && k_block <= kernels::kMaxKBlock, op, ": k_block must be in [0, ",
                    kernels::kMaxKBlock, "] (0: one K-block), got ", k_block);
  TORCH_CHECK_VALUE(row_block >= 1, op, ": row_block must be >= 1, got ", row_block);
  TORCH_CHECK_VALUE(block_rows == 1 || block_rows == kernels::kTallBlockRows, op, ": block_rows must be 1 or ",
                    kernels::kTallBlockRows, ", got ", block_rows);
  TORCH_CHECK_VALUE(weight.size(0) % block_rows == 0 && row_block % block_rows == 0, op, ": block_rows=", block_rows,
                    " must divide out_features (", weight.size(0), ") and row_block (", row_block, ")");
  TORCH_CHECK_VALUE(weight.numel() < (int64_t{1} << 30), op, ": weights of 2^30 or more elements are not supported");
  kernels::PackOptions options;
  options.k_block = k_block;
  options.row_block = row_block;
  options.block_rows = block_rows;
  options.block_cols = block_cols;
  options.datatype = parse_quantize(quantize);
  const at::Tensor w = weight.contiguous();
  if (options.datatype == kernels::Datatype::kInt8) {
    TORCH_CHECK_VALUE(block_rows == 1, op, ": quantize='int8' packs 1 x 1 or 1 x 4 blocks: block_rows must be 1, got ",
                      block_rows);
    TORCH_CHECK_VALUE(block_cols == 1 || block_cols == kernels::kWideBlockCols, op, ": block_cols must be 1 or ",
                      kernels::kWideBlockCols, ", got ", block_cols);
    TORCH_CHECK_VALUE(k_block % kernels::kWideBlockCols == 0, op,
                      ": quantize='int8' needs a k_block that is a multiple of ", kernels::kWideBlockCols, ", got ",
                      k_block);
    TORCH_CHECK_VALUE(weight.size(1) <= kernels::kMaxInt8InFeatures, op, ": quantize='int8' takes at most ",
                      kernels::kMaxInt8InFeatures, " input features (int32 sums), got ", weight.size(1));
    TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>(), op,
                      ": quantize='int8' needs a finite weight (it has a NaN or an infinity)");
  } else {
    TORCH_CHECK_VALUE(block_cols == 1, op, ": block_cols=", block_cols, " needs quantize='int8' (fp32 takes 1)");
  }
  std::vector<int32_t> words = kernels::pack_linear(w.data_ptr<float>(), w.size(0), w.size(1), w.size(1), options);
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
