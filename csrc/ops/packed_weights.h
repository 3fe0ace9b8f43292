// Packed buffers belong to the weight they were packed from. A compiled graph holds
// one packed buffer per layer, but Dynamo runs that graph for every instance of a
// module class compiled on its own (regional compilation), and weights may be
// edited in place or swapped (`weight.data = ...`) after packing. The ops therefore
// never trust a buffer for a weight other than the one it first ran with, as it was
// then: for any other (weight, version) they run a buffer packed from that weight,
// once, with the same block sizes, and kept for as long as the weight lives.
#pragma once

#include <ATen/ATen.h>

namespace sparsecpu {

// The packed buffer to run `weight` (2-D, or a convolution's 4-D weight) with:
// `packed` itself when `weight` is the tensor `packed` first ran with, unchanged since
// (same storage, offset, sizes, strides and version), or when `packed` is new to the
// ops; else the buffer packed from `weight` as it is now. A `weight_transposed` weight
// is [in, out] and runs with a buffer packed from `weight.t()`; its identity is the
// weight's own (so its version counter, which a view made here would not share) and
// that flag. Thread-safe; the lookup costs two hash-table probes.
at::Tensor packed_for(const at::Tensor& weight, const at::Tensor& packed, bool weight_transposed = false);

// How many buffers packed_for has packed so far (tests, debugging).
int64_t repacked_weights();

}  // namespace sparsecpu
