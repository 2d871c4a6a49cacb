"""The accullm CUDA kernels on a GPU, through their C ABI (ctypes + torch CUDA tensors), against reference.py.

Shapes: SmolLM2-135M's 576x1536 and 1536x576 projections and a 7B MLP's 4096x11008; 1, 4 and 16 rows (decode GEMV
for 1 and 4, tiled GEMM for 16). The library is built with nvcc for the current device's architecture."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from plugins import kernels
from plugins.outlier_split_gemm import reference as osg
from plugins.sparse_skip_mlp import reference as ssm

pytestmark = pytest.mark.gpu

SHAPES = [(576, 1536), (1536, 576), (4096, 11008)]
ROWS = [1, 4, 16]


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="the GPU kernel tests drive CUDA buffers through torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")
    return torch


@pytest.fixture(scope="module")
def lib(torch, tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) not on PATH: cannot build the kernel library")
    major, minor = torch.cuda.get_device_capability()
    path = kernels.build_library(tmp_path_factory.mktemp("kernels"), architectures=(f"{major}{minor}",))
    return kernels.load_library(path)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


class Device:
    """Copies NumPy arrays to `device` and calls the kernels on its current stream."""

    def __init__(self, torch, device: str = "cuda"):
        self.torch, self.device = torch, device
        self.held = []

    def put(self, array: np.ndarray | None):
        if array is None:
            return None
        tensor = self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        self.held.append(tensor)
        return tensor.data_ptr()

    def empty(self, shape, dtype):
        tensor = self.torch.zeros(shape, dtype=dtype, device=self.device)
        self.held.append(tensor)
        return tensor

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream if self.device == "cuda" else None

    def synchronize(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def run_outlier_split_gemm(lib, device: Device, rows, k, n, bits, block_size, outliers=16, io=np.float16, seed=0):
    """(kernel y, reference y) for random inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(io)
    limit = 7 if bits == 4 else 127
    values = rng.integers(-limit, limit + 1, size=(k, n), dtype=np.int8)
    channels = np.sort(rng.choice(k, size=outliers, replace=False)).astype(np.int32)
    values[channels] = 0
    scale_shape = (-(-k // block_size), n) if bits == 4 else (n,)
    scales = (rng.random(scale_shape) * (0.02 if bits == 4 else 0.002) + 1e-3).astype(np.float16)
    outlier_weight = (rng.standard_normal((outliers, n)) * 0.5).astype(np.float16)
    stored = osg.pack_int4(values) if bits == 4 else values
    workspace_bytes = lib.accullm_outlier_split_gemm_workspace_size(rows, k, n, outliers, bits, block_size)
    y = device.empty((rows, n), device.torch.float16 if io == np.float16 else device.torch.float32)
    workspace = device.empty((max(workspace_bytes, 1),), device.torch.uint8)
    status = lib.accullm_outlier_split_gemm(
        device.put(x), device.put(stored), device.put(scales), device.put(channels), device.put(outlier_weight),
        y.data_ptr(), rows, k, n, outliers, bits, block_size,
        kernels.DTYPE_FLOAT16 if io == np.float16 else kernels.DTYPE_FLOAT32,
        workspace.data_ptr(), workspace_bytes, device.stream())
    assert status == 0, f"kernel returned cudaError {status}"
    device.synchronize()
    expected = osg.outlier_split_gemm(x.astype(np.float64), values, scales, channels, outlier_weight, bits=bits,
                                      block_size=block_size)
    return y.cpu().numpy(), expected


def sparse_mlp_inputs(rng, tokens, hidden, intermediate, method, block_size, rank=16):
    """Random MLP inputs. int4 scales are powers of two, so fp16 dequantization (the kernel's) is exact and the
    kernel and reference see the same weights."""
    def weight(rows, columns):
        if not block_size:
            return (rng.standard_normal((rows, columns)) / np.sqrt(rows)).astype(np.float16), None
        values = rng.integers(-7, 8, size=(rows, columns), dtype=np.int8)
        exponents = rng.integers(-9, -5, size=(-(-rows // block_size), columns))
        return values, np.exp2(exponents).astype(np.float16)

    inputs = {"x": rng.standard_normal((tokens, hidden)).astype(np.float16)}
    inputs["gate_weight"], inputs["gate_scale"] = weight(hidden, intermediate)
    inputs["up_weight"], inputs["up_scale"] = weight(hidden, intermediate)
    inputs["down_weight"], inputs["down_scale"] = weight(intermediate, hidden)
    inputs.update(down_rank=None, up_rank=None, guess_bias=None)
    if method == "predictor":  # a clearly bimodal guess: about half the neurons kept, few near the level
        inputs["down_rank"] = (rng.standard_normal((hidden, rank)) / np.sqrt(hidden)).astype(np.float16)
        inputs["up_rank"] = (rng.standard_normal((rank, intermediate)) * 0.1).astype(np.float16)
        inputs["guess_bias"] = rng.choice([-2.0, 2.0], size=intermediate).astype(np.float16)
    return inputs


def dense_float(values, scales, block_size):
    return values.astype(np.float64) if not block_size else ssm.dequantize_blocked(values, scales, block_size)


def scores_and_activation(inputs, method, block_size, activation_code=0):
    x = inputs["x"].astype(np.float64)
    gate = x @ dense_float(inputs["gate_weight"], inputs["gate_scale"], block_size)
    up = x @ dense_float(inputs["up_weight"], inputs["up_scale"], block_size)
    activation = ssm.ACTIVATIONS[activation_code](gate) * up
    if method == "threshold":
        return np.abs(activation), activation
    rank = x @ inputs["down_rank"].astype(np.float64) @ inputs["up_rank"].astype(np.float64)
    return rank + inputs["guess_bias"].astype(np.float64), activation


def run_sparse_skip_mlp(lib, device: Device, tokens, hidden, intermediate, method, block_size, sparsity=0.5, seed=0,
                        activation_code=0):
    """(kernel y, reference y, slack): slack bounds, per output, what neurons whose score lies within fp32 rounding of
    the level may contribute (the kernel selects in fp32, the reference in fp64)."""
    rng = np.random.default_rng(seed)
    inputs = sparse_mlp_inputs(rng, tokens, hidden, intermediate, method, block_size)
    scores, activation = scores_and_activation(inputs, method, block_size, activation_code)
    level = np.array(np.quantile(scores, sparsity) if method == "threshold" else 0.0, dtype=np.float16)
    rank = inputs["down_rank"].shape[1] if method == "predictor" else 0
    stored = {name: osg.pack_int4(inputs[name]) if block_size else inputs[name]
              for name in ("gate_weight", "up_weight", "down_weight")}
    workspace_bytes = lib.accullm_sparse_skip_mlp_workspace_size(tokens, hidden, intermediate, rank,
                                                                 kernels.METHODS[method], block_size)
    y = device.empty((tokens, hidden), device.torch.float16)
    workspace = device.empty((max(workspace_bytes, 1),), device.torch.uint8)
    status = lib.accullm_sparse_skip_mlp(
        device.put(inputs["x"]), device.put(stored["gate_weight"]), device.put(stored["up_weight"]),
        device.put(stored["down_weight"]), device.put(level), device.put(inputs["down_rank"]),
        device.put(inputs["up_rank"]), device.put(inputs["guess_bias"]), device.put(inputs["gate_scale"]),
        device.put(inputs["up_scale"]), device.put(inputs["down_scale"]), y.data_ptr(), tokens, hidden,
        intermediate, rank, kernels.METHODS[method], activation_code, block_size, workspace.data_ptr(),
        workspace_bytes, device.stream())
    assert status == 0, f"kernel returned cudaError {status}"
    device.synchronize()
    expected = ssm.sparse_skip_mlp(inputs["x"].astype(np.float64), inputs["gate_weight"], inputs["up_weight"],
                                   inputs["down_weight"], level, inputs["down_rank"], inputs["up_rank"],
                                   inputs["guess_bias"], inputs["gate_scale"], inputs["up_scale"],
                                   inputs["down_scale"], method=method, block_size=block_size,
                                   activation=activation_code)
    borderline = np.abs(scores - np.float64(level)) <= 1e-4 * max(abs(float(level)), 1e-3)
    down = np.abs(dense_float(inputs["down_weight"], inputs["down_scale"], block_size))
    slack = (np.abs(activation) * borderline) @ down
    assert 0.2 < (scores > np.float64(level)).mean() < 0.8  # the selection really skips neurons
    return y.cpu().numpy(), expected, slack


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bits,block_size", [(4, 64), (4, 128), (8, 0)])
@pytest.mark.parametrize("k,n", SHAPES)
def test_outlier_split_gemm_matches_reference(torch, lib, k, n, bits, block_size, rows):
    y, expected = run_outlier_split_gemm(lib, Device(torch), rows, k, n, bits, block_size)
    # fp16 output, int4 dequantized to fp16 (ONNX's semantics) then accumulated in fp32
    assert relative_error(y, expected) < 5e-3


@pytest.mark.parametrize("bits,block_size", [(4, 64), (8, 0)])
def test_outlier_split_gemm_fp32_io_and_unaligned_shapes(torch, lib, bits, block_size):
    y, expected = run_outlier_split_gemm(lib, Device(torch), 3, 576, 1536, bits, block_size, io=np.float32)
    assert y.dtype == np.float32 and relative_error(y, expected) < 1e-3  # int4: the fp16 dequantization dominates
    y, expected = run_outlier_split_gemm(lib, Device(torch), 2, 200, 100, bits, block_size, outliers=3)
    assert relative_error(y, expected) < 5e-3  # N % 8 != 0: the tiled path


@pytest.mark.parametrize("bits,block_size", [(4, 64), (4, 16), (8, 0)])
@pytest.mark.parametrize("rows,k,n", [(12, 200, 144), (3, 200, 144), (9, 1536, 576), (1, 40, 16)])
def test_outlier_split_gemm_tensor_core_edges(torch, lib, rows, k, n, bits, block_size):
    """The tensor-core GEMV (1..16 rows of fp16 x) at its edges: 9..16 rows (two MMAs per weight fragment), K not a
    multiple of its 32-row groups (a partial last group and int4 block), a last column tile partly past N, int4
    blocks of 16."""
    y, expected = run_outlier_split_gemm(lib, Device(torch), rows, k, n, bits, block_size, outliers=5)
    assert relative_error(y, expected) < 5e-3


@pytest.mark.parametrize("tokens", ROWS)
@pytest.mark.parametrize("method,block_size", [("threshold", 0), ("predictor", 0), ("threshold", 64),
                                                ("predictor", 64)])
@pytest.mark.parametrize("hidden,intermediate", [(576, 1536), (4096, 11008)])
@pytest.mark.parametrize("activation_code", sorted(ssm.ACTIVATIONS))
def test_sparse_skip_mlp_matches_reference(torch, lib, hidden, intermediate, method, block_size, tokens,
                                           activation_code):
    y, expected, slack = run_sparse_skip_mlp(lib, Device(torch), tokens, hidden, intermediate, method, block_size,
                                             activation_code=activation_code)
    tolerance = 5e-3 * np.abs(expected).max()
    excess = np.abs(y.astype(np.float64) - expected) - slack
    assert excess.max() < tolerance, f"worst excess {excess.max():.3g} over tolerance {tolerance:.3g}"
