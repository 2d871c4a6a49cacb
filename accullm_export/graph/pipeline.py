"""Run graph passes in order on an onnx-graphsurgeon graph and log what each one changed."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Sequence

import onnx_graphsurgeon as gs

from accullm_export.graph.ir import stored_bytes
from accullm_export.graph.passes import get_pass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PassReport:
    """What one pass changed: nodes added and removed by op type, and bytes of constants."""

    name: str
    nodes_added: dict[str, int]
    nodes_removed: dict[str, int]
    constant_bytes_before: int
    constant_bytes_after: int
    notes: tuple[str, ...] = ()

    @property
    def bytes_saved(self) -> int:
        return self.constant_bytes_before - self.constant_bytes_after

    def line(self) -> str:
        added = ", ".join(f"+{n} {op}" for op, n in sorted(self.nodes_added.items())) or "no nodes added"
        removed = ", ".join(f"-{n} {op}" for op, n in sorted(self.nodes_removed.items())) or "none removed"
        change = self.constant_bytes_after - self.constant_bytes_before
        return (f"{self.name}: {added}; {removed}; constants {self.constant_bytes_before / 2**20:.2f} -> "
                f"{self.constant_bytes_after / 2**20:.2f} MiB ({change / 2**20:+.2f} MiB)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"bytes_saved": self.bytes_saved}


def run_passes(graph: gs.Graph, passes: Sequence[tuple[str, Any]]) -> tuple[gs.Graph, list[PassReport]]:
    """Apply ``(pass name, config)`` pairs in order; returns the graph and one report per pass.

    A config may carry a ``notes`` list; what a pass appends there (what it left alone and why) is logged and
    kept in its report.
    """
    reports = []
    for name, config in passes:
        before_ops, before_bytes = _op_counts(graph), constant_bytes(graph)
        notes = getattr(config, "notes", None)
        start = len(notes) if notes is not None else 0
        graph = get_pass(name)(graph, config)
        after_ops, after_bytes = _op_counts(graph), constant_bytes(graph)
        added = tuple(notes[start:]) if notes is not None else ()
        report = PassReport(name=name, nodes_added=dict(after_ops - before_ops),
                            nodes_removed=dict(before_ops - after_ops), constant_bytes_before=before_bytes,
                            constant_bytes_after=after_bytes, notes=added)
        log.info("%s", report.line())
        for note in added:
            log.info("  %s: %s", name, note)
        reports.append(report)
    return graph, reports


def _op_counts(graph: gs.Graph) -> collections.Counter:
    return collections.Counter(node.op for node in graph.nodes)


def constant_bytes(graph: gs.Graph) -> int:
    """Stored bytes of every constant the graph uses (int4 counted as half a byte)."""
    return sum(stored_bytes(tensor) for tensor in graph.tensors().values() if isinstance(tensor, gs.Constant))
