"""Memory a step will need, estimated before it starts from the sizes it knows, against what the machine has.

The estimates are linear in the model's weight bytes (its fp32/fp16 initializers) plus the working sets that do
not scale with them (the interpreter and libraries, activations of one window, logits over the vocabulary). A
step whose estimate exceeds the memory the kernel reports as available stops with one line before any work,
instead of being killed by the out-of-memory killer midway. ``ACCULLM_EXPORT_MEMORY_CHECK=off`` skips the
check (for a machine whose reported availability is misleading, e.g. a container limit the kernel does not
show).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from accullm_export.errors import UserError

GB = 1e9
CHECK_VARIABLE = "ACCULLM_EXPORT_MEMORY_CHECK"
_BASE_BYTES = 1 << 30  # the interpreter with numpy, onnx, ONNX Runtime and (for distillation) torch loaded


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What a step needs: named parts in bytes, summed."""

    step: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def line(self) -> str:
        shown = ", ".join(f"{name} {size / GB:.1f}" for name, size in self.parts.items() if size >= 0.05 * GB)
        return f"about {self.total / GB:.1f} GB ({shown})"


def available_bytes() -> int | None:
    """MemAvailable plus free swap from /proc/meminfo, and the cgroup's memory limit where it is lower; None
    where neither can be read (not Linux)."""
    try:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024
                  for line in Path("/proc/meminfo").read_text().splitlines() if line.split()[1:]}
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in fields:
        return None
    available = fields["MemAvailable"] + fields.get("SwapFree", 0)
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _cgroup_room() -> int | None:
    """The cgroup v2 memory limit minus its current use, where a limit is set."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" or not limit.isdigit() else max(int(limit) - current, 0)


def check_memory(estimate: Estimate) -> None:
    """UserError (one line) when ``estimate`` exceeds the available memory; nothing when it fits, when the
    machine does not say, or when ``ACCULLM_EXPORT_MEMORY_CHECK=off``."""
    if os.environ.get(CHECK_VARIABLE, "").lower() in ("off", "0", "false", "no"):
        return
    available = available_bytes()
    if available is None or estimate.total <= available:
        return
    raise UserError(f"{estimate.step} needs {estimate.line()} of memory, and this machine has "
                    f"{available / GB:.1f} GB available: free memory or use a larger machine "
                    f"({CHECK_VARIABLE}=off tries anyway)")


def quantize_estimate(weights: int, *, moments: int, distill_logits: int, distill: bool) -> Estimate:
    """``quantize``: the source graph's weights once (the statistics sessions and the teacher share them), the
    second moments held at once, and for distillation the student (its integers, the layer weights it rebuilds
    and its activations for autograd) plus one chunk of the logits (teacher and student, their softmaxes and
    gradients)."""
    parts = {"base": _BASE_BYTES, "weights": weights, "second moments": moments}
    if distill:
        parts |= {"student": weights, "logits": 6 * distill_logits}
    return Estimate("quantize", parts)


MMAP_THRESHOLD_BYTES = 1 << 20
REUSE_THRESHOLD_BYTES = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h's parameter numbers
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_fixed_threshold = False  # return_freed_memory has set MMAP_THRESHOLD_BYTES in this process


def _libc_function(name: str):
    """The C library's function ``name``, or None where there is none (not glibc)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def _mallopt():
    import ctypes

    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return None
    return lambda parameter, value: mallopt(ctypes.c_int(parameter), ctypes.c_int(value))


def return_freed_memory() -> None:
    """Have the C library's allocator hand each freed block of ``MMAP_THRESHOLD_BYTES`` or more back to the system.

    glibc's malloc raises its mmap threshold to the size of a mapped block once one is freed, up to 32 MiB, so
    after the first freed weight every later array of a decoder layer's size comes from the heap; a step that reads,
    copies and frees weights layer by layer then keeps their peak resident for good. A fixed threshold maps each
    large array on its own and unmaps it when freed. Elsewhere than glibc this does nothing."""
    global _fixed_threshold
    mallopt = _mallopt()
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)  # setting it also turns the dynamic threshold off
    _fixed_threshold = True


@contextlib.contextmanager
def reused_allocations():
    """Within the block, freed arrays of up to ``REUSE_THRESHOLD_BYTES`` stay with the allocator for the next
    allocation, where ``return_freed_memory`` would unmap them: a training loop frees and allocates the same
    tensors every step, and each fresh mapping costs the kernel a zeroed page per 4 KB touched. On leaving, the
    fixed threshold comes back and the free heap is handed back to the system. Without ``return_freed_memory``
    (glibc's dynamic threshold already reuses) or outside glibc, it does nothing."""
    mallopt = _mallopt() if _fixed_threshold else None
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, REUSE_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # nor is the top of the heap given back between steps
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        trim = _libc_function("malloc_trim")
        if trim is not None:
            import ctypes

            trim(ctypes.c_size_t(0))

