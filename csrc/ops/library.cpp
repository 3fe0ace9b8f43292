// The schemas of every sparsecpu op, defined once (the CPU kernels are registered by
// linear.cpp, linear_chain.cpp, conv.cpp and conv_chain.cpp, the Autograd kernels by autograd.cpp; the
// fake kernels by torch_sparsecpu/ops.py).
#include <torch/library.h>

namespace sparsecpu {

TORCH_LIBRARY(sparsecpu, m) {
  // row_block's default is ops.DEFAULT_ROW_BLOCK (a test checks they agree). quantize:
  // None (fp32 values) or "int8"; block_cols: 1, or 4 for int8 1 x 4 blocks.
  m.def("pack_linear(Tensor weight, int k_block=128, int row_block=128, int block_rows=1, str? quantize=None, "
        "int block_cols=1) -> Tensor");
  // weight_transposed: weight is given as [in_features, out_features], the layout of
  // GPT-2's Conv1D (addmm(bias, x, weight)); packed is still packed from [out, in].
  m.def("linear(Tensor input, Tensor weight, Tensor packed, Tensor? bias=None, str activation=\"none\", "
        "bool weight_transposed=False) -> Tensor");
  m.def("linear_chain(Tensor input, Tensor[] weights, Tensor[] packed, Tensor?[] biases, str[] activations) -> Tensor");
  // flexible_layout: Inductor may hand conv2d channels-last input (its layout
  // optimisation for graphs with convolutions) instead of converting it to NCHW.
  m.def("conv2d(Tensor input, Tensor weight, Tensor packed, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
        "int[2] dilation=1, str activation=\"none\") -> Tensor",
        {at::Tag::flexible_layout});
  // Consecutive convolutions (a ResNet bottleneck, a MobileNet inverted residual) as tensor
  // columns: strides hold (height, width) per layer, paddings (height, width) or (top, bottom,
  // left, right) per layer; a layer whose packed entry is empty runs dense as a depthwise
  // convolution; with shortcut the last layer (1 x 1) reads the input too, as extra channels
  // (conv_chain.cpp). band_rows=0 and split_channels=None: the tile planner's choice.
  m.def("conv_chain(Tensor input, Tensor[] weights, Tensor[] packed, Tensor?[] biases, int[] strides, "
        "int[] paddings, str[] activations, bool shortcut=False, int band_rows=0, bool? split_channels=None) -> Tensor",
        {at::Tag::flexible_layout});
}

}  // namespace sparsecpu
