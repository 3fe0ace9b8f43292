// Run-time choice of ISA: once, from the CPU's features, unless forced by the
// TORCH_SPARSECPU_ISA environment variable or set_isa().
#include <atomic>
#include <cstdlib>
#include <vector>

#include "spmm.h"

namespace sparsecpu {
namespace kernels {

namespace {

// One ISA of lists.h: its kernel tables on this CPU, and whether the CPU runs it.
struct Isa {
  const char* name;
  const SpmmKernels* f32;
  const Qd8Kernels* int8;
  bool supported;
  bool may_default;
};

const std::vector<Isa>& isas() {
  static const std::vector<Isa> list = [] {
    __builtin_cpu_init();
    std::vector<Isa> entries;
#define SPARSECPU_ENTRY(name, f32_table, int8_table, cpu_has, may_default) \
  entries.push_back({#name, &f32_table, &(int8_table), static_cast<bool>(cpu_has), may_default});
    SPARSECPU_FOR_EACH_ISA(SPARSECPU_ENTRY)
#undef SPARSECPU_ENTRY
    return entries;
  }();
  return list;
}

const Isa* isa_named(const std::string& name) {
  for (const Isa& isa : isas()) {
    if (name == isa.name) return &isa;
  }
  return nullptr;
}

// The last ISA of lists.h this CPU supports among those that may be the default
// (never vec16, which is there for the tests).
const Isa* best_isa() {
  const Isa* best = nullptr;
  for (const Isa& isa : isas()) {
    if (isa.may_default && isa.supported) best = &isa;
  }
  return best;
}

const Isa* initial_isa() {
  const char* forced = std::getenv("TORCH_SPARSECPU_ISA");
  if (forced != nullptr && cpu_supports(forced)) return isa_named(forced);
  return best_isa();  // an unusable value is reported by the Python side
}

std::atomic<const Isa*>& active() {
  static std::atomic<const Isa*> isa{initial_isa()};
  return isa;
}

}  // namespace

const SpmmKernels* kernels_named(const std::string& isa) {
  const Isa* entry = isa_named(isa);
  return entry != nullptr ? entry->f32 : nullptr;
}

const Qd8Kernels* qd8_kernels_named(const std::string& isa) {
  const Isa* entry = isa_named(isa);
  return entry != nullptr ? entry->int8 : nullptr;
}

std::string joined(const char* const* names, size_t count) {
  std::string list;
  for (size_t i = 0; i < count; ++i) list += (i ? ", " : "") + std::string(names[i]);
  return list;
}

bool cpu_supports(const std::string& isa) {
  const Isa* entry = isa_named(isa);
  return entry != nullptr && entry->supported;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : isas()) {
    if (isa.supported) names.emplace_back(isa.name);
  }
  return names;
}

const SpmmKernels& active_kernels() { return *active().load(std::memory_order_acquire)->f32; }
const Qd8Kernels& active_qd8_kernels() { return *active().load(std::memory_order_acquire)->int8; }
const char* active_isa() { return active().load(std::memory_order_acquire)->name; }

bool set_isa(const std::string& isa, std::string* error) {
  const Isa* entry = isa_named(isa);
  if (entry == nullptr) {
    *error = "unknown ISA '" + isa + "'; expected one of " + joined(kIsaNames, kNumIsas);
    return false;
  }
  if (!entry->supported) {
    *error = "this CPU does not support ISA '" + isa + "'";
    return false;
  }
  active().store(entry, std::memory_order_release);
  return true;
}

// From the tile lists of lists.h, in the order: fp32 1 x 1 blocks then tall blocks, int8
// 1 x 1 blocks then 1 x 4 blocks; GEMV tiles then panel tiles.
std::vector<std::string> spmm_kernel_names(const std::string& isa, Datatype datatype) {
  const Isa* entry = isa_named(isa);
  if (entry == nullptr) return {};
  const bool int8 = datatype == Datatype::kInt8;
  const std::string suffix = std::string("__") + (int8 ? entry->int8->isa : entry->f32->isa);
  const int64_t vector_width = int8 ? entry->int8->vector_width : entry->f32->vector_width;
  const std::string type = std::string("_") + kDatatypeKernelPrefixes[static_cast<int>(datatype)] + "_";
  // fp32: <rows>x<tokens> (4 x 1 or 1 x 1 blocks); int8: 1x<features>x<tokens> (1 x 4 or 1 x 1).
  const std::vector<std::string> blocks = int8 ? std::vector<std::string>{"1x1x", "1x4x"}
                                               : std::vector<std::string>{"1x", std::to_string(kTallBlockRows) + "x"};
  std::vector<std::string> names;
  for (const std::string& block : blocks) {
    const std::string prefix = type + block;
    if (vector_width == 1) {
      names.push_back("spmm" + prefix + "N" + suffix);
      continue;
    }
#define SPARSECPU_GEMV_NAME(tokens) names.push_back("spmv" + prefix + std::to_string(tokens) + suffix);
    SPARSECPU_FOR_EACH_GEMV_TILE(SPARSECPU_GEMV_NAME)
#undef SPARSECPU_GEMV_NAME
#define SPARSECPU_TILE_NAME(vectors) names.push_back("spmm" + prefix + std::to_string(vectors * vector_width) + suffix);
    if (int8 || block == "1x") {
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
