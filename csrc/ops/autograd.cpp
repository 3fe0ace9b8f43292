// Autograd for sparsecpu::linear and sparsecpu::conv2d, in C++ so that a call in grad
// mode with nothing requiring grad costs no Python (a Python
// `torch.library.register_autograd` kernel runs on every such call; cost in
// docs/architecture.md#autograd). Gradients are those of the dense layer
// y = act(x W^T + b): they flow through the live `weight`, never through `packed`, and
// the pre-activation is recomputed sparsely in backward rather than kept from forward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"

namespace sparsecpu {
namespace {

using kernels::Activation;

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor linear_below_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& packed,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation,
                                 bool weight_transposed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparsecpu::linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, c10::string_view, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input, weight, packed, bias, activation, weight_transposed);
}

// backward_<name>(grad, pre): d act(pre) / d pre applied to grad, for each activation
// of lists.h (a missing one fails the build).
at::Tensor backward_none(const at::Tensor& grad, const at::Tensor& /*pre*/) { return grad; }
at::Tensor backward_relu(const at::Tensor& grad, const at::Tensor& pre) { return at::threshold_backward(grad, pre, 0); }
at::Tensor backward_gelu(const at::Tensor& grad, const at::Tensor& pre) { return at::gelu_backward(grad, pre, "none"); }
at::Tensor backward_gelu_tanh(const at::Tensor& grad, const at::Tensor& pre) {
  return at::gelu_backward(grad, pre, "tanh");
}
at::Tensor backward_silu(const at::Tensor& grad, const at::Tensor& pre) { return at::silu_backward(grad, pre); }
at::Tensor backward_relu6(const at::Tensor& grad, const at::Tensor& pre) {
  return at::hardtanh_backward(grad, pre, 0, 6);
}
at::Tensor backward_hardswish(const at::Tensor& grad, const at::Tensor& pre) {
  return at::hardswish_backward(grad, pre);
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& pre, const std::string& activation) {
  switch (parse_activation(activation)) {
#define SPARSECPU_BACKWARD_CASE(e, name) \
  case Activation::e:                    \
    return backward_##name(grad, pre);
    SPARSECPU_FOR_EACH_ACTIVATION(SPARSECPU_BACKWARD_CASE)
#undef SPARSECPU_BACKWARD_CASE
  }
  return grad;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  // A bias, when given, is the fourth variable of the graph (needs_input_grad(3)).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                            const std::string& activation, bool weight_transposed) {
    at::Tensor output = linear_below_autograd(input, weight, packed, bias, activation, weight_transposed);
    ctx->save_for_backward({input, weight, packed, bias.value_or(at::Tensor())});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["weight_transposed"] = weight_transposed;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &packed = saved[2], &bias = saved[3];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const bool weight_transposed = ctx->saved_data["weight_transposed"].toBool();
    at::Tensor grad = grad_outputs[0];
    if (activation != "none") {
      const std::optional<at::Tensor> maybe_bias = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
      const at::Tensor pre = linear_below_autograd(input, weight, packed, maybe_bias, "none", weight_transposed);
      grad = activation_backward(grad, pre, activation);
    }
    const at::Tensor out_by_in = weight_transposed ? weight.t() : weight;
    const int64_t out_features = out_by_in.size(0), in_features = out_by_in.size(1);
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) grad_input = at::matmul(grad, out_by_in);
    if (ctx->needs_input_grad(1)) {  // in the weight's own layout: [out, in], or [in, out] when transposed
      const at::Tensor grad_2d = grad.reshape({-1, out_features}), input_2d = input.reshape({-1, in_features});
      grad_weight = weight_transposed ? at::mm(input_2d.t(), grad_2d) : at::mm(grad_2d.t(), input_2d);
    }
    if (bias.defined() && ctx->needs_input_grad(3)) grad_bias = grad.reshape({-1, out_features}).sum(0);
    return {grad_input, grad_weight, at::Tensor(), grad_bias, at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv2d_below_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& packed,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, c10::string_view activation) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparsecpu::conv2d", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                               at::IntArrayRef, c10::string_view)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input, weight, packed, bias, stride, padding, dilation, activation);
}

// The gradients of F.conv2d(input, weight, bias, stride, padding, dilation) followed
// by the activation, from ATen's own convolution_backward.
class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                            std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                            const std::string& activation) {
    at::Tensor output = conv2d_below_autograd(input, weight, packed, bias, stride, padding, dilation, activation);
    ctx->save_for_backward({input, weight, packed, bias.value_or(at::Tensor())});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["activation"] = activation;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &packed = saved[2], &bias = saved[3];
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    at::Tensor grad = grad_outputs[0];
    if (activation != "none") {
      const std::optional<at::Tensor> maybe_bias = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
      const at::Tensor pre = conv2d_below_autograd(input, weight, packed, maybe_bias, stride, padding, dilation, "none");
      grad = activation_backward(grad, pre, activation);
    }
    const bool bias_grad = bias.defined() && ctx->needs_input_grad(3);
    auto [grad_input, grad_weight, grad_bias] = at::convolution_backward(
        grad, input, weight, bias.defined() ? c10::OptionalIntArrayRef(bias.sizes()) : c10::nullopt, stride,
        padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1,
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), bias_grad});
    return {grad_input, grad_weight, at::Tensor(), bias_grad ? grad_bias : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& packed,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, c10::string_view activation) {
  return Conv2dFunction::apply(input, weight, packed, bias, stride.vec(), padding.vec(), dilation.vec(),
                               std::string(activation));
}

at::Tensor linear_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& packed,
                           const std::optional<at::Tensor>& bias, c10::string_view activation,
                           bool weight_transposed) {
  return LinearFunction::apply(input, weight, packed, bias, std::string(activation), weight_transposed);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecpu, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("conv2d", &conv2d_autograd);
}

}  // namespace sparsecpu
