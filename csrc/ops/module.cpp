// The Python module torch_sparsecpu._C: loading it registers the ops (see
// linear.cpp); the functions below control and describe the kernel dispatch.
#include <torch/extension.h>

#include "../kernels/spmm.h"
#include "packed_weights.h"

namespace {

const sparsecpu::kernels::SpmmKernels& kernels_named(const std::string& isa) {
  if (isa == "scalar") return sparsecpu::kernels::kSpmmScalar;
  if (isa == "avx2") return sparsecpu::kernels::kSpmmAvx2;
  if (isa == "avx512") return sparsecpu::kernels::kSpmmAvx512;
  throw std::invalid_argument("unknown ISA '" + isa + "'; expected one of scalar, avx2, avx512");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(sparsecpu::kernels::active_kernels().isa); },
        "The ISA whose kernels the ops run now.");
  m.def("set_isa", [](const std::string& isa) {
        std::string error;
        if (!sparsecpu::kernels::set_isa(isa, &error)) throw std::invalid_argument(error);
      }, "Forces the kernels of one ISA (scalar, avx2, avx512) for every later call.");
  m.def("available_isas", &sparsecpu::kernels::available_isas, "ISAs this CPU can run.");
  m.def("cpu_supports", &sparsecpu::kernels::cpu_supports);
  m.def("kernel_names", [](const std::string& isa) {
        return sparsecpu::kernels::spmm_kernel_names(kernels_named(isa));
      }, "Names of the register tiles the ISA's kernel table instantiates.");
  m.def("max_panel_width", [](const std::string& isa) { return kernels_named(isa).max_panel_width; });
  m.def("repacked_weights", &sparsecpu::repacked_weights,
        "Buffers the ops have packed for weights edited or swapped since their packing (see packed_weights.h).");
  m.attr("TALL_BLOCK_ROWS") = sparsecpu::kernels::kTallBlockRows;  // block_rows of 4 x 1 blocks
}
