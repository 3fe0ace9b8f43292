// Portable 16-lane kernels: the kernel template of the AVX-512 table (16 floats per
// register, register tiles of 1 row x 16..128 tokens, 4-row strips, GEMV lanes, masked
// loads and tails) on GCC's generic vectors, with no intrinsics and no `#pragma GCC
// target`: compiled for the base ISA of the build, it runs on any x86-64 CPU. What it is
// for: exercising the width-16 logic of spmm_f32_simd-inl.h where no AVX-512 CPU exists
// (the tests and the fuzzer run every ISA of available_isas()); only the intrinsic
// wrappers of spmm_f32__avx512.cpp then stay unexercised. Never the default ISA
// (lists.h): GCC lowers each 64-byte vector operation to several SSE2 ones, and FMA is a
// multiply and an add, rounded twice.
#include <cmath>
#include <cstring>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {
namespace {

// 16-byte aligned, the most the base ISA's loads use: a 64-byte aligned vector argument
// changes the calling convention between builds with and without AVX-512, which GCC
// reports (-Wpsabi) for every function taking one.
typedef float Floats16 __attribute__((vector_size(64), aligned(16)));
typedef int32_t Ints16 __attribute__((vector_size(64), aligned(16)));
typedef uint32_t Uints16 __attribute__((vector_size(64), aligned(16)));

struct Vec {
  // Wrapped in structs, which are passed in memory: a bare vector of 64 bytes passed or
  // returned by value is another -Wpsabi error without AVX-512.
  struct T {
    Floats16 v;
  };
  static constexpr int64_t kWidth = 16;
  static T zero() { return {Floats16{}}; }
  static T set1(float v) { return {Floats16{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}}; }  // not 0 + v: -0.0
  static T load(const float* p) {  // unaligned
    T v;
    std::memcpy(&v.v, p, sizeof(v.v));
    return v;
  }
  static void store(float* p, T v) { std::memcpy(p, &v.v, sizeof(v.v)); }
  static T add(T a, T b) { return {a.v + b.v}; }
  static T mul(T a, T b) { return {a.v * b.v}; }
  static T div(T a, T b) { return {a.v / b.v}; }
  static T fma(T a, T b, T c) { return {a.v * b.v + c.v}; }
  // As minps / maxps: the second operand where either is NaN.
  static T min(T a, T b) { return {a.v < b.v ? a.v : b.v}; }
  static T max(T a, T b) { return {a.v > b.v ? a.v : b.v}; }
  static T xor_(T a, T b) {
    return {reinterpret_cast<Floats16>(reinterpret_cast<Uints16>(a.v) ^ reinterpret_cast<Uints16>(b.v))};
  }
  static T floor(T a) {
    for (int i = 0; i < kWidth; ++i) a.v[i] = std::floor(a.v[i]);
    return a;
  }
  // 2^n for an integer-valued n; NaN lanes (exp of NaN) as n = 0, since converting a
  // NaN to an integer is undefined (the result is NaN anyway).
  static T pow2(T n) {
    const Floats16 finite = n.v == n.v ? n.v : Floats16{};
    const Uints16 biased = reinterpret_cast<Uints16>(__builtin_convertvector(finite, Ints16) + 127);
    return {reinterpret_cast<Floats16>(biased << 23)};
  }
  // The first n lanes, -1 in the lanes taken (masked lanes are neither read nor written).
  struct Mask {
    Ints16 lanes;
  };
  static Mask first(int n) {
    const Ints16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return {lanes < n};
  }
  static T load_first(const float* p, Mask m) {
    T v = zero();
    for (int i = 0; i < kWidth; ++i) {
      if (m.lanes[i]) v.v[i] = p[i];
    }
    return v;
  }
  static void store_first(float* p, T v, Mask m) {
    for (int i = 0; i < kWidth; ++i) {
      if (m.lanes[i]) p[i] = v.v[i];
    }
  }
};

#include "spmm_f32_simd-inl.h"

}  // namespace

const SpmmKernels kSpmmVec16 = {"vec16", Vec::kWidth, Vec::kWidth * kMaxTileVectors,
                                &pack_panel_scalar, &spmm_row_block_simd, &spmv_row_block_simd,
                                &unpack_tile_scalar, &depthwise_row_simd, &residual_row_simd,
                                &copy_row_simd, &copy_rows_simd};

}  // namespace kernels
}  // namespace sparsecpu
