"""Build and load ``libaccullm_kernels.so``, the C ABI of the accullm CUDA kernels, without CMake.

Used by the tests (``tests/unit/test_plugins.py`` compiles, ``tests/gpu/test_plugin_kernels.py`` runs) and by
``plugins/bench_kernels.py``. The nvcc lines are the ones ``plugins/README.md`` documents; CMake builds the same
sources with the same flags.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

PLUGINS = Path(__file__).resolve().parent
KERNEL_SOURCES = (
    PLUGINS / "outlier_split_gemm" / "OutlierSplitGemmKernel.cu",
    PLUGINS / "sparse_skip_mlp" / "SparseSkipMLPKernel.cu",
)
EXPORTED_SYMBOLS = (
    "accullm_outlier_split_gemm",
    "accullm_outlier_split_gemm_workspace_size",
    "accullm_sparse_skip_mlp",
    "accullm_sparse_skip_mlp_workspace_size",
)
DEFAULT_ARCHITECTURES = ("87", "90")  # Orin, Hopper: as CMakeLists.txt
DTYPE_FLOAT16, DTYPE_FLOAT32 = 0, 1
METHODS = {"threshold": 0, "predictor": 1}


class KernelBuildError(RuntimeError):
    """nvcc is missing or failed; the message carries its output."""


def nvcc_compile_command(source: Path, output: Path, architectures=DEFAULT_ARCHITECTURES,
                         nvcc: str = "nvcc", defines: dict | None = None) -> list[str]:
    """One .cu to a position-independent object with SASS for each architecture ("87", "90", ...). ``defines``
    sets compile-time knobs (``{"ACCULLM_GEMV_THREADS": 256}``: see common/gemmCommon.cuh)."""
    gencode = [flag for arch in architectures for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    macros = [f"-D{name}={value}" for name, value in (defines or {}).items()]
    return [nvcc, "-c", "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", *gencode, *macros,
            "-o", str(output), str(source)]


def nvcc_link_command(objects: list[Path], output: Path, nvcc: str = "nvcc") -> list[str]:
    """Objects to a shared library (cudart linked statically, nvcc's default)."""
    return [nvcc, "-shared", "-o", str(output), *map(str, objects)]


def build_library(folder: Path, architectures=DEFAULT_ARCHITECTURES, nvcc: str | None = None,
                  defines: dict | None = None) -> Path:
    """Compile both kernels (in parallel) and link them into ``folder/libaccullm_kernels.so``; returns its path."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise KernelBuildError("nvcc not found on PATH (install the CUDA toolkit)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    objects = [folder / f"{source.stem}.o" for source in KERNEL_SOURCES]
    jobs = [subprocess.Popen(nvcc_compile_command(source, obj, architectures, nvcc, defines),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for source, obj in zip(KERNEL_SOURCES, objects)]
    failures = [(job.args, job.communicate()[0]) for job in jobs]
    failures = [(args, out) for (args, out), job in zip(failures, jobs) if job.returncode != 0]
    if failures:
        raise KernelBuildError("\n".join(f"{' '.join(args)}\n{out}" for args, out in failures))
    library = folder / "libaccullm_kernels.so"
    run = subprocess.run(nvcc_link_command(objects, library, nvcc), capture_output=True, text=True)
    if run.returncode != 0:
        raise KernelBuildError(f"{' '.join(run.args)}\n{run.stdout}{run.stderr}")
    return library


def load_library(path: Path) -> ctypes.CDLL:
    """The kernel library with the C ABI's argument types set (pointers as ints: ``tensor.data_ptr()``)."""
    lib = ctypes.CDLL(str(path))
    pointer, i64, i32, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_size_t
    lib.accullm_outlier_split_gemm.argtypes = [pointer] * 6 + [i64] * 3 + [i32] * 4 + [pointer, size, pointer]
    lib.accullm_outlier_split_gemm.restype = ctypes.c_int
    lib.accullm_outlier_split_gemm_workspace_size.argtypes = [i64] * 3 + [i32] * 3
    lib.accullm_outlier_split_gemm_workspace_size.restype = size
    lib.accullm_sparse_skip_mlp.argtypes = [pointer] * 12 + [i64] * 4 + [i32] * 3 + [pointer, size, pointer]
    lib.accullm_sparse_skip_mlp.restype = ctypes.c_int
    lib.accullm_sparse_skip_mlp_workspace_size.argtypes = [i64] * 4 + [i32] * 2
    lib.accullm_sparse_skip_mlp_workspace_size.restype = size
    return lib
