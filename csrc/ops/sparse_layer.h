// What the ATen glue of the sparse ops shares (linear.cpp defines it, conv.cpp uses
// it): argument checks and one layer over tokens whose panels come from a callback.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>

#include "../kernels/spmm.h"

namespace sparsecpu {

kernels::Activation parse_activation(c10::string_view name);

// A view of a packed buffer made by sparsecpu::pack_linear; its contents are checked
// in full the first time the buffer is seen (and after any in-place change of it).
kernels::PackedLinearView checked_view(const at::Tensor& packed);

// Checks one layer's 2-D weight and bias against its packed buffer; returns the bias
// as a contiguous tensor (undefined when absent).
at::Tensor checked_bias(const kernels::PackedLinearView& w, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const char* op);

const float* data_or_null(const at::Tensor& t);

// Copies features [first_feature, first_feature + features) of tokens [first_token,
// first_token + tokens) of a layer's input into `rows`, feature-major (row i at
// rows + i * width), zero-padding tokens past `tokens` up to `width`.
using PanelSource = std::function<void(int64_t first_token, int64_t tokens, int64_t first_feature,
                                       int64_t features, int64_t width, float* rows)>;

// The source of a 2-D x[token, feature] of any strides (in floats).
PanelSource strided_source(const float* x, int64_t token_stride, int64_t feature_stride);

// Where a layer's output goes: y[t * token_stride + o * feature_stride] for token t
// and output feature o. Linear writes token-major rows (feature_stride 1); a
// convolution into NCHW writes feature-major planes (token_stride 1).
struct OutputLayout {
  int64_t token_stride;
  int64_t feature_stride;
};

// y[t, o] = act(bias[o] + sum_i W[o, i] x[t, i]) for the `tokens` tokens that
// `source` copies into panels, split over torch's threads.
void sparse_linear_2d(const kernels::PackedLinearView& w, const PanelSource& source, int64_t tokens,
                      const float* bias, kernels::Activation act, float* y, OutputLayout out);

}  // namespace sparsecpu
