// What one build of a compiled graph baked in (torch_sparsecpu/backend.py), checked
// before every call of the graph: in C++ because a ResNet-50 build watches about 160
// tensors and compares the values of about 100 more, which cost about 0.6 ms a call as
// Python, 14 us here, 88 us right after a forward (docs/architecture.md, what the Python
// wrapper watches).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "tensor_identity.h"

namespace sparsecpu {

class BakedTensors {
 public:
  // The tensors a build depends on, each read from the graph's argument input_index
  // (>= 0) or, at -1, a constant of the build (held here):
  // - watched: any change of identity (or, for an argument, the tensor it was built from
  //   dying: another may have its address by now) makes the build stale;
  // - compared: small tensors whose values the build copied (folded batch norms'
  //   statistics, which a training-mode batch norm updates in place without bumping their
  //   version): any change of value (bit for bit) makes it stale.
  BakedTensors(const std::vector<at::Tensor>& watched, std::vector<int64_t> watched_inputs,
               const std::vector<at::Tensor>& compared, std::vector<int64_t> compared_inputs);

  // Whether any of them changed, given the call's arguments, borrowed: arguments[i] is
  // argument i, or null when it is not a tensor (then stale). Borrowed rather than copied,
  // for a copy bumps the reference count in each TensorImpl, one cache miss after another.
  bool stale(const std::vector<const at::Tensor*>& arguments) const;

 private:
  struct Watched {
    int64_t input_index;
    at::Tensor constant;  // undefined for an argument
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> built_from;
    TensorIdentity identity;
    uint32_t version;
    bool matches(const at::Tensor& tensor) const;
  };
  struct Compared {
    int64_t input_index;
    at::Tensor constant;
    at::Tensor values;  // a contiguous copy, taken when the build was made
  };
  std::vector<Watched> watched_;
  std::vector<Compared> compared_;
};

}  // namespace sparsecpu
