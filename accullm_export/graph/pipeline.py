"""Run graph passes in order on an onnx-graphsurgeon graph and log what each one changed."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, NamedTuple, Sequence

import onnx_graphsurgeon as gs

from accullm_export.graph.ir import stored_bytes
from accullm_export.graph.pass_data import PassData, PassResult
from accullm_export.graph.passes import get_pass, pass_config

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


class PassRun(NamedTuple):
    """What ``run_passes`` returns: the rewritten graph, one report per pass, the data after the last pass."""

    graph: gs.Graph
    reports: list[PassReport]
    data: PassData


def run_passes(graph: gs.Graph, steps: Sequence[str | tuple[str, Any]], data: PassData | None = None) -> PassRun:
    """Apply passes in order and report what each changed.

    Args:
        graph: the graph to rewrite (changed in place and returned).
        steps: pass names, whose configs are taken from ``data`` (``PassData.config_for``), or
            ``(name, config)`` pairs with the pass's own config (None for a pass that takes none).
        data: what the named passes read; each pass's produced data is merged in for the passes after it.
    """
    data = PassData() if data is None else data
    reports = []
    for step in steps:
        name, config = (step, None) if isinstance(step, str) else step
        function, config_class = get_pass(name), pass_config(name)
        if isinstance(step, str) and config_class is not None:
            config = data.config_for(config_class)
        before_ops, before_bytes = _op_counts(graph), constant_bytes(graph)
        result = function(graph, config)
        if not isinstance(result, PassResult):
            result = PassResult(graph=result)
        graph, data = result.graph, data.updated(result.produced)
        after_ops, after_bytes = _op_counts(graph), constant_bytes(graph)
        report = PassReport(name=name, nodes_added=dict(after_ops - before_ops),
                            nodes_removed=dict(before_ops - after_ops), constant_bytes_before=before_bytes,
                            constant_bytes_after=after_bytes, notes=tuple(result.notes))
        log.info("%s", report.line())
        for note in report.notes:
            log.info("  %s: %s", name, note)
        reports.append(report)
    return PassRun(graph, reports, data)


def _op_counts(graph: gs.Graph) -> collections.Counter:
    return collections.Counter(node.op for node in graph.nodes)


def constant_bytes(graph: gs.Graph) -> int:
    """Stored bytes of every constant the graph uses (int4 counted as half a byte)."""
    return sum(stored_bytes(tensor) for tensor in graph.tensors().values() if isinstance(tensor, gs.Constant))
