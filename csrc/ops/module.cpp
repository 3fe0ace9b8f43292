// The Python module torch_sparsecpu._C: loading it registers the ops (see
// library.cpp); the functions below control and describe the kernel dispatch,
// export the lists of csrc/kernels/lists.h and the packed header's fields, and count
// a weight's nonzeros for the default packing choices.
#include <torch/extension.h>

#include "../kernels/spmm.h"
#include "baked_tensors.h"
#include "packed_weights.h"

namespace {

namespace kernels = sparsecpu::kernels;

const kernels::SpmmKernels& kernels_named(const std::string& isa) {
  const kernels::SpmmKernels* table = kernels::kernels_named(isa);
  if (table == nullptr) {
    throw std::invalid_argument("unknown ISA '" + isa + "'; expected one of " +
                                kernels::joined(kernels::kIsaNames, kernels::kNumIsas));
  }
  return *table;
}

// Bound through a type of this file: pybind11's own types are hidden, and a bound type
// of wider visibility draws a warning.
struct BakedTensors : sparsecpu::BakedTensors {
  using sparsecpu::BakedTensors::BakedTensors;
};

pybind11::tuple names(const char* const* names, size_t count) {
  pybind11::tuple tuple(count);
  for (size_t i = 0; i < count; ++i) tuple[i] = pybind11::str(names[i]);
  return tuple;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(kernels::active_isa()); }, "The ISA whose kernels the ops run now.");
  m.def("set_isa", [](const std::string& isa) {
        std::string error;
        if (!kernels::set_isa(isa, &error)) throw std::invalid_argument(error);
      }, "Forces the kernels of one ISA (a name of ISAS) for every later call.");
  m.def("available_isas", &kernels::available_isas, "ISAs this CPU can run.");
  m.def("cpu_supports", &kernels::cpu_supports);
  m.def("kernel_names", [](const std::string& isa, const std::string& datatype) {
        kernels_named(isa);  // an unknown ISA throws
        for (size_t i = 0; i < kernels::kNumDatatypes; ++i) {
          if (datatype == kernels::kDatatypeNames[i]) {
            return kernels::spmm_kernel_names(isa, static_cast<kernels::Datatype>(i));
          }
        }
        throw std::invalid_argument("unknown datatype '" + datatype + "'; expected one of " +
                                    kernels::joined(kernels::kDatatypeNames, kernels::kNumDatatypes));
      }, "Names of the register tiles the ISA's kernels instantiate for one datatype on this CPU.");
  m.def("max_panel_width", [](const std::string& isa) { return kernels_named(isa).max_panel_width; });
  m.def("repacked_weights", &sparsecpu::repacked_weights,
        "Buffers the ops have packed for weights edited or swapped since their packing (see packed_weights.h).");
  m.def("nonzero_counts", [](const at::Tensor& weight) {
        TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
                          "nonzero_counts: weight must be a 2-D float32 CPU tensor, got ", weight.scalar_type(),
                          " of shape ", weight.sizes());
        const at::Tensor rows = weight.stride(1) == 1 ? weight : weight.contiguous();
        pybind11::gil_scoped_release no_gil;
        const kernels::NonzeroCounts counts =
            kernels::count_nonzeros_f32(rows.data_ptr<float>(), rows.size(0), rows.size(1), rows.stride(0));
        return std::make_pair(counts.nonzeros, counts.tall_blocks);
      }, "(nonzeros, nonzero 4 x 1 blocks) of a 2-D float32 weight, in one pass.");
  m.attr("TALL_BLOCK_ROWS") = kernels::kTallBlockRows;  // block_rows of 4 x 1 blocks
  m.attr("WIDE_BLOCK_COLS") = kernels::kWideBlockCols;  // block_cols of int8 1 x 4 blocks
  m.attr("MAX_GEMV_TOKENS") = kernels::kMaxGemvTokens;  // panels this narrow run the GEMV kernels
  // The lists of csrc/kernels/lists.h, in list order: what ops.ACTIVATIONS, ops.DATATYPES and
  // kernels.ISAS read.
  m.attr("ACTIVATIONS") = names(kernels::kActivationNames, kernels::kNumActivations);
  m.attr("ISAS") = names(kernels::kIsaNames, kernels::kNumIsas);
  m.attr("DATATYPES") = names(kernels::kDatatypeNames, kernels::kNumDatatypes);  // by header word `datatype`
  // The packed buffer's header (spmm.h): what ops.HEADER_FIELDS and ops.packed_info read.
  m.def("header_fields", [] {
        pybind11::dict fields;
        for (int i = 0; i < kernels::kNumHeaderFields; ++i) fields[kernels::kHeaderFieldNames[i]] = i;
        return fields;
      }, "Word index of each header field of a packed buffer, by name.");
  pybind11::class_<BakedTensors>(m, "BakedTensors", "What a build of a compiled graph baked in (baked_tensors.h).")
      .def(pybind11::init<const std::vector<at::Tensor>&, std::vector<int64_t>, const std::vector<at::Tensor>&,
                          std::vector<int64_t>>(),
           pybind11::arg("watched"), pybind11::arg("watched_inputs"), pybind11::arg("compared"),
           pybind11::arg("compared_inputs"))
      .def("stale", [](const BakedTensors& baked, const pybind11::tuple& args) {
            // The tensors borrowed from their Python objects, all fetched first (see
            // BakedTensors::stale).
            for (const auto& arg : args) __builtin_prefetch(arg.ptr());
            std::vector<const at::Tensor*> tensors;
            tensors.reserve(args.size());
            for (const auto& arg : args) {
              tensors.push_back(THPVariable_Check(arg.ptr()) ? &THPVariable_Unpack(arg.ptr()) : nullptr);
            }
            return baked.stale(tensors);
          }, pybind11::arg("args"), "Whether any of them changed, given the call's arguments (a tuple).");
  m.attr("HEADER_WORDS") = kernels::kHeaderWords;
  m.attr("PACKED_MAGIC") = kernels::kPackedMagic;
}
