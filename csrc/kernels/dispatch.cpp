// Run-time choice of ISA: once, from the CPU's features, unless forced by the
// TORCH_SPARSECPU_ISA environment variable or set_isa().
#include <atomic>
#include <cstdlib>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {

namespace {

const SpmmKernels* kernels_for(const std::string& isa) {
  if (isa == "scalar") return &kSpmmScalar;
  if (isa == "avx2") return &kSpmmAvx2;
  if (isa == "avx512") return &kSpmmAvx512;
  return nullptr;
}

const SpmmKernels* best_kernels() {
  if (cpu_supports("avx512")) return &kSpmmAvx512;
  if (cpu_supports("avx2")) return &kSpmmAvx2;
  return &kSpmmScalar;
}

const SpmmKernels* initial_kernels() {
  const char* forced = std::getenv("TORCH_SPARSECPU_ISA");
  if (forced != nullptr && cpu_supports(forced)) return kernels_for(forced);
  return best_kernels();  // an unusable value is reported by the Python side
}

std::atomic<const SpmmKernels*>& active() {
  static std::atomic<const SpmmKernels*> kernels{initial_kernels()};
  return kernels;
}

}  // namespace

bool cpu_supports(const std::string& isa) {
  __builtin_cpu_init();
  if (isa == "scalar") return true;
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
  }
  return false;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> isas;
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    if (cpu_supports(isa)) isas.emplace_back(isa);
  }
  return isas;
}

const SpmmKernels& active_kernels() { return *active().load(std::memory_order_acquire); }

bool set_isa(const std::string& isa, std::string* error) {
  const SpmmKernels* kernels = kernels_for(isa);
  if (kernels == nullptr) {
    *error = "unknown ISA '" + isa + "'; expected one of scalar, avx2, avx512";
    return false;
  }
  if (!cpu_supports(isa)) {
    *error = "this CPU does not support ISA '" + isa + "'";
    return false;
  }
  active().store(kernels, std::memory_order_release);
  return true;
}

std::vector<std::string> spmm_kernel_names(const SpmmKernels& kernels) {
  const std::string isa = std::string("__") + kernels.isa;
  if (kernels.vector_width == 1) return {"spmm_f32_1xN" + isa, "spmm_f32_4xN" + isa};
  std::vector<std::string> names;
  for (const int64_t rows : {int64_t{1}, kTallBlockRows}) {
    const std::string prefix = "_f32_" + std::to_string(rows) + "x";
    for (int64_t tokens = 1; tokens <= kMaxGemvTokens; ++tokens) {
      names.push_back("spmv" + prefix + std::to_string(tokens) + isa);
    }
    const int64_t widest = rows == 1 ? kernels.max_panel_width : kTallStripVectors * kernels.vector_width;
    for (int64_t width = kernels.vector_width; width <= widest; width += kernels.vector_width) {
      names.push_back("spmm" + prefix + std::to_string(width) + isa);
    }
  }
  return names;
}

}  // namespace kernels
}  // namespace sparsecpu
