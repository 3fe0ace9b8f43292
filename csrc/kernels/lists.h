// The lists every layer shares, each declared once: the fused activations, the ISAs
// and the register tiles. Each list is an X-macro: X is applied to every entry, and
// the enum, name tables, kernel switches, dispatch table, kernel names, the ops'
// accepted strings and the tuples Python reads (_C.ACTIVATIONS, _C.ISAS) are all
// generated from it. Torch-free, so every ISA's kernel file can include it.
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

// ---- ISAs --------------------------------------------------------------------------
// X(name, table, cpu_has, may_default): the kernel table `table` (a SpmmKernels defined
// in spmm_f32__<name>.cpp) runs where the expression `cpu_has` is true (evaluated after
// __builtin_cpu_init, in dispatch.cpp). Listed from the least capable to the most: the
// default is the last one the CPU supports whose `may_default` is true. The features
// must match the file's `#pragma GCC target`. vec16 (16-lane generic vectors, no
// target) runs everywhere but is never the default: it is there so the tests run the
// width-16 kernel logic on CPUs without AVX-512 (force_isa / TORCH_SPARSECPU_ISA).
#define SPARSECPU_CPU_HAS(feature) __builtin_cpu_supports(feature)
#define SPARSECPU_FOR_EACH_ISA(X)                                                          \
  X(scalar, kSpmmScalar, true, true)                                                       \
  X(vec16, kSpmmVec16, true, false)                                                        \
  X(avx2, kSpmmAvx2, SPARSECPU_CPU_HAS("avx2") && SPARSECPU_CPU_HAS("fma"), true)          \
  X(avx512, kSpmmAvx512,                                                                   \
    SPARSECPU_CPU_HAS("avx512f") && SPARSECPU_CPU_HAS("avx512dq") &&                       \
        SPARSECPU_CPU_HAS("avx512bw") && SPARSECPU_CPU_HAS("avx512vl") && SPARSECPU_CPU_HAS("fma"), \
    true)

constexpr const char* kIsaNames[] = {
#define SPARSECPU_NAME(name, table, cpu_has, may_default) #name,
    SPARSECPU_FOR_EACH_ISA(SPARSECPU_NAME)
#undef SPARSECPU_NAME
};
constexpr size_t kNumIsas = sizeof(kIsaNames) / sizeof(kIsaNames[0]);

// ---- register tiles (SIMD ISAs; the scalar kernels take any width) -----------------
// Each entry is instantiated by spmm_f32_simd-inl.h for every SIMD ISA and named by
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

// Registers of tokens in a full panel (1 x 1 blocks).
constexpr int kMaxTileVectors = static_cast<int>(sizeof(lists::kTiles) / sizeof(int));
// Registers of tokens in one strip of a tall tile.
constexpr int kTallStripVectors = static_cast<int>(sizeof(lists::kTallTiles) / sizeof(int));
// Panels this narrow or narrower run the sparse GEMV kernels (spmv_row_block).
constexpr int64_t kMaxGemvTokens = static_cast<int64_t>(sizeof(lists::kGemvTiles) / sizeof(int));

}  // namespace kernels
}  // namespace sparsecpu
