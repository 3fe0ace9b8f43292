// ATen glue for the sparse linear ops: schemas, argument checks, the split of
// work over threads. No SIMD here: kernels come from kernels::active_kernels().
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../kernels/spmm.h"

namespace sparsecpu {
namespace {

using kernels::Activation;
using kernels::PackedLinearView;

Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGeluErf;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, "sparsecpu::linear: unknown activation '", name,
                    "'; expected one of none, relu, gelu, gelu_tanh, silu");
}

// Packed buffers whose contents were checked in full, keyed by address and
// identified by size, version counter and a fingerprint of their first and last
// words. The O(nnz) check then runs once per buffer, not once per call; any
// in-place change of the buffer bumps its version and forces a new check.
class CheckedBuffers {
 public:
  bool contains(const at::Tensor& packed) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = checked_.find(packed.data_ptr());
    return it != checked_.end() && it->second == identity(packed);
  }
  void insert(const at::Tensor& packed) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (checked_.size() >= 4096) checked_.clear();
    checked_[packed.data_ptr()] = identity(packed);
  }

 private:
  struct Identity {
    int64_t words;
    uint32_t version;
    uint64_t fingerprint;
    bool operator==(const Identity& other) const {
      return words == other.words && version == other.version && fingerprint == other.fingerprint;
    }
  };
  static Identity identity(const at::Tensor& packed) {
    const int32_t* data = packed.data_ptr<int32_t>();
    const int64_t words = packed.numel();
    uint64_t hash = 1469598103934665603ull;  // FNV-1a over the first and last 64 words
    auto mix = [&](int64_t i) { hash = (hash ^ static_cast<uint32_t>(data[i])) * 1099511628211ull; };
    for (int64_t i = 0; i < std::min<int64_t>(words, 64); ++i) mix(i);
    for (int64_t i = std::max<int64_t>(64, words - 64); i < words; ++i) mix(i);
    // Inference tensors carry no version counter (and cannot be edited outside inference mode).
    const uint32_t version =
        packed.is_inference() ? 0 : packed.unsafeGetTensorImpl()->version_counter().current_version();
    return {words, version, hash};
  }
  std::mutex mutex_;
  std::unordered_map<const void*, Identity> checked_;
};

PackedLinearView checked_view(const at::Tensor& packed) {
  TORCH_CHECK_VALUE(packed.device().is_cpu() && packed.scalar_type() == at::kInt &&
                        packed.dim() == 1 && packed.is_contiguous(),
                    "sparsecpu: packed must be a contiguous 1-D int32 CPU tensor made by "
                    "sparsecpu::pack_linear, got ", packed.scalar_type(), " of shape ",
                    packed.sizes());
  static CheckedBuffers checked;
  const bool check_contents = !checked.contains(packed);
  PackedLinearView view;
  std::string error;
  TORCH_CHECK_VALUE(kernels::view_packed_linear(packed.data_ptr<int32_t>(), packed.numel(),
                                                check_contents, &view, &error),
                    "sparsecpu: packed weight rejected: ", error);
  if (check_contents) checked.insert(packed);
  return view;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// y[n, o] = act(bias[o] + sum_i W[o, i] x[n, i]) for a 2-D x of any strides.
//
// The tokens are cut into panels of max_panel_width; each panel is copied once
// into feature-major layout, then every (panel, row block) pair is a work item.
// Items are split into one contiguous chunk per thread, balanced by nonzeros.
void sparse_linear_2d(const PackedLinearView& w, const float* x, int64_t tokens,
                      int64_t token_stride, int64_t feature_stride, const float* bias,
                      Activation act, float* y) {
  const kernels::SpmmKernels& k = kernels::active_kernels();
  const int64_t max_width = k.max_panel_width;
  const int64_t num_panels = ceil_div(tokens, max_width);
  auto tokens_in = [&](int64_t p) { return std::min(max_width, tokens - p * max_width); };
  // Panels of up to kMaxGemvTokens tokens run the GEMV kernels unpadded; wider
  // panels are padded to whole registers.
  auto is_gemv = [&](int64_t p) { return k.vector_width > 1 && tokens_in(p) <= kernels::kMaxGemvTokens; };
  auto width_of = [&](int64_t p) {
    return is_gemv(p) ? tokens_in(p) : ceil_div(tokens_in(p), k.vector_width) * k.vector_width;
  };

  std::vector<float> panels(static_cast<size_t>(num_panels * w.in_features * max_width));
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      k.pack_panel(x + p * max_width * token_stride, tokens_in(p), w.in_features, token_stride,
                   feature_stride, width_of(p), panels.data() + p * w.in_features * max_width);
    }
  });

  const int64_t num_items = num_panels * w.num_row_blocks;
  std::vector<int64_t> cost_prefix(num_items + 1, 0);
  for (int64_t item = 0; item < num_items; ++item) {
    const int64_t p = item / w.num_row_blocks, rb = item % w.num_row_blocks;
    cost_prefix[item + 1] = cost_prefix[item] +
                            width_of(p) * (w.block_nnz(rb) + 2 * w.rows_in_block(rb));
  }
  const int64_t num_chunks = std::min<int64_t>(num_items, at::get_num_threads());
  std::vector<int64_t> chunk_start(num_chunks + 1, num_items);
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t target = cost_prefix[num_items] * c / num_chunks;
    chunk_start[c] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), target) - cost_prefix.begin();
  }
  chunk_start[0] = 0;

  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(static_cast<size_t>(w.row_block * max_width + k.vector_width));
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t item = chunk_start[c]; item < chunk_start[c + 1]; ++item) {
        const int64_t p = item / w.num_row_blocks, rb = item % w.num_row_blocks;
        const int64_t width = width_of(p);
        (is_gemv(p) ? k.spmv_row_block : k.spmm_row_block)(
            w, rb, panels.data() + p * w.in_features * max_width, width, bias, act, tile.data());
        const int64_t first_row = rb * w.row_block;
        k.unpack_tile(tile.data(), w.rows_in_block(rb), width, tokens_in(p),
                      y + p * max_width * w.out_features + first_row, w.out_features);
      }
    }
  });
}

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const PackedLinearView w = checked_view(packed);
  const Activation act = parse_activation(activation);
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat && input.device().is_cpu(),
                    "sparsecpu::linear: input must be a float32 CPU tensor, got ",
                    input.scalar_type(), " on ", input.device());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == w.in_features,
                    "sparsecpu::linear: input of shape ", input.sizes(), " does not end in in_features=",
                    w.in_features, " of the packed weight");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == w.out_features && weight.size(1) == w.in_features,
                    "sparsecpu::linear: weight of shape ", weight.sizes(),
                    " does not match the packed weight [", w.out_features, ", ", w.in_features, "]");
  at::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == w.out_features,
                      "sparsecpu::linear: bias must be float32 of shape [", w.out_features, "], got ",
                      bias->scalar_type(), " of shape ", bias->sizes());
    bias_c = bias->contiguous();
  }
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().end());
  out_sizes.back() = w.out_features;
  at::Tensor y = at::empty(out_sizes, input.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor x2d = input.reshape({-1, w.in_features});
  const int64_t tokens = x2d.size(0);
  if (tokens == 0 || w.out_features == 0) return y;
  sparse_linear_2d(w, x2d.data_ptr<float>(), tokens, x2d.stride(0), x2d.stride(1),
                   bias_c.defined() ? bias_c.data_ptr<float>() : nullptr, act, y.data_ptr<float>());
  return y;
}

at::Tensor pack_linear_cpu(const at::Tensor& weight, int64_t k_block, int64_t row_block) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
                    "sparsecpu::pack_linear: weight must be a 2-D float32 CPU tensor, got ",
                    weight.scalar_type(), " of shape ", weight.sizes(), " on ", weight.device());
  TORCH_CHECK_VALUE(k_block >= 0, "sparsecpu::pack_linear: k_block must be >= 0 (0: no K-blocking), got ", k_block);
  TORCH_CHECK_VALUE(row_block >= 1, "sparsecpu::pack_linear: row_block must be >= 1, got ", row_block);
  TORCH_CHECK_VALUE(weight.numel() < (int64_t{1} << 30),
                    "sparsecpu::pack_linear: weights of 2^30 or more elements are not supported");
  const at::Tensor w = weight.contiguous();
  std::vector<int32_t> words = kernels::pack_linear_f32(w.data_ptr<float>(), w.size(0), w.size(1),
                                                        w.size(1), k_block, row_block);
  at::Tensor packed = at::empty({static_cast<int64_t>(words.size())}, weight.options().dtype(at::kInt));
  std::copy(words.begin(), words.end(), packed.data_ptr<int32_t>());
  return packed;
}

}  // namespace

TORCH_LIBRARY(sparsecpu, m) {
  m.def("pack_linear(Tensor weight, int k_block=128, int row_block=32) -> Tensor");
  m.def("linear(Tensor input, Tensor weight, Tensor packed, Tensor? bias=None, str activation=\"none\") -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsecpu, CPU, m) {
  m.impl("pack_linear", &pack_linear_cpu);
  m.impl("linear", &linear_cpu);
}

}  // namespace sparsecpu
