# Builds only the C++ extension torch_sparsecpu._C; metadata lives in pyproject.toml.
# Build against the installed torch:  pip install --no-build-isolation -e .
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Flags shared by every source. No host-specific -march flag: each ISA's kernel file selects
# its instructions with `#pragma GCC target`, and the ISA is chosen at run time.
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
link_flags = ["-fopenmp"]
if os.environ.get("TORCH_SPARSECPU_SANITIZE"):
    cxx_flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    link_flags += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        CppExtension(
            "torch_sparsecpu._C",
            sorted(glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/kernels/*.cpp")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
