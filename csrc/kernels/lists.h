// The lists every layer shares, each declared once: the fused activations, the
// datatypes of packed buffers, the ISAs and the register tiles. Each list is an
// X-macro: X is applied to every entry, and the enum, name tables, kernel switches,
// dispatch table, kernel names, the ops' accepted strings and the tuples Python reads
// (_C.ACTIVATIONS, _C.DATATYPES, _C.ISAS) are all generated from it. Torch-free, so every ISA's kernel file can include it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sparsecpu {
namespace kernels {

// ---- activations -----------------------------------------------------------------
// X(enumerator, name): `name` is the string the ops accept and the suffix of the
// functions that compute it, which must exist or the build fails: activate_<name> in
// spmm_f32_simd-inl.h (Vec) and spmm_f32__scalar.cpp (float), backward_<name> in
// csrc/ops/autograd.cpp (its gradient). kNone comes first: the value 0 of the enum.
#define SPARSECPU_FOR_EACH_ACTIVATION(X) \
  X(kNone, none)                         \
  X(kRelu, relu)                         \
  X(kGeluErf, gelu)                      \
  X(kGeluTanh, gelu_tanh)                \
  X(kSilu, silu)                         \
  X(kRelu6, relu6)                       \
  X(kHardswish, hardswish)

enum class Activation : int {
#define SPARSECPU_ENUMERATOR(e, name) e,
  SPARSECPU_FOR_EACH_ACTIVATION(SPARSECPU_ENUMERATOR)
#undef SPARSECPU_ENUMERATOR
};

constexpr const char* kActivationNames[] = {
#define SPARSECPU_NAME(e, name) #name,
    SPARSECPU_FOR_EACH_ACTIVATION(SPARSECPU_NAME)
#undef SPARSECPU_NAME
};
constexpr size_t kNumActivations = sizeof(kActivationNames) / sizeof(kActivationNames[0]);

// `return activate_<name>(x);` for the activation `act`: the body of every ISA's
// activate(), which the scalar and SIMD kernels each define over their own type (its
// argument must be named x).
#define SPARSECPU_CASE_RETURN_ACTIVATE(e, name) \
  case Activation::e:                           \
    return activate_##name(x);
#define SPARSECPU_RETURN_ACTIVATED(act, x)                             \
  switch (act) { SPARSECPU_FOR_EACH_ACTIVATION(SPARSECPU_CASE_RETURN_ACTIVATE) } \
  return x

// ---- datatypes ---------------------------------------------------------------------
// X(enumerator, name, kernel_prefix): what a packed buffer's values are (its header word
// `datatype` holds the enumerator's value, docs/packed_format.md). `name` is what
// ops.packed_info reports and ops.pack_linear's `quantize` accepts (f32: quantize=None);
// kernel_prefix starts the names of its kernels, XNNPACK-style: qd8_f32_qc8w is dynamically
// quantized 8-bit activations (qd8), fp32 output, int8 weights quantized per output row
// (qc8w). kF32 comes first: the value 0.
#define SPARSECPU_FOR_EACH_DATATYPE(X) \
  X(kF32, f32, f32)                     \
  X(kInt8, int8, qd8_f32_qc8w)

enum class Datatype : int {
#define SPARSECPU_ENUMERATOR(e, name, prefix) e,
  SPARSECPU_FOR_EACH_DATATYPE(SPARSECPU_ENUMERATOR)
#undef SPARSECPU_ENUMERATOR
};

constexpr const char* kDatatypeNames[] = {
#define SPARSECPU_NAME(e, name, prefix) #name,
    SPARSECPU_FOR_EACH_DATATYPE(SPARSECPU_NAME)
#undef SPARSECPU_NAME
};
constexpr const char* kDatatypeKernelPrefixes[] = {
#define SPARSECPU_PREFIX(e, name, prefix) #prefix,
    SPARSECPU_FOR_EACH_DATATYPE(SPARSECPU_PREFIX)
#undef SPARSECPU_PREFIX
};
constexpr size_t kNumDatatypes = sizeof(kDatatypeNames) / sizeof(kDatatypeNames[0]);

// ---- ISAs --------------------------------------------------------------------------
// X(name, f32_table, int8_table, cpu_has, may_default): the ISA `name` runs fp32 buffers
// with the kernel table `f32_table` (a SpmmKernels defined in spmm_f32__<isa>.cpp) and
// int8 buffers with `int8_table` (a Qd8Kernels of spmm_qd8__<isa>.cpp), where the
// expression `cpu_has` is true. Both table expressions and cpu_has are evaluated after
// __builtin_cpu_init, in dispatch.cpp: avx512 runs the VNNI int8 kernels (vpdpbusd) where
// the CPU has AVX512-VNNI and the AVX2 ones elsewhere (every AVX-512 CPU has AVX2). Listed
// from the least capable to the most: the default is the last one the CPU supports whose
// `may_default` is true. The features must match the files' `#pragma GCC target`. vec16
// (16-lane generic vectors, no target) runs everywhere but is never the default: it is
// there so the tests run the width-16 kernel logic on CPUs without AVX-512 (force_isa /
// TORCH_SPARSECPU_ISA); its int8 buffers run the scalar kernels.
#define SPARSECPU_CPU_HAS(feature) __builtin_cpu_supports(feature)
#define SPARSECPU_FOR_EACH_ISA(X)                                                          \
  X(scalar, kSpmmScalar, kQd8Scalar, true, true)                                           \
  X(vec16, kSpmmVec16, kQd8Scalar, true, false)                                            \
  X(avx2, kSpmmAvx2, kQd8Avx2, SPARSECPU_CPU_HAS("avx2") && SPARSECPU_CPU_HAS("fma"), true) \
  X(avx512, kSpmmAvx512, (SPARSECPU_CPU_HAS("avx512vnni") ? kQd8Avx512Vnni : kQd8Avx2),    \
    SPARSECPU_CPU_HAS("avx512f") && SPARSECPU_CPU_HAS("avx512dq") &&                       \
        SPARSECPU_CPU_HAS("avx512bw") && SPARSECPU_CPU_HAS("avx512vl") && SPARSECPU_CPU_HAS("fma"), \
    true)

constexpr const char* kIsaNames[] = {
#define SPARSECPU_NAME(name, f32_table, int8_table, cpu_has, may_default) #name,
    SPARSECPU_FOR_EACH_ISA(SPARSECPU_NAME)
#undef SPARSECPU_NAME
};
constexpr size_t kNumIsas = sizeof(kIsaNames) / sizeof(kIsaNames[0]);

// ---- register tiles (SIMD ISAs; the scalar kernels take any width) -----------------
// Each entry is instantiated by spmm_f32_simd-inl.h (SPARSECPU_FOR_EACH_TILE and the
// GEMV list by spmm_qd8_simd-inl.h too) for every SIMD ISA and named by
// spmm_kernel_names; every list must be 1, 2, ..., its largest entry.
//
// 1 x 1 blocks: 1 row x V registers of tokens, the whole panel: a full panel is the
// widest (8 accumulators hide the FMA latency on AVX2 and AVX-512).
#define SPARSECPU_FOR_EACH_TILE(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)
// kTallBlockRows x 1 blocks: kTallBlockRows rows x V registers, in strips of the widest
// across the panel (12 accumulators + 3 activations + 1 broadcast = AVX2's 16
// registers); a narrower entry takes the rest of the panel.
#define SPARSECPU_FOR_EACH_TALL_TILE(X) X(1) X(2) X(3)
// GEMV: a narrow panel of N tokens, unpadded (spmv_row_block), for each N.
#define SPARSECPU_FOR_EACH_GEMV_TILE(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

namespace lists {
#define SPARSECPU_ENTRY(n) n,
constexpr int kTiles[] = {SPARSECPU_FOR_EACH_TILE(SPARSECPU_ENTRY)};
constexpr int kTallTiles[] = {SPARSECPU_FOR_EACH_TALL_TILE(SPARSECPU_ENTRY)};
constexpr int kGemvTiles[] = {SPARSECPU_FOR_EACH_GEMV_TILE(SPARSECPU_ENTRY)};
#undef SPARSECPU_ENTRY

template <size_t N>
constexpr bool counts_from_one(const int (&entries)[N]) {
  for (size_t i = 0; i < N; ++i) {
    if (entries[i] != static_cast<int>(i) + 1) return false;
  }
  return true;
}
static_assert(counts_from_one(kTiles) && counts_from_one(kTallTiles) && counts_from_one(kGemvTiles),
              "a tile list must be 1, 2, ..., its largest entry");
}  // namespace lists

// Registers of tokens in a full panel (1 x 1 blocks; the int8 kernels' 1 x 4 and 1 x 1
// blocks too, a register holding 4 features of each of its tokens).
constexpr int kMaxTileVectors = static_cast<int>(sizeof(lists::kTiles) / sizeof(int));
// Registers of tokens in one strip of a tall tile.
constexpr int kTallStripVectors = static_cast<int>(sizeof(lists::kTallTiles) / sizeof(int));
// Panels this narrow or narrower run the sparse GEMV kernels (spmv_row_block).
constexpr int64_t kMaxGemvTokens = static_cast<int64_t>(sizeof(lists::kGemvTiles) / sizeof(int));

}  // namespace kernels
}  // namespace sparsecpu
