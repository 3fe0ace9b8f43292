#include "baked_tensors.h"

#include <cstring>
#include <utility>
#include <vector>

#include "prefetch.h"

namespace sparsecpu {

namespace {

// Whether `tensor` holds exactly the values of `values` (contiguous, same dtype), bit
// for bit: a NaN equals itself, unlike torch.equal, so a statistic that is NaN does not
// rebuild the graph on every call.
bool same_values(const at::Tensor& tensor, const at::Tensor& values) {
  if (tensor.scalar_type() != values.scalar_type() || tensor.sizes() != values.sizes() || !tensor.device().is_cpu()) {
    return false;
  }
  const at::Tensor now = tensor.is_contiguous() ? tensor : tensor.contiguous();
  return std::memcmp(now.data_ptr(), values.data_ptr(), values.nbytes()) == 0;
}

// The identity of a tensor a build watches; every such tensor has one (at most 4
// dimensions: weights, biases, batch-norm parameters).
TensorIdentity identity_of(const at::Tensor& tensor) {
  TensorIdentity id;
  TORCH_CHECK(identify(tensor, &id), "sparsecpu: a compiled graph cannot watch a tensor of ", tensor.dim(),
              " dimensions", tensor.has_storage() ? "" : " without storage");
  return id;
}

}  // namespace

bool BakedTensors::Watched::matches(const at::Tensor& tensor) const {
  TensorIdentity now;
  return identify(tensor, &now) && now == identity && version_of(tensor) == version;
}

BakedTensors::BakedTensors(const std::vector<at::Tensor>& watched, std::vector<int64_t> watched_inputs,
                           const std::vector<at::Tensor>& compared, std::vector<int64_t> compared_inputs) {
  TORCH_CHECK_VALUE(watched.size() == watched_inputs.size() && compared.size() == compared_inputs.size(),
                    "BakedTensors: one input index per tensor, got ", watched.size(), " watched tensors and ",
                    watched_inputs.size(), " indices, ", compared.size(), " compared tensors and ",
                    compared_inputs.size(), " indices");
  for (size_t i = 0; i < watched.size(); ++i) {
    const bool argument = watched_inputs[i] >= 0;
    watched_.push_back(Watched{watched_inputs[i], argument ? at::Tensor() : watched[i],
                               c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                   watched[i].getIntrusivePtr()),
                               identity_of(watched[i]), version_of(watched[i])});
  }
  for (size_t i = 0; i < compared.size(); ++i) {
    const bool argument = compared_inputs[i] >= 0;
    compared_.push_back(Compared{compared_inputs[i], argument ? at::Tensor() : compared[i],
                                 compared[i].detach().contiguous().clone()});
  }
}

bool BakedTensors::stale(const std::vector<const at::Tensor*>& arguments) const {
  // The tensor a check reads (argument input_index, or at -1 the constant), null when
  // there is none (then stale).
  const auto tensor = [&](int64_t input_index, const at::Tensor& constant) -> const at::Tensor* {
    const at::Tensor* t = nullptr;
    if (input_index < 0) {
      t = &constant;
    } else if (input_index < static_cast<int64_t>(arguments.size())) {
      t = arguments[input_index];
    }
    return t != nullptr && t->defined() ? t : nullptr;
  };
  // The levels of memory the checks read -- TensorImpls, their storages, the compared
  // values -- asked for ahead, each level for all tensors at once: after a forward they
  // are out of the caches, and checked one at a time each tensor would wait for its
  // misses in turn (docs/architecture.md).
  std::vector<const at::Tensor*> now;
  now.reserve(watched_.size() + compared_.size());
  for (const Watched& w : watched_) now.push_back(tensor(w.input_index, w.constant));
  for (const Compared& c : compared_) now.push_back(tensor(c.input_index, c.constant));
  const auto each_tensor = [&](auto f) {
    for (const at::Tensor* t : now) {
      if (t != nullptr && t->has_storage()) f(*t);
    }
    for (const Compared& c : compared_) f(c.values);
  };
  each_tensor([](const at::Tensor& t) { prefetch_lines(t.unsafeGetTensorImpl(), sizeof(c10::TensorImpl)); });
  each_tensor([](const at::Tensor& t) { prefetch_lines(t.storage().unsafeGetStorageImpl(), sizeof(c10::StorageImpl)); });
  each_tensor([](const at::Tensor& t) { __builtin_prefetch(t.storage().data()); });
  for (size_t i = 0; i < watched_.size(); ++i) {
    const Watched& w = watched_[i];
    if (now[i] == nullptr || (w.input_index >= 0 && w.built_from.expired()) || !w.matches(*now[i])) return true;
  }
  for (size_t i = 0; i < compared_.size(); ++i) {
    const at::Tensor* t = now[watched_.size() + i];
    if (t == nullptr || !same_values(*t, compared_[i].values)) return true;
  }
  return false;
}

}  // namespace sparsecpu
