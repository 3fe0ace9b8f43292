// Weights packed for conv_chain's tap layout (tap_weights.h), cached per weight.
#include "tap_weights.h"

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace sparsecpu {
namespace {

at::Tensor pack_taps(const at::Tensor& weight, const kernels::PackedLinearView& like, int64_t pitch,
                     int64_t feature_stride, int64_t plane_stride, int64_t phases) {
  const at::Tensor w = weight.detach().to(at::kFloat).contiguous();
  const int64_t out = w.size(0), channels = w.size(1), kernel_h = w.size(2), kernel_w = w.size(3);
  const int64_t features_per_plane = plane_stride / feature_stride, features_per_pitch = pitch / feature_stride;
  const int64_t features = channels * phases * kernel_w * features_per_plane;
  std::vector<float> dense(static_cast<size_t>(out * features), 0.0f);
  const float* values = w.data_ptr<float>();
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t i = 0; i < kernel_h; ++i) {
        for (int64_t j = 0; j < kernel_w; ++j) {
          const int64_t plane = (c * phases + i % phases) * kernel_w + j;
          const int64_t feature = plane * features_per_plane + i / phases * features_per_pitch;
          dense[o * features + feature] = values[((o * channels + c) * kernel_h + i) * kernel_w + j];
        }
      }
    }
  }
  // K-blocks of as many channels as the plain packing's hold (its cache behaviour per panel).
  const int64_t channels_per_block = std::max<int64_t>(1, like.k_block / (kernel_h * kernel_w));
  const int64_t k_block = std::min(kernels::kMaxKBlock, channels_per_block * phases * kernel_w * features_per_plane);
  kernels::PackOptions options = kernels::pack_options_of(like);
  options.k_block = k_block;
  std::vector<int32_t> words = kernels::pack_linear(dense.data(), out, features, features, options);
  at::Tensor packed = at::empty({static_cast<int64_t>(words.size())}, at::TensorOptions().dtype(at::kInt));
  std::copy(words.begin(), words.end(), packed.data_ptr<int32_t>());
  return packed;
}

// Cached packings, keyed by what the weight reads and the geometry, each valid while the
// weight's storage lives and its version is the one packed.
class TapWeights {
 public:
  at::Tensor get(const at::Tensor& weight, const kernels::PackedLinearView& like, int64_t pitch,
                 int64_t feature_stride, int64_t plane_stride, int64_t phases) {
    const Key key{weight.storage().unsafeGetStorageImpl(), weight.data_ptr(),
                  {pitch, feature_stride, plane_stride, phases, like.k_block, like.row_block, like.block_rows}};
    const uint32_t version = weight.is_inference() ? 0 : static_cast<uint32_t>(weight._version());
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = cache_.find(key);
    if (it != cache_.end() && it->second.version == version && !it->second.storage.expired()) {
      return it->second.packed;
    }
    if (cache_.size() >= 64) {
      for (auto e = cache_.begin(); e != cache_.end();) {
        e = e->second.storage.expired() ? cache_.erase(e) : std::next(e);
      }
    }
    at::Tensor packed = pack_taps(weight, like, pitch, feature_stride, plane_stride, phases);
    cache_.insert_or_assign(key, Entry{weight.storage().getWeakStorageImpl(), version, packed});
    return packed;
  }

 private:
  struct Key {
    const c10::StorageImpl* storage;
    const void* data;
    std::array<int64_t, 7> geometry;
    bool operator<(const Key& other) const {
      return std::tie(storage, data, geometry) < std::tie(other.storage, other.data, other.geometry);
    }
  };
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    uint32_t version;
    at::Tensor packed;
  };
  std::mutex mutex_;
  std::map<Key, Entry> cache_;
};

}  // namespace

at::Tensor tap_packed_weight(const at::Tensor& weight, const kernels::PackedLinearView& like, int64_t pitch,
                             int64_t feature_stride, int64_t plane_stride, int64_t phases) {
  static TapWeights* cache = new TapWeights();  // never destroyed: ops may run at exit
  return cache->get(weight, like, pitch, feature_stride, plane_stride, phases);
}

}  // namespace sparsecpu
