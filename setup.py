"""Build script for the esta_kernels._C extension.

Switches (environment variables):
  ESTA_BUILD_CUDA=auto|0|1   auto (default): build the CUDA sources when torch has CUDA, nvcc is found
                             and the CUTLASS headers are installed; 1: require them; 0: CPU ops only.
  TORCH_CUDA_ARCH_LIST       CUDA targets, default "8.0;9.0". 9.0 compiles for sm_90a (wgmma, TMA and
                             setmaxnreg need the arch-specific target); other entries as torch reads them.
  MAX_JOBS                   parallel compile jobs; default bounded by cores and memory.
  CUDA_HOME                  CUDA toolkit; default: the folder holding the nvcc on PATH, or /usr/local/cuda.
  CUTLASS_PATH               a CUTLASS source tree to take the headers from instead of the pinned
                             nvidia-cutlass package (the CUDA kernels are built on CUTLASS 3 / CuTe).
"""
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _resolve_cuda_home():
    # torch guesses /usr/local when it finds no CUDA runtime, which fails at link time; find the toolkit
    # from nvcc instead, before torch.utils.cpp_extension reads CUDA_HOME.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        # a wrapper script on PATH (e.g. /usr/local/bin/nvcc) does not make /usr/local a toolkit
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            os.environ["CUDA_HOME"] = home
            return home
    return None


# The CUDA kernels are written against this CUTLASS release (its headers ship in the PyPI package
# nvidia-cutlass, under cutlass_library/source/include); the Makefile and pyproject.toml pin the same.
CUTLASS_PACKAGE = "nvidia-cutlass"
CUTLASS_VERSION = "4.2.0.0"


def _cutlass_include():
    """(the include folder holding cutlass/ and cute/, None) or (None, why it is missing, naming the package)."""
    custom = os.environ.get("CUTLASS_PATH")
    if custom:
        inc = os.path.join(custom, "include")
        if not os.path.exists(os.path.join(inc, "cutlass", "cutlass.h")):
            return None, f"CUTLASS_PATH={custom!r} has no include/cutlass/cutlass.h"
        return inc, None
    install = f"pip install --no-deps '{CUTLASS_PACKAGE}=={CUTLASS_VERSION}'"
    spec = importlib.util.find_spec("cutlass_library")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None, (f"the CUDA kernels need the CUTLASS headers of the package {CUTLASS_PACKAGE}=={CUTLASS_VERSION}, "
                      f"which is not installed: {install} (or set CUTLASS_PATH to a CUTLASS source tree)")
    try:
        version = importlib.metadata.version(CUTLASS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != CUTLASS_VERSION:
        return None, f"the CUDA kernels are built against {CUTLASS_PACKAGE}=={CUTLASS_VERSION}, found {version}: {install}"
    inc = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    if not (os.path.exists(os.path.join(inc, "cutlass", "cutlass.h")) and os.path.exists(os.path.join(inc, "cute", "tensor.hpp"))):
        return None, f"{CUTLASS_PACKAGE} {version} has no headers under {inc}: reinstall it ({install})"
    return inc, None


def _cuda_arch_flags():
    """-gencode flags from TORCH_CUDA_ARCH_LIST; 9.0 becomes sm_90a. Returns (flags, whether sm_90a is built)."""
    flags, sm90a = [], False
    for entry in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";"):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        version = entry[: -len("+PTX")] if ptx else entry
        try:
            major, minor = version.rstrip("a").split(".")
            num = f"{int(major)}{int(minor)}"
        except ValueError:
            sys.exit(f"TORCH_CUDA_ARCH_LIST: cannot read {entry!r} (expected entries like 8.0, 9.0 or 8.6+PTX)")
        if num == "90":  # the Hopper kernels use wgmma and setmaxnreg, which only the arch-specific target has
            num, sm90a = "90a", True
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        sys.exit("TORCH_CUDA_ARCH_LIST is empty")
    return sorted(set(flags)), sm90a


def _max_jobs():
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    # one nvcc/cc1plus job on torch headers peaks near 3 GB
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gb // 3))))


cuda_home = _resolve_cuda_home()
_max_jobs()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

build_cuda_flag = os.environ.get("ESTA_BUILD_CUDA", "auto").lower()
if build_cuda_flag not in ("auto", "0", "1"):
    sys.exit(f"ESTA_BUILD_CUDA must be auto, 0 or 1, got {build_cuda_flag!r}")
torch_has_cuda = torch.version.cuda is not None
nvcc_found = cuda_home is not None
if build_cuda_flag == "1" and not (torch_has_cuda and nvcc_found):
    sys.exit(
        "ESTA_BUILD_CUDA=1 but "
        + ("this torch has no CUDA" if not torch_has_cuda else "nvcc was not found (set CUDA_HOME)")
    )
build_cuda = build_cuda_flag == "1" or (build_cuda_flag == "auto" and torch_has_cuda and nvcc_found)
cutlass_include = None
if build_cuda:
    cutlass_include, cutlass_missing = _cutlass_include()
    if cutlass_missing and build_cuda_flag == "1":
        sys.exit(f"ESTA_BUILD_CUDA=1: {cutlass_missing}")
    if cutlass_missing:
        print(f"esta: building without the CUDA kernels (ESTA_BUILD_CUDA=auto): {cutlass_missing}")
        build_cuda = False

cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))

cxx_flags = ["-O3", "-fopenmp"]  # torch adds the C++ standard it needs
if sys.platform == "linux":
    cxx_flags.append("-DESTA_LINUX")
extra_link = ["-fopenmp"]
define_macros = []

if build_cuda:
    arch_flags, with_sm90a = _cuda_arch_flags()
    cuda_defines = ["-DESTA_WITH_CUDA"] + (["-DESTA_WITH_SM90A"] if with_sm90a else [])
    nvcc_flags = [
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # release kernels, as CUTLASS builds them: its device asserts are function calls, and a call inside
        # a wgmma pipeline makes ptxas serialize the wgmma instructions (warning C7510)
        "-DNDEBUG",
        *cuda_defines,
        *arch_flags,  # torch adds none of its own once an arch flag is given
    ]
    ext = CUDAExtension(
        "esta_kernels._C",
        cpp_sources + cuda_sources,
        include_dirs=[cutlass_include],
        extra_compile_args={"cxx": cxx_flags + cuda_defines, "nvcc": nvcc_flags},
        extra_link_args=extra_link,
        define_macros=define_macros,
    )
else:
    ext = CppExtension(
        "esta_kernels._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link,
        define_macros=define_macros,
    )

print(f"esta: building esta_kernels._C with CUDA={'yes' if build_cuda else 'no'}"
      f" (ESTA_BUILD_CUDA={build_cuda_flag}, torch CUDA={torch.version.cuda}, CUDA_HOME={cuda_home},"
      f" TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
