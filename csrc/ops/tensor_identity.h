// What a tensor reads, and its version: how the ops tell that a packed buffer still
// belongs to its weight (packed_weights.cpp) and how a compiled graph's build tells
// that the tensors it baked in are unchanged (baked_tensors.cpp). The same fields as
// torch_sparsecpu.passes.packed_cache.tensor_identity on the Python side.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <functional>

namespace sparsecpu {

// What a tensor reads: its storage, the address of its first element (the storage
// offset included), sizes and strides (up to 4 dimensions: weights, biases and
// batch-norm statistics), and for a weight whether the op reads it transposed (a
// [in, out] weight). Whoever keeps an identity holds the storage by a weak reference,
// so its StorageImpl cannot be reused by another tensor meanwhile (the address alone
// could be).
struct TensorIdentity {
  const c10::StorageImpl* storage = nullptr;
  const void* data = nullptr;
  int64_t dim = 0;
  std::array<int64_t, 4> sizes{};
  std::array<int64_t, 4> strides{};
  bool transposed = false;

  bool operator==(const TensorIdentity& other) const {
    return storage == other.storage && data == other.data && dim == other.dim && sizes == other.sizes &&
           strides == other.strides && transposed == other.transposed;
  }
};

struct TensorIdentityHash {
  size_t operator()(const TensorIdentity& id) const {
    size_t hash = (std::hash<const void*>()(id.storage) * 31 + std::hash<const void*>()(id.data)) * 2 + id.transposed;
    for (int64_t d = 0; d < id.dim; ++d) hash = (hash * 31 + static_cast<size_t>(id.sizes[d])) * 31 + static_cast<size_t>(id.strides[d]);
    return hash;
  }
};

// Inference tensors carry no version counter (and cannot be edited outside inference mode).
inline uint32_t version_of(const at::Tensor& t) { return t.is_inference() ? 0 : static_cast<uint32_t>(t._version()); }

// *id for `t`; false for a tensor without storage or of more than 4 dimensions.
inline bool identify(const at::Tensor& t, TensorIdentity* id) {
  if (!t.has_storage() || t.dim() > 4) return false;
  id->storage = t.storage().unsafeGetStorageImpl();
  id->data = t.data_ptr();
  id->dim = t.dim();
  for (int64_t d = 0; d < t.dim(); ++d) {
    id->sizes[d] = t.size(d);
    id->strides[d] = t.stride(d);
  }
  return true;
}

}  // namespace sparsecpu
