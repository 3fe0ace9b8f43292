// Standalone probe of the AVX2 sparse kernels, one thread, no torch: where does the
// time of one 64-token panel go, and how far is the microkernel from its ceilings?
//
//   make probe                         # builds build/probe_kernels and runs the default case
//   build/probe_kernels OUT IN SPARSITY [K_BLOCK [ROW_BLOCK]]
//
// Prints, each the minimum over interleaved repetitions (the machine is noisy; the
// minimum is the least disturbed run):
//   - the FMA peak of this core (a register-only loop of independent FMAs);
//   - the microkernel's ceiling: one row of 64 nonzeros over a 16 KiB panel that stays
//     in L1, the same inner loop as spmm_f32_1x64 (1 broadcast, 8 loads, 8 FMAs each,
//     the offset masked as the kernel masks it);
//   - one real layer: pack_panel, spmm_row_block over every row block (row block by row
//     block, all K-blocks each), unpack_tile of the whole tile, each timed alone, in
//     GFLOP/s over nonzeros;
//   - the same kernel on a copy of the packed layer whose offsets are folded into the
//     first 64 features of their K-block (a 16 KiB activation slice, which stays in L1
//     but for what the streaming tile rows evict): same segments, nonzeros, partial sums
//     and weight stream, so the difference from the real layer is a lower bound on what
//     L1 misses on the activation slice cost.
// The ATen op adds the schedule of csrc/ops/sparse_layer.cpp on top (threads, groups of row
// blocks unpacked while in cache, per-slice packing of large panels).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "spmm.h"

using sparsecpu::kernels::Activation;
using sparsecpu::kernels::PackedLinearView;
using sparsecpu::kernels::kSpmmAvx2;

namespace {

constexpr int kWidth = 64;  // tokens per panel: spmm_f32_1x64__avx2
constexpr int kRepetitions = 40;

// Cache-line aligned, as the op's scratch buffers are (csrc/ops/sparse_layer.h): a plain
// std::vector's 16-byte alignment splits every other AVX2 load across two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  bool operator==(const CacheLineAllocator&) const { return true; }
  bool operator!=(const CacheLineAllocator&) const { return false; }
};
using AlignedFloats = std::vector<float, CacheLineAllocator<float>>;

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

__attribute__((target("avx2,fma"), noinline)) float fma_peak_loop(long iterations) {
  __m256 acc[10];
  for (int i = 0; i < 10; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 10
    for (int i = 0; i < 10; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  float sum = 0;
  for (int i = 0; i < 10; ++i) sum += acc[i][0];
  return sum;
}

// The 1x64 inner loop over `count` nonzeros of an L1-resident panel, `rows` times.
__attribute__((target("avx2,fma"), noinline)) void ceiling_loop(const float* values, const uint16_t* offsets,
                                                                int count, const float* panel, float* out,
                                                                int rows) {
  for (int r = 0; r < rows; ++r) {
    __m256 acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = _mm256_loadu_ps(out + v * 8);
#pragma GCC unroll 2
    for (int j = 0; j < count; ++j) {
      const __m256 value = _mm256_set1_ps(values[j]);
      const float* x = panel + (offsets[j] & 63u) * kWidth;
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_fmadd_ps(value, _mm256_loadu_ps(x + v * 8), acc[v]);
    }
    for (int v = 0; v < 8; ++v) _mm256_storeu_ps(out + v * 8, acc[v]);
  }
}

// A copy of `packed` in which every offset is folded into the first 64 features of its
// K-block (fewer if the K-block is narrower): the kernel then reads one L1-resident
// 16 KiB slice of a 64-token panel, and nothing else about its work changes.
std::vector<int32_t> with_offsets_in_l1(const std::vector<int32_t>& packed, const PackedLinearView& w) {
  std::vector<int32_t> copy = packed;
  uint16_t* offsets = reinterpret_cast<uint16_t*>(copy.data()) +
                      (w.offsets - reinterpret_cast<const uint16_t*>(packed.data()));
  for (int64_t rb = 0; rb < w.num_row_blocks; ++rb) {
    for (int64_t kb = 0; kb < w.num_k_blocks; ++kb) {
      const int64_t features = std::min<int64_t>({64, w.k_block, w.in_features - kb * w.k_block});
      for (int64_t s = 0; s < w.segments_in_block(rb); ++s) {
        const int64_t segment = w.segment(rb, kb, s);
        for (int32_t j = w.seg_ptr[segment]; j < w.seg_ptr[segment + 1]; ++j) {
          offsets[j] = static_cast<uint16_t>(offsets[j] % features);
        }
      }
    }
  }
  return copy;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s OUT IN SPARSITY [K_BLOCK [ROW_BLOCK]]\n", argv[0]);
    return 2;
  }
  const int out = std::atoi(argv[1]), in = std::atoi(argv[2]);
  const double sparsity = std::atof(argv[3]);
  const int k_block = argc > 4 ? std::atoi(argv[4]) : 256, row_block = argc > 5 ? std::atoi(argv[5]) : 128;  // ops.DEFAULT_ROW_BLOCK
  if (out <= 0 || in <= 0 || !(sparsity >= 0 && sparsity < 1) || k_block < 0 || row_block <= 0) {
    std::fprintf(stderr, "error: need OUT, IN > 0, 0 <= SPARSITY < 1, K_BLOCK >= 0, ROW_BLOCK > 0\n");
    return 2;
  }

  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f), value(-1.0f, 1.0f);
  std::vector<float> weight(static_cast<size_t>(out) * in);
  for (float& w : weight) w = uniform(rng) < sparsity ? 0.0f : value(rng);
  sparsecpu::kernels::PackOptions options;
  options.k_block = k_block;
  options.row_block = row_block;
  const std::vector<int32_t> buffer = sparsecpu::kernels::pack_linear(weight.data(), out, in, in, options);
  PackedLinearView w;
  std::string error;
  if (!sparsecpu::kernels::view_packed_linear(buffer.data(), static_cast<int64_t>(buffer.size()), true, &w, &error)) {
    std::fprintf(stderr, "error: %s\n", error.c_str());
    return 1;
  }

  const std::vector<int32_t> buffer_in_l1 = with_offsets_in_l1(buffer, w);
  PackedLinearView w_in_l1;
  if (!sparsecpu::kernels::view_packed_linear(buffer_in_l1.data(), static_cast<int64_t>(buffer_in_l1.size()), true,
                                              &w_in_l1, &error)) {
    std::fprintf(stderr, "error: %s\n", error.c_str());
    return 1;
  }

  // The panel has the rows the kernel may read (PackedLinearView::panel_rows in spmm.h).
  AlignedFloats x(static_cast<size_t>(kWidth) * in), panel(static_cast<size_t>(kWidth) * w.panel_rows(false)),
      tile(static_cast<size_t>(w.num_row_blocks) * w.row_block * kWidth + 8), y(static_cast<size_t>(kWidth) * out);
  for (float& v : x) v = value(rng);
  AlignedFloats ceiling_panel(64 * kWidth, 1.0f), ceiling_out(kWidth, 0.0f);
  std::vector<float> ceiling_values(64, 0.5f);
  std::vector<uint16_t> ceiling_offsets(64);
  for (uint16_t& o : ceiling_offsets) o = static_cast<uint16_t>(rng() % 64);

  const long peak_iterations = 20'000'000;
  const int ceiling_rows = 20'000;
  const auto& k = kSpmmAvx2;
  double best[6] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9};  // peak, ceiling, pack, kernel, unpack, kernel in L1
  float sink = 0;
  for (int rep = 0; rep < kRepetitions; ++rep) {
    double t = seconds();
    sink += fma_peak_loop(peak_iterations);
    best[0] = std::min(best[0], seconds() - t);
    t = seconds();
    ceiling_loop(ceiling_values.data(), ceiling_offsets.data(), 64, ceiling_panel.data(), ceiling_out.data(),
                 ceiling_rows);
    best[1] = std::min(best[1], seconds() - t);
    t = seconds();
    k.pack_panel(x.data(), kWidth, in, in, 1, kWidth, panel.data());
    best[2] = std::min(best[2], seconds() - t);
    t = seconds();
    for (int64_t rb = 0; rb < w.num_row_blocks; ++rb) {
      k.spmm_row_block(w, rb, 0, w.num_k_blocks, panel.data(), kWidth, nullptr, Activation::kNone,
                       tile.data() + rb * w.row_block * kWidth);
    }
    best[3] = std::min(best[3], seconds() - t);
    t = seconds();
    k.unpack_tile(tile.data(), out, kWidth, kWidth, y.data(), out);
    best[4] = std::min(best[4], seconds() - t);
    t = seconds();
    for (int64_t rb = 0; rb < w_in_l1.num_row_blocks; ++rb) {
      k.spmm_row_block(w_in_l1, rb, 0, w_in_l1.num_k_blocks, panel.data(), kWidth, nullptr, Activation::kNone,
                       tile.data() + rb * w_in_l1.row_block * kWidth);
    }
    best[5] = std::min(best[5], seconds() - t);
  }

  const double layer_flops = 2.0 * w.nnz * kWidth;
  const double total = best[2] + best[3] + best[4];
  std::printf("one core, AVX2, minimum of %d interleaved runs\n", kRepetitions);
  std::printf("FMA peak (registers only):             %6.1f GFLOP/s\n", peak_iterations * 10 * 16.0 / best[0] / 1e9);
  std::printf("1x64 microkernel ceiling (L1 panel):   %6.1f GFLOP/s\n", 64.0 * ceiling_rows * 2 * kWidth / best[1] / 1e9);
  std::printf("layer %dx%d at %.0f%% (%ld nonzeros, %.1f per row per K-block), k_block %ld, row_block %ld, 64 tokens:\n",
              out, in, 100 * sparsity, static_cast<long>(w.nnz), double(w.nnz) / (double(out) * w.num_k_blocks),
              static_cast<long>(w.k_block), static_cast<long>(w.row_block));
  std::printf("  pack_panel      %8.1f us\n", best[2] * 1e6);
  std::printf("  spmm_row_block  %8.1f us  %6.1f GFLOP/s over nonzeros\n", best[3] * 1e6, layer_flops / best[3] / 1e9);
  std::printf("  unpack_tile     %8.1f us\n", best[4] * 1e6);
  std::printf("  all three       %8.1f us  %6.1f GFLOP/s over nonzeros\n", total * 1e6, layer_flops / total / 1e9);
  std::printf("  (spmm_row_block with every offset folded into 64 features, activations in L1:\n"
              "                  %8.1f us  %6.1f GFLOP/s: L1 misses cost at least %.0f%% of the kernel's time)\n",
              best[5] * 1e6, layer_flops / best[5] / 1e9, 100.0 * (1.0 - best[5] / best[3]));
  static volatile float keep_peak_loop = 0;  // the peak loop's result must look used
  keep_peak_loop = sink;
  return 0;
}
