// Run-time choice of ISA: once, from the CPU's features, unless forced by the
// TORCH_SPARSECPU_ISA environment variable or set_isa().
#include <atomic>
#include <cstdlib>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {

namespace {

// The last ISA of lists.h this CPU supports among those that may be the default
// (never vec16, which is there for the tests).
const SpmmKernels* best_kernels() {
  const SpmmKernels* best = nullptr;
#define SPARSECPU_IF_SUPPORTED(name, table, cpu_has, may_default) \
  if (may_default && cpu_supports(#name)) best = &table;
  SPARSECPU_FOR_EACH_ISA(SPARSECPU_IF_SUPPORTED)
#undef SPARSECPU_IF_SUPPORTED
  return best;
}

const SpmmKernels* initial_kernels() {
  const char* forced = std::getenv("TORCH_SPARSECPU_ISA");
  if (forced != nullptr && cpu_supports(forced)) return kernels_named(forced);
  return best_kernels();  // an unusable value is reported by the Python side
}

std::atomic<const SpmmKernels*>& active() {
  static std::atomic<const SpmmKernels*> kernels{initial_kernels()};
  return kernels;
}

}  // namespace

const SpmmKernels* kernels_named(const std::string& isa) {
#define SPARSECPU_IF_NAMED(name, table, cpu_has, may_default) \
  if (isa == #name) return &table;
  SPARSECPU_FOR_EACH_ISA(SPARSECPU_IF_NAMED)
#undef SPARSECPU_IF_NAMED
  return nullptr;
}

std::string joined(const char* const* names, size_t count) {
  std::string list;
  for (size_t i = 0; i < count; ++i) list += (i ? ", " : "") + std::string(names[i]);
  return list;
}

bool cpu_supports(const std::string& isa) {
  __builtin_cpu_init();
#define SPARSECPU_IF_NAMED(name, table, cpu_has, may_default) \
  if (isa == #name) return cpu_has;
  SPARSECPU_FOR_EACH_ISA(SPARSECPU_IF_NAMED)
#undef SPARSECPU_IF_NAMED
  return false;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> isas;
  for (const char* isa : kIsaNames) {
    if (cpu_supports(isa)) isas.emplace_back(isa);
  }
  return isas;
}

const SpmmKernels& active_kernels() { return *active().load(std::memory_order_acquire); }

bool set_isa(const std::string& isa, std::string* error) {
  const SpmmKernels* kernels = kernels_named(isa);
  if (kernels == nullptr) {
    *error = "unknown ISA '" + isa + "'; expected one of " + joined(kIsaNames, kNumIsas);
    return false;
  }
  if (!cpu_supports(isa)) {
    *error = "this CPU does not support ISA '" + isa + "'";
    return false;
  }
  active().store(kernels, std::memory_order_release);
  return true;
}

// From the tile lists of lists.h, in the order: 1 x 1 blocks then tall blocks; GEMV
// tiles then panel tiles.
std::vector<std::string> spmm_kernel_names(const SpmmKernels& kernels) {
  const std::string isa = std::string("__") + kernels.isa;
  if (kernels.vector_width == 1) return {"spmm_f32_1xN" + isa, "spmm_f32_4xN" + isa};
  std::vector<std::string> names;
  for (const int64_t rows : {int64_t{1}, kTallBlockRows}) {
    const std::string prefix = "_f32_" + std::to_string(rows) + "x";
#define SPARSECPU_GEMV_NAME(tokens) names.push_back("spmv" + prefix + std::to_string(tokens) + isa);
    SPARSECPU_FOR_EACH_GEMV_TILE(SPARSECPU_GEMV_NAME)
#undef SPARSECPU_GEMV_NAME
#define SPARSECPU_TILE_NAME(vectors) names.push_back("spmm" + prefix + std::to_string(vectors * kernels.vector_width) + isa);
    if (rows == 1) {
      SPARSECPU_FOR_EACH_TILE(SPARSECPU_TILE_NAME)
    } else {
      SPARSECPU_FOR_EACH_TALL_TILE(SPARSECPU_TILE_NAME)
    }
#undef SPARSECPU_TILE_NAME
  }
  return names;
}

}  // namespace kernels
}  // namespace sparsecpu
