"""TensorRT plugins on the CPU: the NumPy references against independent computations, the CUDA kernels compiled for
Orin (sm_87) and Hopper (sm_90) and linked into a library exporting the C ABI, SparseSkipMLP's plugin creator run
against TensorRT's headers, and the plugin sources consistent with the references. Running the kernels needs a GPU:
tests/gpu/test_plugin_kernels.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from plugins import kernels
from plugins.outlier_split_gemm import reference as osg
from plugins.sparse_skip_mlp import reference as ssm

PLUGINS = Path(kernels.__file__).parent
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not on PATH")


# --- OutlierSplitGemm reference --------------------------------------------------------------------------------------

def _osg_inputs(rng, bits: int, block_size: int, k: int = 200, n: int = 48, m: int = 5, dtype=np.float16):
    x = rng.standard_normal((2, 3, k)).astype(dtype)
    limit = 7 if bits == 4 else 127
    values = rng.integers(-limit, limit + 1, size=(k, n)).astype(np.int8)
    channels = np.sort(rng.choice(k, size=m, replace=False)).astype(np.int32)
    values[channels] = 0  # isolate_outliers zeroes the low-bit rows of the outlier channels
    scale_shape = (-(-k // block_size), n) if bits == 4 else (n,)
    scales = (rng.random(scale_shape) * 0.02 + 0.001).astype(np.float16)
    outlier_weight = rng.standard_normal((m, n)).astype(np.float16)
    return x, values, scales, channels, outlier_weight


@pytest.mark.parametrize("bits,block_size", [(4, 64), (4, 128), (8, 0)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_outlier_split_gemm_reference_equals_dense_float_layer(rng, bits, block_size, dtype):
    """Independent computation: dequantize element by element, scatter the outlier rows back into a dense [K, N]
    float weight, and multiply once."""
    x, values, scales, channels, outlier_weight = _osg_inputs(rng, bits, block_size, dtype=dtype)
    k, n = values.shape
    dense = np.zeros((k, n))
    for row in range(k):
        scale_row = scales[row // block_size] if bits == 4 else scales
        dense[row] = values[row].astype(np.float64) * scale_row.astype(np.float64)
    dense[channels] += outlier_weight.astype(np.float64)
    expected = (x.astype(np.float64).reshape(-1, k) @ dense).reshape(2, 3, n)

    y = osg.outlier_split_gemm(x, values, scales, channels, outlier_weight, bits=bits, block_size=block_size)

    assert y.dtype == dtype and y.shape == (2, 3, n)
    np.testing.assert_allclose(y.astype(np.float64), expected, rtol=1e-3 if dtype == np.float16 else 1e-6,
                               atol=1e-3 if dtype == np.float16 else 1e-9)


def test_outlier_split_gemm_dequantization_matches_the_quantizer(rng):
    """The op's scales are the ones accullm_export.quant.symmetric writes (int8 per channel stored as [N])."""
    from accullm_export.quant.symmetric import dequantize, quantize

    weight = rng.standard_normal((256, 32)).astype(np.float32)
    values, scales = quantize(weight, bits=4, block_size=64)
    np.testing.assert_allclose(osg.dequantize(values, scales, 4, 64), dequantize(values, scales, 64), rtol=1e-6)
    values, scales = quantize(weight, bits=8)
    np.testing.assert_allclose(osg.dequantize(values, scales.reshape(-1), 8, 0), dequantize(values, scales),
                               rtol=1e-6)


def test_outlier_split_gemm_reference_rejects_attributes_outside_the_op():
    values, scales = np.zeros((4, 2), np.int8), np.ones((1, 2), np.float16)
    with pytest.raises(ValueError, match="block_size"):
        osg.dequantize(values, scales, 4, 0)
    with pytest.raises(ValueError, match="block_size must be 0"):
        osg.dequantize(values, scales.reshape(-1), 8, 64)
    with pytest.raises(ValueError, match="4 or 8"):
        osg.dequantize(values, scales, 3, 0)


def test_int4_packing_is_low_nibble_first_row_major():
    packed = osg.pack_int4(np.array([[1, -2], [7, -8]], dtype=np.int8))
    np.testing.assert_array_equal(packed, np.array([0xE1, 0x87], dtype=np.uint8))
    np.testing.assert_array_equal(osg.pack_int4(np.array([3, -1, 5], np.int8)), np.array([0xF3, 0x05], np.uint8))


@pytest.mark.parametrize("shape", [(64, 48), (7, 5), (1, 1)])
def test_int4_packing_round_trips(rng, shape):
    values = rng.integers(-8, 8, size=shape).astype(np.int8)
    packed = osg.pack_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (values.size + 1) // 2
    np.testing.assert_array_equal(osg.unpack_int4(packed, shape), values)
    # ml_dtypes' int4 (what onnx-graphsurgeon hands over) packs the same values identically
    np.testing.assert_array_equal(osg.pack_int4(values.astype(ml_dtypes.int4)), packed)


def test_int4_packing_rejects_values_outside_int4():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        osg.pack_int4(np.array([8], np.int16))


# --- SparseSkipMLP reference ---------------------------------------------------------------------------------------

def _silu(values):
    return values / (1.0 + np.exp(-values))


def _gelu_tanh(values):
    inner = np.sqrt(2.0 / np.pi) * (values + 0.044715 * values ** 3)
    return values * (1.0 + np.tanh(inner)) / 2.0


ACTIVATION_FUNCTIONS = {0: _silu, 1: _gelu_tanh}  # the op's activation attribute -> the gate's activation


@pytest.mark.parametrize("activation", sorted(ACTIVATION_FUNCTIONS))
@pytest.mark.parametrize("method", ["threshold", "predictor"])
def test_sparse_skip_mlp_reference_equals_masked_dense_mlp(rng, method, activation):
    """Independent computation: the whole batch at once, dense activations times a 0/1 mask, no neuron lists."""
    tokens, hidden, intermediate, rank = 5, 32, 64, 4
    x = rng.standard_normal((tokens, hidden))
    gate, up = rng.standard_normal((2, hidden, intermediate)) / np.sqrt(hidden)
    down = rng.standard_normal((intermediate, hidden)) / np.sqrt(intermediate)
    down_rank, up_rank = rng.standard_normal((hidden, rank)), rng.standard_normal((rank, intermediate))
    guess_bias = rng.standard_normal(intermediate) * 0.1
    values = ACTIVATION_FUNCTIONS[activation](x @ gate) * (x @ up)
    score = np.abs(values) if method == "threshold" else x @ down_rank @ up_rank + guess_bias
    level = np.quantile(score, 0.5)
    expected = (values * (score > level)) @ down

    y = ssm.sparse_skip_mlp(x, gate, up, down, level, down_rank, up_rank, guess_bias, method=method,
                            activation=activation)

    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(y, values @ down)  # the level really dropped neurons


def test_sparse_skip_mlp_reference_defaults_to_silu(rng):
    """A node written before the activation attribute existed computes SiLU."""
    x, down = rng.standard_normal((4, 16)), rng.standard_normal((32, 16))
    gate, up = rng.standard_normal((2, 16, 32))
    default = ssm.sparse_skip_mlp(x, gate, up, down, 0.1, method="threshold")
    np.testing.assert_array_equal(default, ssm.sparse_skip_mlp(x, gate, up, down, 0.1, method="threshold",
                                                               activation=0))


@pytest.mark.parametrize("activation", [2, -1])
def test_sparse_skip_mlp_reference_refuses_an_unknown_activation(activation):
    x, weight = np.zeros((1, 4)), np.zeros((4, 4))
    with pytest.raises(ValueError, match="unknown activation"):
        ssm.sparse_skip_mlp(x, weight, weight, weight, 0.0, method="threshold", activation=activation)


def test_sparse_skip_mlp_activation_codes_agree_everywhere():
    """reference.py, the kernel's C ABI constants and the swap pass give each activation the same code, and the
    swap pass has a code for every activation the MLP matcher finds."""
    from accullm_export.graph.mlp import GATE_ACTIVATIONS
    from accullm_export.graph.passes import fuse_sparse_skip_mlp

    reference = {function.__name__: code for code, function in ssm.ACTIVATIONS.items()}
    header = (PLUGINS / "sparse_skip_mlp" / "SparseSkipMLPKernel.h").read_text()
    defined = {name.lower(): int(code) for name, code in
               re.findall(r"#define ACCULLM_SPARSE_ACTIVATION_(\w+) (\d+)", header)}
    assert reference == defined == fuse_sparse_skip_mlp.ACTIVATIONS == {"silu": 0, "gelu_tanh": 1}
    assert set(GATE_ACTIVATIONS) == set(reference)


# --- CUDA kernels: compile, link, export ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory):
    """libaccullm_kernels.so with SASS for sm_87 and sm_90 (both .cu files compiled in parallel)."""
    if NVCC is None:
        pytest.skip("nvcc (CUDA toolkit) not on PATH")
    return kernels.build_library(tmp_path_factory.mktemp("kernels"), architectures=("87", "90"))


@needs_nvcc
def test_kernels_compile_for_orin_and_hopper(kernel_library):
    for source in kernels.KERNEL_SOURCES:
        obj = kernel_library.parent / f"{source.stem}.o"
        architectures = set(re.findall(rb"sm_\d+", obj.read_bytes()))
        assert {b"sm_87", b"sm_90"} <= architectures, (source.name, architectures)


@needs_nvcc
@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not on PATH")
def test_kernel_library_exports_the_c_abi(kernel_library):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(kernel_library)], capture_output=True,
                             text=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
    assert set(kernels.EXPORTED_SYMBOLS) <= exported
    assert not any(name.startswith("_ZN7accullm") for name in exported)  # only the C ABI is visible


@needs_nvcc
def test_kernel_library_host_side_without_a_gpu(kernel_library):
    """Loading and the host-only entry points need no GPU (cudart is linked statically); argument errors come back
    as cudaErrorInvalidValue (1) before anything is launched."""
    try:
        lib = kernels.load_library(kernel_library)
    except OSError as error:  # no CUDA driver library at all: the nm test above covers the exports
        pytest.skip(f"ctypes cannot load the kernel library here: {error}")
    gemm_workspace = lib.accullm_outlier_split_gemm_workspace_size
    assert gemm_workspace(1, 4096, 11008, 8, 5, 64) == 0  # bits 5: not the op
    one, eight = gemm_workspace(1, 4096, 11008, 8, 4, 64), gemm_workspace(8, 4096, 11008, 8, 4, 64)
    assert eight >= one > 0 and one % (4 * 11008) == 0  # fp32 partial sums of whole split-K slices
    assert gemm_workspace(16, 4096, 100, 0, 4, 64) == 0  # N not a multiple of 8: tiled GEMM, no split-K
    # 9..16 rows take the tensor-core GEMV, which splits K too: the workspace covers all 16 rows' partials
    assert gemm_workspace(16, 4096, 11008, 8, 4, 64) >= 2 * 16 * 4 * 11008
    status = lib.accullm_outlier_split_gemm(None, None, None, None, None, None, 1, 64, 64, 0, 4, 0, 0, None, 0,
                                            None)
    assert status == 1  # bits 4 with block_size 0
    assert lib.accullm_outlier_split_gemm(None, None, None, None, None, None, 0, 64, 64, 0, 4, 64, 0, None, 0,
                                          None) == 0  # no rows: nothing to do
    mlp_workspace = lib.accullm_sparse_skip_mlp_workspace_size
    threshold, predictor = mlp_workspace(4, 576, 1536, 0, 0, 0), mlp_workspace(4, 576, 1536, 16, 1, 0)
    assert predictor > threshold >= 3 * 4 * 4 * 1536  # gate, up, activation buffers in fp32
    assert mlp_workspace(1, 576, 1536, 0, 1, 0) == 0  # the predictor needs a rank
    assert lib.accullm_sparse_skip_mlp(*[None] * 12, 1, 576, 1536, 0, 7, 0, 0, None, 0, None) == 1  # method 7
    for activation, status in ((0, 0), (1, 0), (2, 1), (-1, 1)):  # no tokens: nothing to do, once it is the op
        assert lib.accullm_sparse_skip_mlp(*[None] * 12, 0, 576, 1536, 0, 0, activation, 0, None, 0, None) == status


def test_compile_command_carries_the_tuning_knobs(tmp_path):
    command = kernels.nvcc_compile_command(Path("k.cu"), tmp_path / "k.o", ("90",),
                                           defines={"ACCULLM_MMA_STAGES": 4, "ACCULLM_GEMV_THREADS": 256})
    assert "-DACCULLM_MMA_STAGES=4" in command and "-DACCULLM_GEMV_THREADS=256" in command
    assert not any(flag.startswith("-D") for flag in kernels.nvcc_compile_command(Path("k.cu"), tmp_path / "k.o"))


def test_tune_gemv_knob_arguments():
    from plugins import tune_gemv

    args = tune_gemv.parse_args(["--knob", "ACCULLM_MMA_STAGES=3,4", "--knob", "ACCULLM_MMA_WARPS=4"])
    assert dict(args.knob) == {"ACCULLM_MMA_STAGES": [3, 4], "ACCULLM_MMA_WARPS": [4]}
    for bad in ("STAGES=3", "ACCULLM_MMA_STAGES", "ACCULLM_MMA_STAGES=x"):
        with pytest.raises(SystemExit):
            tune_gemv.parse_args(["--knob", bad])
    assert tune_gemv.parse_args([]).knob == []  # the sweep then uses DEFAULT_KNOBS


@needs_nvcc
def test_knob_macros_reach_the_kernels(tmp_path):
    """A knob outside its range fails at compile time with its own message (the macros are really read)."""
    source = kernels.KERNEL_SOURCES[0]
    run = subprocess.run(kernels.nvcc_compile_command(source, tmp_path / "k.o", ("90",),
                                                      defines={"ACCULLM_MMA_STAGES": 1}),
                         capture_output=True, text=True)
    assert run.returncode != 0 and "ACCULLM_MMA_STAGES: at least 2" in run.stdout + run.stderr


# --- SparseSkipMLP's plugin creator, driven as TensorRT drives it (headers only, no GPU) ----------------------------

TENSORRT_INCLUDE = PLUGINS.parent.parent / "shared" / "tensorrt" / "10.3" / "include"  # as test_plugin_headers.py

CREATOR_HARNESS = r"""
// argv: method block_size [activation] (the activation field only when given). Prints the activation field the
// created plugin serializes and the one a plugin re-created from those fields (deserialization) serializes, or
// "refused" when the creator returns no plugin.
#include "SparseSkipMLPPlugin.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace nvinfer1;

namespace
{
int32_t serializedActivation(IPluginV3* plugin)
{
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* fields = runtime->getFieldsToSerialize();
    for (int32_t i = 0; i < fields->nbFields; ++i)
    {
        if (std::strcmp(fields->fields[i].name, "activation") == 0)
        {
            return *static_cast<int32_t const*>(fields->fields[i].data);
        }
    }
    return -1;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc < 3)
    {
        return 2;
    }
    int32_t const blockSize = std::atoi(argv[2]);
    int32_t const activation = argc > 3 ? std::atoi(argv[3]) : 0;
    std::vector<PluginField> fields{
        {"method", argv[1], PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(argv[1]) + 1)},
        {"block_size", &blockSize, PluginFieldType::kINT32, 1}};
    if (argc > 3)
    {
        fields.emplace_back("activation", &activation, PluginFieldType::kINT32, 1);
    }
    PluginFieldCollection const collection{static_cast<int32_t>(fields.size()), fields.data()};
    accullm::plugin::SparseSkipMLPPluginCreator creator;
    IPluginV3* plugin = creator.createPlugin("mlp", &collection, TensorRTPhase::kBUILD);
    if (plugin == nullptr)
    {
        std::printf("refused\n");
        return 0;
    }
    PluginFieldCollection const serialized = *static_cast<IPluginV3OneRuntime*>(
        plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->getFieldsToSerialize();
    IPluginV3* restored = creator.createPlugin("mlp", &serialized, TensorRTPhase::kRUNTIME);
    std::printf("%d %d\n", serializedActivation(plugin), restored != nullptr ? serializedActivation(restored) : -2);
    delete restored;
    delete plugin;
    return 0;
}
"""


@pytest.fixture(scope="module")
def creator_harness(kernel_library, tmp_path_factory):
    """CREATOR_HARNESS linked with the plugin sources and the kernel library, against TensorRT 10.3's headers."""
    if not (TENSORRT_INCLUDE / "NvInferRuntime.h").is_file():
        pytest.skip(f"TensorRT 10.3 headers not found at {TENSORRT_INCLUDE} (the shared folder beside the checkout)")
    folder = tmp_path_factory.mktemp("creator")
    (folder / "creator.cpp").write_text(CREATOR_HARNESS)
    sources = [folder / "creator.cpp", PLUGINS / "sparse_skip_mlp" / "SparseSkipMLPPlugin.cpp",
               PLUGINS / "outlier_split_gemm" / "OutlierSplitGemmPlugin.cpp", PLUGINS / "common" / "accullmPlugin.cpp"]
    run = subprocess.run([NVCC, "-std=c++17", "-Xcompiler", "-Wall,-Wextra,-Werror", "-I",
                          str(PLUGINS / "sparse_skip_mlp"), "-isystem", str(TENSORRT_INCLUDE), *map(str, sources),
                          str(kernel_library), "-Xlinker", f"-rpath={kernel_library.parent}", "-o",
                          str(folder / "creator")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return folder / "creator"


@needs_nvcc
@pytest.mark.parametrize("fields,printed", [
    (["threshold", "0"], "0 0"),  # a node or engine written before the activation field: silu
    (["predictor", "64", "0"], "0 0"),
    (["threshold", "64", "1"], "1 1"),
    (["predictor", "0", "1"], "1 1")])
def test_sparse_skip_mlp_creator_reads_and_serializes_the_activation(creator_harness, fields, printed):
    run = subprocess.run([creator_harness, *fields], capture_output=True, text=True)
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, printed, "")


@needs_nvcc
@pytest.mark.parametrize("activation", ["2", "-1"])
def test_sparse_skip_mlp_creator_refuses_an_unknown_activation(creator_harness, activation):
    run = subprocess.run([creator_harness, "threshold", "0", activation], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "refused"
    assert f"activation must be 0 (silu) or 1 (gelu_tanh), got {activation}" in run.stderr


# --- Plugin sources against the references ---------------------------------------------------------------------

def _constant(source: str, name: str) -> str:
    match = re.search(rf'constexpr char const\* {name} = "([^"]*)"', source)
    assert match, f"{name} not found"
    return match.group(1)


@pytest.mark.parametrize("folder,stem,prefix,reference", [
    ("outlier_split_gemm", "OutlierSplitGemm", "OUTLIER_SPLIT_GEMM", osg),
    ("sparse_skip_mlp", "SparseSkipMLP", "SPARSE_SKIP_MLP", ssm)])
def test_plugin_sources_name_the_reference_op(folder, stem, prefix, reference):
    header = (PLUGINS / folder / f"{stem}Plugin.h").read_text()
    source = (PLUGINS / folder / f"{stem}Plugin.cpp").read_text()
    common = (PLUGINS / "common" / "accullmPlugin.h").read_text()
    bases = (PLUGINS / "common" / "accullmPluginBase.h").read_text()  # the IPluginV3 boilerplate both share
    assert _constant(header, f"k{prefix}_NAME") == reference.OP_TYPE
    assert _constant(header, f"k{prefix}_VERSION") == str(reference.VERSION)
    assert _constant(common, "kPLUGIN_NAMESPACE") == reference.DOMAIN
    for base in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime", "IPluginCreatorV3One"):
        assert f"public nvinfer1::{base}" in bases
    assert f"public PluginV3OneBase<{stem}Plugin>" in header
    assert f"public PluginCreatorV3OneBase<{stem}Plugin>" in header
    overrides = [line for line in (header + bases).splitlines() if "override" in line and "~" not in line]
    assert len(overrides) >= 20 and all("noexcept" in line for line in overrides)
    assert f"k{prefix}_NAME" in source and "getFieldsToSerialize" in source
    assert "accullm_" in source  # enqueue calls the kernel's C ABI


def test_plugin_library_exports_tensorrt_entry_points():
    source = (PLUGINS / "common" / "accullmPlugin.cpp").read_text()
    assert re.search(r'extern "C" .*void setLoggerFinder\(nvinfer1::ILoggerFinder\* finder\)', source)
    assert re.search(r'extern "C" .*IPluginCreatorInterface\* const\* getCreators\(\s*int32_t& nbCreators\)', source)
    assert source.count("REGISTER_TENSORRT_PLUGIN(") == 2


def test_swap_pass_emits_the_plugin_op():
    from accullm_export.graph.passes import fuse_sparse_skip_mlp

    assert (fuse_sparse_skip_mlp.OP_TYPE, fuse_sparse_skip_mlp.DOMAIN, fuse_sparse_skip_mlp.VERSION) == (
        ssm.OP_TYPE, ssm.DOMAIN, ssm.VERSION)


def test_cmake_defaults_to_orin_and_hopper_architectures():
    cmake = (PLUGINS / "CMakeLists.txt").read_text()
    default = re.search(r'if\(NOT DEFINED CMAKE_CUDA_ARCHITECTURES\)\s*set\(CMAKE_CUDA_ARCHITECTURES "([^"]+)"\)',
                        cmake)
    assert default and default.group(1).split(";") == ["87", "90"]
    assert default.start() < cmake.index("project(")  # CMake reads the default when CUDA is enabled
    assert set(kernels.DEFAULT_ARCHITECTURES) == {"87", "90"}
    for source in kernels.KERNEL_SOURCES:
        assert source.relative_to(PLUGINS).as_posix() in cmake
    assert "find_path(TensorRT_INCLUDE_DIR NvInferRuntime.h" in cmake
    assert "find_library(TensorRT_LIBRARY nvinfer" in cmake
