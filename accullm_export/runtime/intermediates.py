"""Read intermediate tensors of an ONNX model by marking a few of them as outputs at a time.

Marking every tensor at once runs out of memory on real models, so callers ask for small groups. Each group's
session runs only the nodes its tensors depend on (ONNX Runtime runs every node of a graph, whatever outputs are
fetched): a layer's input needs no later layer and no LM head. The modified graph (a few hundred kB, no weights)
is handed to ONNX Runtime serialized in memory, with the model's folder as the place of its external data: no
temporary file is written, beside the input or anywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from accullm_export.runtime.session import create_session


class IntermediateReader:
    """Runs one model with extra outputs; the graph proto (without weights) is loaded once."""

    def __init__(self, model_path: str | Path, optimization: str = "basic",
                 shared_initializers: Mapping[str, np.ndarray] | None = None, device: str = "cpu"):
        """``shared_initializers``: the model's weights as arrays the caller already holds, used by the sessions
        in place of loading them again; ``device``: "cpu" or "cuda" (``create_session``)."""
        path = Path(model_path)
        self.model_path = path / "model.onnx" if path.is_dir() else path
        self.optimization = optimization
        self.shared_initializers = shared_initializers
        self.device = device
        self.model = onnx.load(str(self.model_path), load_external_data=False)
        self.nodes_by_output = {out: node for node in self.model.graph.node for out in node.output}

    def tensor_names(self) -> list[str]:
        """Every node output, in the graph's (topological) order."""
        return [out for node in self.model.graph.node for out in node.output if out]

    def open(self, names: Sequence[str], given: Mapping[str, np.dtype] | None = None) -> "Tap":
        """A session that returns ``names``; reuse it for many feeds (one session per group of tensors).
        ``given``: intermediate tensors (name -> dtype) the feeds hold, computed earlier (``pruned``)."""
        return Tap(self._session(self.pruned(names, given)), list(names))

    def pruned(self, names: Sequence[str], given: Mapping[str, np.dtype] | None = None) -> onnx.ModelProto:
        """The model (without weights) whose outputs are ``names``, holding only the nodes and initializers they
        depend on. A graph with subgraphs (If, Loop), whose bodies may read any outer tensor, keeps every node.

        ``given``: intermediate tensors (name -> dtype) that become inputs of the pruned model, fed with values
        computed before (``carried``): the nodes they come from are left out, so the model runs only what lies
        between them and ``names``."""
        graph = self.model.graph
        given = dict(given or {})
        if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in graph.node for attribute in node.attribute):
            if given:
                raise ValueError("a graph with subgraphs cannot be cut at given tensors")
            needed = None
        else:
            needed = _ancestors(self.nodes_by_output, names, stop=given)
        pruned = onnx.ModelProto()
        pruned.CopyFrom(self.model)
        kept = pruned.graph
        if needed is not None:
            nodes = [node for node in graph.node if id(node) in needed]
            read = {name for node in nodes for name in node.input}
            del kept.node[:], kept.initializer[:], kept.output[:]
            kept.node.extend(nodes)
            kept.initializer.extend(tensor for tensor in graph.initializer if tensor.name in read)
            kept.input.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                            None) for name, dtype in given.items() if name in read)
        existing = {output.name for output in kept.output}
        kept.output.extend(helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(names)
                           if name not in existing)
        return pruned

    def carried(self, before: Sequence[str], after: Sequence[str],
                size_of: Callable[[str], int] | None = None) -> list[str]:
        """The tensors computed for ``before`` that computing ``after`` reads (or that are among ``after``): fed
        as ``given`` tensors, they let ``after`` be computed without running again what ``before`` ran. Graph
        inputs are not among them (every feed holds those).

        With ``size_of`` (a tensor's size for one feed), the cut moves on, through the nodes ``after`` needs, up
        to the first node that computes one of ``after``, to where what is carried is smallest: past a layer's
        last projection, say, its residual stream instead of the projection's wide input. Those nodes then run
        with ``before``'s."""
        nodes = list(self.model.graph.node)
        done = _ancestors(self.nodes_by_output, before)
        needed = _ancestors(self.nodes_by_output, after) | done
        order = [index for index, node in enumerate(nodes) if id(node) in needed]
        start = max((index for index in order if id(nodes[index]) in done), default=-1) + 1
        wanted = set(after)
        stop = min((index for index in order if index >= start and wanted & set(nodes[index].output)),
                   default=start)
        best, best_size = None, None
        for cut in (range(start, stop + 1) if size_of is not None else [start]):
            ran = {id(nodes[index]) for index in order if index < cut} | done
            live = self._live(nodes, ran, needed, wanted)
            size = sum(size_of(name) for name in live) if size_of is not None else 0
            if best is None or size < best_size:
                best, best_size = live, size
        return best

    def _live(self, nodes: list, ran: set[int], needed: set[int], wanted: set[str]) -> list[str]:
        """The outputs of the nodes ``ran`` that the other ``needed`` nodes read or that are ``wanted``, in
        graph order."""
        produced = {out for node in nodes if id(node) in ran for out in node.output if out}
        read = {name for node in nodes if id(node) in needed and id(node) not in ran for name in node.input} | wanted
        return [name for name in self.tensor_names() if name in produced and name in read]

    def run(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Values of ``names`` for one input feed."""
        return self.open(names).run(feed)

    def _session(self, model: onnx.ModelProto):
        # no weight prepacking: it keeps a second copy of every MatMul weight, and a statistics pass over long
        # windows gains next to nothing from it
        used = {tensor.name for tensor in model.graph.initializer}
        shared = None if self.shared_initializers is None else {
            name: value for name, value in self.shared_initializers.items() if name in used}
        return create_session(model.SerializeToString(), device=self.device, optimization=self.optimization,
                              external_data_folder=self.model_path.parent, shared_initializers=shared, prepack=False)

    def precision_of(self, tensor: str) -> str:
        """The precision a node runs in: its quantized weights' dtype, else its weight's or its output's dtype."""
        node = self.nodes_by_output.get(tensor)
        if node is None:
            return "unknown"
        initializers = {t.name: t for t in self.model.graph.initializer}
        for name in node.input:
            producer = self.nodes_by_output.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in initializers:
                dtype = helper.tensor_dtype_to_np_dtype(initializers[producer.input[0]].data_type)
                return f"{dtype.name} weights (DequantizeLinear)"
            if name in initializers and node.op_type in ("MatMul", "Gemm", "Conv", "Mul", "Add"):
                return helper.tensor_dtype_to_np_dtype(initializers[name].data_type).name
        if node.op_type in ("MatMulNBits",):
            return f"int{next((a.i for a in node.attribute if a.name == 'bits'), 4)} weights (MatMulNBits)"
        return "float32 (activations)" if node.op_type != "Cast" else "cast"


def _ancestors(nodes_by_output: Mapping[str, onnx.NodeProto], names: Sequence[str],
               stop: Collection[str] = ()) -> set[int]:
    """ids of the nodes the tensors ``names`` are computed from (graph inputs and initializers have none), not
    looking past the tensors ``stop`` (their values are given)."""
    found: set[int] = set()
    pending = [name for name in names if name]
    while pending:
        name = pending.pop()
        node = None if name in stop else nodes_by_output.get(name)
        if node is None or id(node) in found:
            continue
        found.add(id(node))
        pending.extend(name for name in node.input if name)
    return found


class Tap:
    """A session with extra outputs: ``run(feed)`` returns the tapped tensors by name."""

    def __init__(self, session, names: list[str]):
        self.session, self.names = session, names

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, _feed_for(self.session, feed))))


_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _feed_for(session, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed restricted to the session's inputs, float arrays cast to each input's float type.

    Both sides get the same values even when, say, the candidate keeps its KV cache in fp16.
    """
    out = {}
    for spec in session.get_inputs():
        if spec.name not in feed:
            continue
        value = np.asarray(feed[spec.name])
        target = _ORT_FLOAT_TYPES.get(spec.type)
        out[spec.name] = value.astype(target) if target is not None and value.dtype.kind == "f" else value
    return out
