// ATen glue of sparsecpu::conv2d: a convolution is a linear layer over output pixels
// whose input features are (input channel, kernel row, kernel column), the order of
// weight.flatten(1), the matrix that is packed. No im2col buffer: each panel copies
// the input rows its pixels need straight from the (zero-padded) image.
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

// Whether conv2d reads its input as channels-last pixels (and writes its output so):
// when the input's strides are channels-last-like, the rule of F.conv2d's output
// format too. ops.py's fake kernel applies the same rule (torch._prims_common's
// suggest_memory_format).
bool is_channels_last(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

struct ConvGeometry {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  // Input rows (columns) past the first kernel position: negative when the padded
  // image is smaller than the dilated kernel.
  int64_t spare_h(int64_t height) const { return height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1; }
  int64_t spare_w(int64_t width) const { return width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1; }
};

// Panels of one image for any convolution, from the zero-padded NCHW image `padded`
// [channels][padded_h][padded_w]: feature (c, i, j) of output pixel (oh, ow) is
// padded[c][oh * stride_h + i * dilation_h][ow * stride_w + j * dilation_w]. A panel's
// pixels run along output rows, so each feature row of the panel is a few runs of
// (strided) consecutive input values.
PanelSource padded_image_source(const float* padded, const std::vector<int64_t>& feature_offsets, int64_t padded_w,
                                int64_t out_w, const ConvGeometry& g) {
  return [=, &feature_offsets](int64_t first_token, int64_t tokens, int64_t first_feature, int64_t features,
                               int64_t width, float* rows) {
    for (int64_t f = 0; f < features; ++f) {
      const float* image = padded + feature_offsets[first_feature + f];
      float* row = rows + f * width;
      for (int64_t t = 0; t < tokens;) {
        const int64_t oh = (first_token + t) / out_w, ow = (first_token + t) % out_w;
        const int64_t run = std::min(tokens - t, out_w - ow);
        const float* src = image + oh * g.stride_h * padded_w + ow * g.stride_w;
        if (g.stride_w == 1) {
          std::copy_n(src, run, row + t);
        } else {
          for (int64_t i = 0; i < run; ++i) row[t + i] = src[i * g.stride_w];
        }
        t += run;
      }
      std::fill(row + tokens, row + width, 0.0f);
    }
  };
}

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, c10::string_view activation) {
  const char* op = "sparsecpu::conv2d";
  const at::Tensor packed_now = packed_for(weight, packed);
  const PackedLinearView w = checked_view(packed_now);
  const Activation act = parse_activation(activation);
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be [out_channels, in_channels, kernel_h, kernel_w], got shape ",
                    weight.sizes());
  const at::Tensor bias_c = checked_bias(w, weight.flatten(1), bias, op);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": stride, padding and dilation must have 2 values each");
  const ConvGeometry g{weight.size(2), weight.size(3), stride[0], stride[1], padding[0], padding[1],
                       dilation[0], dilation[1]};
  TORCH_CHECK_VALUE(g.stride_h >= 1 && g.stride_w >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(g.pad_h >= 0 && g.pad_w >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(g.dilation_h >= 1 && g.dilation_w >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat && input.device().is_cpu(), op,
                    ": input must be a float32 CPU tensor, got ", input.scalar_type(), " on ", input.device());
  const int64_t channels = weight.size(1);
  TORCH_CHECK_VALUE(input.dim() == 4 && input.size(1) == channels, op, ": input must be [batch, ", channels,
                    ", height, width], got shape ", input.sizes());
  const int64_t spare_h = g.spare_h(input.size(2)), spare_w = g.spare_w(input.size(3));
  TORCH_CHECK_VALUE(input.size(2) > 0 && input.size(3) > 0 && spare_h >= 0 && spare_w >= 0, op, ": input of shape ", input.sizes(), " is smaller than the ",
                    g.kernel_h, " x ", g.kernel_w, " kernel (dilation ", dilation, ", padding ", padding, ")");
  const int64_t batch = input.size(0);
  const int64_t out_h = spare_h / g.stride_h + 1, out_w = spare_w / g.stride_w + 1;
  const bool channels_last = is_channels_last(input);
  at::Tensor y = at::empty({batch, w.out_features, out_h, out_w},
                           input.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous));
  const int64_t pixels = out_h * out_w;
  if (batch == 0 || pixels == 0 || w.out_features == 0) return y;
  float* y_data = y.data_ptr<float>();
  const kernels::SpmmKernels& k = kernels::active_kernels();
  const kernels::Qd8Kernels& qk = kernels::active_qd8_kernels();
  const bool int8 = w.datatype == kernels::Datatype::kInt8;
  // Channels-last output: token-major [pixels of all images, channels]; NCHW: one
  // feature-major plane per channel and image.
  const auto output_of = [&](int64_t n) { return y_data + n * w.out_features * pixels; };
  const OutputLayout layout = channels_last ? OutputLayout{w.out_features, 1} : OutputLayout{1, pixels};
  // The layer over `tokens` pixels read with strides (int8: quantized as they are read),
  // or copied by any source (int8: copied, then quantized).
  const auto run_strided = [&](const float* x, int64_t tokens, int64_t token_stride, int64_t feature_stride,
                               float* out) {
    if (int8) {
      sparse_linear_2d_int8(qk, w, quantized_strided_source(qk, x, w.in_features, token_stride, feature_stride),
                            tokens, data_or_null(bias_c), act, out, layout);
    } else {
      sparse_linear_2d(k, w, strided_source(k, x, token_stride, feature_stride), tokens, data_or_null(bias_c), act,
                       out, layout);
    }
  };
  const auto run_source = [&](const PanelSource& source, int64_t tokens, float* out) {
    if (int8) {
      sparse_linear_2d_int8(qk, w, quantized_source(qk, source, w.in_features), tokens, data_or_null(bias_c), act, out,
                            layout);
    } else {
      sparse_linear_2d(k, w, source, tokens, data_or_null(bias_c), act, out, layout);
    }
  };

  if (g.kernel_h == 1 && g.kernel_w == 1 && g.pad_h == 0 && g.pad_w == 0) {
    // A linear layer over the pixels of the strided grid, read in place.
    at::Tensor x = input.slice(2, 0, c10::nullopt, g.stride_h).slice(3, 0, c10::nullopt, g.stride_w);
    if (channels_last) {  // all images' pixels as the tokens of one call
      const at::Tensor rows = x.permute({0, 2, 3, 1}).reshape({-1, channels});
      run_strided(rows.data_ptr<float>(), rows.size(0), rows.stride(0), rows.stride(1), y_data);
      return y;
    }
    // The pixels need one stride. A dimension of size 1 may carry any stride (even in a
    // tensor that is_contiguous()), so the stride is that of a dimension longer than 1.
    if (out_h > 1 && out_w > 1 && x.stride(2) != out_w * x.stride(3)) x = x.contiguous();
    const int64_t pixel_stride = out_w > 1 ? x.stride(3) : x.stride(2);
    for (int64_t n = 0; n < batch; ++n) {
      run_strided(x.data_ptr<float>() + n * x.stride(0), pixels, pixel_stride, x.stride(1), output_of(n));
    }
    return y;
  }

  const at::Tensor padded = (g.pad_h || g.pad_w)
                                ? at::constant_pad_nd(input, {g.pad_w, g.pad_w, g.pad_h, g.pad_h}, 0.0).contiguous()
                                : input.contiguous();  // NCHW
  const int64_t padded_h = padded.size(2), padded_w = padded.size(3);
  std::vector<int64_t> feature_offsets;  // of (c, i, j), in weight.flatten(1)'s order
  feature_offsets.reserve(channels * g.kernel_h * g.kernel_w);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        feature_offsets.push_back(c * padded_h * padded_w + i * g.dilation_h * padded_w + j * g.dilation_w);
      }
    }
  }
  for (int64_t n = 0; n < batch; ++n) {
    const float* image = padded.data_ptr<float>() + n * channels * padded_h * padded_w;
    run_source(padded_image_source(image, feature_offsets, padded_w, out_w, g), pixels, output_of(n));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsecpu, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
}

}  // namespace sparsecpu
