"""Builds `psa._C` against the installed torch: `pip install --no-build-isolation -e .`

Knobs (environment variables):
  PSA_BUILD_CUDA   1 / 0 / unset (auto: build CUDA sources when nvcc is found)
  PSA_CUDA_ARCHS   CUDA architectures, default "8.0;9.0a"; 9.0a is needed for Hopper's wgmma/TMA
  CUTLASS_INCLUDE_DIR  CUTLASS/CuTe headers for the sm_90a kernels; default: those packaged in the
                   `nvidia-cutlass` wheel (requirements-dev.txt). Without them the build leaves the
                   Hopper kernels out and says so.
  MAX_JOBS         parallel compile jobs, default from free memory and cores
  NVCC_THREADS     threads per nvcc process, default 2
  DEBUG            1 builds with -O0 -g (and keeps symbols; release builds are stripped)

The wheel is abi3 (one wheel for CPython 3.10+: the extension uses only PyModule_Create) and its
metadata pins the torch release it was built against, the only one its binary loads under.
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import sys

from setuptools import setup


def _locate_cuda_toolkit():
    """CUDA_HOME for torch's build helpers, which otherwise take the parent of a `nvcc` wrapper script
    (e.g. /usr/local for /usr/local/bin/nvcc) and then cannot find libcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
                os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_toolkit()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# The torch this project is developed and tested with. Other 2.x releases build too (with a warning);
# the extension then only loads under the torch it was built against.
DEVELOPED_WITH_TORCH = "2.14.1"
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
PY_LIMITED_API_TAG, PY_LIMITED_API_HEX = "cp310", "0x030A0000"
SUPPORTED_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "9.0a")


def log(message):
    print(f"[psa build] {message}", file=sys.stderr)


def want_cuda():
    flag = os.environ.get("PSA_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off") or not cuda_sources():
        return False
    found = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("1", "true", "yes", "on") and not found:
        raise RuntimeError("PSA_BUILD_CUDA=1 but no nvcc/CUDA_HOME or a CPU-only torch was found")
    return found


def cuda_archs():
    archs = [a.strip() for a in os.environ.get("PSA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    unknown = [a for a in archs if a not in SUPPORTED_CUDA_ARCHS]
    if not archs or unknown:
        raise RuntimeError(f"PSA_CUDA_ARCHS must list architectures from {SUPPORTED_CUDA_ARCHS}, got {archs}")
    return archs


def gencode_flags(archs):
    flags = []
    for arch in archs:
        number = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
    # PTX of the newest generic arch so that newer GPUs can still JIT the portable kernels.
    newest = max(a for a in archs if not a.endswith("a")) if any(not a.endswith("a") for a in archs) else None
    if newest:
        number = newest.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def default_max_jobs():
    try:
        available_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        available_gib = 8
    # nvcc on these kernels peaks near 3 GiB per process.
    return max(1, min(os.cpu_count() or 1, int(available_gib // 3)))


def cpu_sources():
    return sorted(glob.glob("csrc/psa/*.cpp") + glob.glob("csrc/psa/aten/*.cpp") + glob.glob("csrc/psa/cpu/*.cpp"))


def cuda_sources(with_sm90=True):
    sources = glob.glob("csrc/psa/cuda/*.cpp") + glob.glob("csrc/kernels/**/*.cu", recursive=True)
    return sorted(s for s in sources if with_sm90 or "_sm90" not in os.path.basename(s))


def cutlass_include_dir():
    """The CUTLASS/CuTe headers: $CUTLASS_INCLUDE_DIR, else the copy the `nvidia-cutlass` wheel ships as
    data of its `cutlass_library` package (found without importing it: its imports need cuda-python)."""
    candidates = [os.environ.get("CUTLASS_INCLUDE_DIR", "")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(location, "source", "include") for location in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate and os.path.exists(os.path.join(candidate, "cute", "arch", "mma_sm90_gmma.hpp")):
            return candidate
    return None


def build_info(with_cuda, archs, with_sm90):
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs if with_cuda else [],
        "sm90_kernels": with_sm90,
        "developed_with_torch": DEVELOPED_WITH_TORCH,
    }


class BuildWithInfo(cpp_extension.BuildExtension):
    """Writes _build_info.json beside _C, so that import can name a torch mismatch: into the source
    tree only for in-place (editable) builds, else into the build tree the wheel is made from."""

    build_info = {}

    def run(self):
        super().run()
        target = os.path.join(ROOT if self.inplace else self.build_lib, "psa")
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "_build_info.json"), "w") as f:
            f.write(json.dumps(self.build_info, indent=2) + "\n")


def main():
    with_cuda = want_cuda()
    archs = cuda_archs() if with_cuda else []
    debug = os.environ.get("DEBUG", "0") == "1"
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    base_version = re.match(r"[\d.]+", torch.__version__).group(0)
    if base_version != DEVELOPED_WITH_TORCH:
        log(f"warning: building against torch {torch.__version__}; psa is developed with {DEVELOPED_WITH_TORCH}")
    log(f"torch {torch.__version__}, CUDA build: {with_cuda} (CUDA_HOME={cpp_extension.CUDA_HOME}), "
        f"archs: {archs or 'none'}, CUTLASS: {cutlass_include_dir() if with_cuda else None}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}")

    cutlass = cutlass_include_dir() if "9.0a" in archs else None
    with_sm90 = cutlass is not None
    if "9.0a" in archs and not with_sm90:
        log("warning: no CUTLASS headers (pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_INCLUDE_DIR): "
            "building without the Hopper (sm_90a) kernels")
    defines = (["-DPSA_WITH_CUDA"] if with_cuda else []) + (["-DPSA_WITH_SM90"] if with_sm90 else [])
    # Python's limited API (3.10): module.cpp only creates the module; the ops register with torch.
    cxx_flags = (["-O0", "-g"] if debug else ["-O3", "-g0"]) + defines + [f"-DPy_LIMITED_API={PY_LIMITED_API_HEX}"]
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")] + ([cutlass] if with_sm90 else [])
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr",
                         f"--threads={os.environ.get('NVCC_THREADS', '2')}"] + defines + gencode_flags(archs)
        # The arch list is ours, not torch's guess from the visible GPU.
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(a.replace("9.0a", "9.0") for a in archs)
    extension_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = extension_cls(
        name="psa._C",
        sources=cpu_sources() + (cuda_sources(with_sm90) if with_cuda else []),
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=[] if debug else ["-Wl,--strip-all"],
        py_limited_api=True,
    )
    BuildWithInfo.build_info = build_info(with_cuda, archs, with_sm90)
    setup(
        ext_modules=[extension],
        cmdclass={"build_ext": BuildWithInfo.with_options(use_ninja=shutil.which("ninja") is not None)},
        install_requires=[f"torch=={base_version}"],
        options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API_TAG}},
    )


if __name__ == "__main__":
    main()
