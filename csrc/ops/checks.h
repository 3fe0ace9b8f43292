// Argument and packed-buffer validation shared by the ops (checks.cpp). Every check
// throws c10::ValueError (ValueError in Python) with a message naming the op and the
// argument; nothing here touches the kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../kernels/spmm.h"

namespace sparsecpu {

// The activation a name of lists.h's list stands for; throws for any other name.
kernels::Activation parse_activation(c10::string_view name);

// A view of a packed buffer made by sparsecpu::pack_linear; its contents are checked
// in full the first time the buffer is seen (and after any in-place change of it).
kernels::PackedLinearView checked_view(const at::Tensor& packed);

// Checks one layer's 2-D weight and bias against its packed buffer; returns the bias
// as a contiguous tensor (undefined when absent).
at::Tensor checked_bias(const kernels::PackedLinearView& w, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const char* op);

// A float32 CPU input of rank >= 1 whose last dimension is in_features.
void check_input(const at::Tensor& input, int64_t in_features, const char* op);

// The float data of a defined tensor, else null (an absent bias).
const float* data_or_null(const at::Tensor& t);

}  // namespace sparsecpu
