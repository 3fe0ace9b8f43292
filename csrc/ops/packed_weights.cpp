// Which packed buffer an op runs a weight with (packed_weights.h).
#include "packed_weights.h"

#include <algorithm>
#include <array>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../kernels/spmm.h"
#include "tensor_identity.h"

namespace sparsecpu {
namespace {

// A weight repacked here, and the layout it was packed in (the block sizes, block shape
// and datatype of the buffer it stands in for): one weight run by buffers of two layouts
// (a prefill graph's fp32 buffer and a decode graph's int8 one) has a repack of each,
// and neither is handed to the other's op.
struct RepackKey {
  TensorIdentity weight;
  std::array<int64_t, 5> layout{};  // k_block, row_block, block_rows, block_cols, datatype

  bool operator==(const RepackKey& other) const { return weight == other.weight && layout == other.layout; }
};

struct RepackKeyHash {
  size_t operator()(const RepackKey& key) const {
    size_t hash = TensorIdentityHash()(key.weight);
    for (int64_t value : key.layout) hash = hash * 31 + static_cast<size_t>(value);
    return hash;
  }
};

// Two tables, guarded by one mutex:
// - the weight each packed buffer was first used with (keyed by the buffer's storage),
//   as it was then: a call with another weight, or with that weight since edited,
//   does not run the buffer;
// - buffers packed here for such weights (keyed by what the weight reads and the layout
//   of the buffer they stand in for), valid
//   while the weight's version is the one they were packed at.
// As the tables grow, first uses of dead buffers and repacks of dead weights are swept.
class PackedWeights {
 public:
  at::Tensor packed_for(const at::Tensor& weight, const at::Tensor& packed, bool weight_transposed) {
    TensorIdentity weight_id, packed_id;
    if (!identify(weight, &weight_id) || !identify(packed, &packed_id)) return packed;
    weight_id.transposed = weight_transposed;
    const uint32_t weight_version = version_of(weight), packed_version = version_of(packed);
    std::lock_guard<std::mutex> guard(mutex_);
    auto first_use = first_weight_.find(packed_id.storage);
    if (first_use == first_weight_.end() || first_use->second.packed_storage.expired() ||
        first_use->second.packed_version != packed_version) {
      // A buffer not seen before (or edited since): it is trusted for the weight of this
      // call, as the ops have always trusted their caller on the first call.
      sweep_if_grown();
      first_weight_.insert_or_assign(packed_id.storage,
                                     FirstUse{packed.storage().getWeakStorageImpl(), packed_version, weight_id,
                                              weight.storage().getWeakStorageImpl(), weight_version});
      return packed;
    }
    const FirstUse& use = first_use->second;
    if (use.weight == weight_id && use.weight_version == weight_version && !use.weight_storage.expired()) {
      return packed;
    }
    kernels::PackedLinearView view;
    if (!view_of(packed, &view)) return packed;  // not a packed buffer: the op's checks report it
    const kernels::PackOptions layout = kernels::pack_options_of(view);
    const RepackKey key{weight_id,
                        {layout.k_block, layout.row_block, layout.block_rows, layout.block_cols,
                         static_cast<int64_t>(layout.datatype)}};
    auto cached = repacked_.find(key);
    if (cached != repacked_.end() && cached->second.version == weight_version && !cached->second.weight_storage.expired()) {
      return cached->second.packed;
    }
    sweep_if_grown();
    at::Tensor fresh = repack_like(weight_transposed ? weight.t() : weight, packed, view);
    if (!fresh.defined()) return packed;  // not a weight this buffer could hold: the op's checks report it
    repacked_.insert_or_assign(key, Repacked{weight.storage().getWeakStorageImpl(), weight_version, fresh});
    ++repacked_count_;
    return fresh;
  }

  int64_t repacked_count() {
    std::lock_guard<std::mutex> guard(mutex_);
    return repacked_count_;
  }

 private:
  struct FirstUse {
    c10::weak_intrusive_ptr<c10::StorageImpl> packed_storage;
    uint32_t packed_version;
    TensorIdentity weight;
    c10::weak_intrusive_ptr<c10::StorageImpl> weight_storage;
    uint32_t weight_version;
  };
  struct Repacked {
    c10::weak_intrusive_ptr<c10::StorageImpl> weight_storage;
    uint32_t version;
    at::Tensor packed;
  };

  // The header of `packed` (its sizes and layout); false when it is no packed buffer.
  static bool view_of(const at::Tensor& packed, kernels::PackedLinearView* view) {
    if (packed.scalar_type() != at::kInt || packed.dim() != 1 || !packed.is_contiguous()) return false;
    std::string error;
    return kernels::view_packed_linear(packed.data_ptr<int32_t>(), packed.numel(), /*check_contents=*/false, view,
                                       &error);
  }

  // `weight` (2-D, or a convolution's 4-D weight as [out, in x kernel]) packed with
  // the block sizes, block shape and datatype of `packed` (`view`: an int8 buffer is
  // quantized again); undefined when the shapes or dtype do not fit.
  static at::Tensor repack_like(const at::Tensor& weight, const at::Tensor& packed,
                                const kernels::PackedLinearView& view) {
    if (weight.scalar_type() != at::kFloat || !weight.device().is_cpu() || (weight.dim() != 2 && weight.dim() != 4)) {
      return {};
    }
    const at::Tensor matrix = weight.detach().flatten(1).contiguous();
    if (matrix.size(0) != view.out_features || matrix.size(1) != view.in_features) return {};
    TORCH_CHECK_VALUE(view.datatype != kernels::Datatype::kInt8 || at::isfinite(matrix).all().item<bool>(),
                      "sparsecpu: the weight of an int8 packed buffer was edited to hold a NaN or an infinity, "
                      "which int8 cannot quantize");
    std::vector<int32_t> words = kernels::pack_linear(matrix.data_ptr<float>(), matrix.size(0), matrix.size(1),
                                                      matrix.size(1), kernels::pack_options_of(view));
    at::Tensor fresh = at::empty({static_cast<int64_t>(words.size())}, packed.options());
    std::copy(words.begin(), words.end(), fresh.data_ptr<int32_t>());
    return fresh;
  }

  void sweep_if_grown() {
    if (first_weight_.size() + repacked_.size() < sweep_at_) return;
    // A buffer's first use is forgotten only with the buffer: while it lives it stays
    // bound to its weight, even a weight since freed (`weight.data = ...`), or the
    // next call would trust it for whatever weight comes.
    for (auto it = first_weight_.begin(); it != first_weight_.end();) {
      it = it->second.packed_storage.expired() ? first_weight_.erase(it) : std::next(it);
    }
    for (auto it = repacked_.begin(); it != repacked_.end();) {
      it = it->second.weight_storage.expired() ? repacked_.erase(it) : std::next(it);
    }
    sweep_at_ = std::max<size_t>(64, 2 * (first_weight_.size() + repacked_.size()));
  }

  std::mutex mutex_;
  std::unordered_map<const c10::StorageImpl*, FirstUse> first_weight_;
  std::unordered_map<RepackKey, Repacked, RepackKeyHash> repacked_;
  size_t sweep_at_ = 64;
  int64_t repacked_count_ = 0;
};

PackedWeights& tables() {
  static PackedWeights* tables = new PackedWeights();  // never destroyed: ops may run at exit
  return *tables;
}

}  // namespace

at::Tensor packed_for(const at::Tensor& weight, const at::Tensor& packed, bool weight_transposed) {
  return tables().packed_for(weight, packed, weight_transposed);
}

int64_t repacked_weights() { return tables().repacked_count(); }

}  // namespace sparsecpu
