// Argument and packed-buffer validation (checks.h).
#include "checks.h"

#include <algorithm>
#include <mutex>
#include <string>
#include <unordered_map>

namespace sparsecpu {
using kernels::Activation;
using kernels::PackedLinearView;

Activation parse_activation(c10::string_view name) {
  for (size_t i = 0; i < kernels::kNumActivations; ++i) {
    if (name == kernels::kActivationNames[i]) return static_cast<Activation>(i);
  }
  TORCH_CHECK_VALUE(false, "sparsecpu: unknown activation '", name, "'; expected one of ",
                    kernels::joined(kernels::kActivationNames, kernels::kNumActivations));
}

namespace {

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

}  // namespace

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

at::Tensor checked_bias(const PackedLinearView& w, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == w.out_features && weight.size(1) == w.in_features,
                    op, ": weight of shape ", weight.sizes(), " does not match the packed weight [",
                    w.out_features, ", ", w.in_features, "]");
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == w.out_features,
                    op, ": bias must be float32 of shape [", w.out_features, "], got ",
                    bias->scalar_type(), " of shape ", bias->sizes());
  return bias->contiguous();
}

void check_input(const at::Tensor& input, int64_t in_features, const char* op) {
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat && input.device().is_cpu(), op,
                    ": input must be a float32 CPU tensor, got ", input.scalar_type(), " on ",
                    input.device());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == in_features, op, ": input of shape ",
                    input.sizes(), " does not end in in_features=", in_features, " of the packed weight");
}

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace sparsecpu
