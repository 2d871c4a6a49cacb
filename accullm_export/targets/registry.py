"""The target registry: one frozen ``TargetProfile`` per device family, looked up by name.

Figures are the vendors' published ones for the named reference device (memory bandwidth is what bounds
batch-1 decode). The decode roofline is bytes read per token / bandwidth: every weight byte once, plus the KV
cache; ``build`` prints it as the speed ceiling for the device.
"""

from __future__ import annotations

import dataclasses

from accullm_export.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
# which precisions each recipe needs (weights and activations)
RECIPE_PRECISIONS = {"fp16": ("fp16",), "w8a8": ("int8", "fp16"), "w4a16": ("int4", "fp16"), "fp8": ("fp8",)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetProfile:
    """One deployment target.

    Attributes:
        backend: ``tensorrt`` (an engine built on the device) or ``onnxruntime`` (an ONNX Runtime model folder).
        compute_capability: the GPU's SM version as "major.minor" (None for CPUs).
        precisions: what the engine may use; a recipe needing anything else is refused.
        bandwidth_gbps: device memory bandwidth in GB/s (None: measured on this machine at build time).
        tensorrt_version: the TensorRT "major.minor" of the software stack the target assumes (its ONNX parser
            decides which ops a bundle may use); ``build --tensorrt-version`` overrides it. None for ONNX Runtime.
        tensorrt_stack: where that version comes from on the device, for messages.
    """

    name: str
    device: str
    backend: str
    compute_capability: str | None
    precisions: tuple[str, ...]
    default_preset: str
    memory_gb: float | None
    workspace_mb: int
    dla_cores: int
    bandwidth_gbps: float | None
    tensorrt_version: str | None = None
    tensorrt_stack: str = ""
    notes: str = ""
    version: int = 2

    @property
    def cuda_arch(self) -> str | None:
        """The CMake / nvcc architecture number, e.g. "87" for sm_87."""
        return self.compute_capability.replace(".", "") if self.compute_capability else None

    def check_recipe(self, recipe: str) -> None:
        """UserError when ``recipe`` needs a precision this target lacks (FP8 on Orin, say)."""
        needed = RECIPE_PRECISIONS.get(recipe)
        if needed is None:
            raise UserError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPE_PRECISIONS)}")
        missing = [p for p in needed if p not in self.precisions]
        if missing:
            raise UserError(f"target {self.name} ({self.device}) has no {'/'.join(missing).upper()} support; "
                            f"it runs {', '.join(self.precisions)} (recipes: {', '.join(self.recipes())})")

    def recipes(self) -> list[str]:
        return [r for r, needed in RECIPE_PRECISIONS.items() if all(p in self.precisions for p in needed)]

    def decode_ceiling(self, bytes_per_token: int, bandwidth_gbps: float | None = None) -> float | None:
        """Tokens/s at which reading ``bytes_per_token`` saturates the memory bandwidth."""
        bandwidth = bandwidth_gbps or self.bandwidth_gbps
        if not bandwidth or bytes_per_token <= 0:
            return None
        return bandwidth * 1e9 / bytes_per_token

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"cuda_arch": self.cuda_arch, "recipes": self.recipes()}


_GPU = ("fp32", "fp16", "int8", "int4")
# JetPack 6 (every Orin in the field) ships TensorRT 10.3; Orin also runs newer JetPacks: --tensorrt-version
_JETPACK6 = {"tensorrt_version": "10.3", "tensorrt_stack": "JetPack 6"}
# a workstation or server installs its own TensorRT; the oldest version the kit lowers for parses everywhere
_SERVER = {"tensorrt_version": "10.3", "tensorrt_stack": "the TensorRT installed on the machine"}
TARGETS: dict[str, TargetProfile] = {t.name: t for t in (
    TargetProfile(name="orin", device="Jetson AGX Orin 64GB", backend="tensorrt", compute_capability="8.7",
                  precisions=_GPU, default_preset="w4a16", memory_gb=64, workspace_mb=4096, dla_cores=2,
                  bandwidth_gbps=204.8, **_JETPACK6,
                  notes="no FP8; weight-only INT4; 2 DLA cores (FP16/INT8 convolutions)"),
    TargetProfile(name="orin-nx", device="Jetson Orin NX 16GB", backend="tensorrt", compute_capability="8.7",
                  precisions=_GPU, default_preset="w4a16", memory_gb=16, workspace_mb=2048, dla_cores=2,
                  bandwidth_gbps=102.4, **_JETPACK6, notes="no FP8; memory shared with the CPU"),
    TargetProfile(name="orin-nano", device="Jetson Orin Nano 8GB", backend="tensorrt", compute_capability="8.7",
                  precisions=_GPU, default_preset="w4a16", memory_gb=8, workspace_mb=1024, dla_cores=0,
                  bandwidth_gbps=68.0, **_JETPACK6, notes="no FP8, no DLA; memory shared with the CPU"),
    TargetProfile(name="thor", device="Jetson AGX Thor", backend="tensorrt", compute_capability="11.0",
                  precisions=_GPU + ("bf16", "fp8"), default_preset="w4a16", memory_gb=128, workspace_mb=8192,
                  dla_cores=0, bandwidth_gbps=273.0, tensorrt_version="10.3", tensorrt_stack="JetPack 7",
                  notes="Blackwell (sm_110 in CUDA 13); FP8 and FP4 tensor cores; JetPack 7's TensorRT 10.x parses "
                        "everything 10.3's does (--tensorrt-version for a newer form)"),
    TargetProfile(name="ampere", device="NVIDIA A100 40GB (Ampere)", backend="tensorrt", compute_capability="8.0",
                  precisions=_GPU + ("bf16",), default_preset="w4a16", memory_gb=40, workspace_mb=8192,
                  dla_cores=0, bandwidth_gbps=1555.0, **_SERVER, notes="no FP8"),
    TargetProfile(name="ada", device="NVIDIA L40S (Ada)", backend="tensorrt", compute_capability="8.9",
                  precisions=_GPU + ("bf16", "fp8"), default_preset="w4a16", memory_gb=48, workspace_mb=8192,
                  dla_cores=0, bandwidth_gbps=864.0, **_SERVER),
    TargetProfile(name="hopper", device="NVIDIA H100 SXM 80GB (Hopper)", backend="tensorrt",
                  compute_capability="9.0", precisions=_GPU + ("bf16", "fp8"), default_preset="w4a16", memory_gb=80,
                  workspace_mb=16384, dla_cores=0, bandwidth_gbps=3350.0, **_SERVER),
    TargetProfile(name="cpu", device="this machine's CPU (ONNX Runtime)", backend="onnxruntime",
                  compute_capability=None, precisions=("fp32", "fp16", "int8", "int4"), default_preset="w4a16",
                  memory_gb=None, workspace_mb=0, dla_cores=0, bandwidth_gbps=None,
                  notes="bandwidth measured at build time; the output runs in our runtime and onnxruntime-genai"),
)}


def get_target(name: str) -> TargetProfile:
    """The named target; UserError lists the known ones."""
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)} (`accullm-export targets`)")
    return TARGETS[name]
