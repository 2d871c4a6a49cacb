"""The CPU meter the benchmark scripts share."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path


@dataclasses.dataclass
class CpuMeter:
    """How much of the machine's CPU other processes used while we timed (this machine may be shared).

    Reads /proc/stat (busy time of all CPUs, steal included) and this process's own CPU time; on systems
    without /proc it reports nothing.
    """

    started_wall: float = 0.0
    started_busy: float | None = None
    started_own: float = 0.0

    @staticmethod
    def _machine_busy_seconds() -> float | None:
        try:
            ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = ticks
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self.started_wall, self.started_busy = time.perf_counter(), self._machine_busy_seconds()
        self.started_own = sum(os.times()[:2])

    def others_share(self) -> float | None:
        """Fraction of all CPUs' time since start() spent outside this process (0 on a quiet machine)."""
        busy = self._machine_busy_seconds()
        if busy is None or self.started_busy is None:
            return None
        own = sum(os.times()[:2]) - self.started_own
        capacity = (time.perf_counter() - self.started_wall) * (os.cpu_count() or 1)
        return max(0.0, (busy - self.started_busy - own) / capacity)
