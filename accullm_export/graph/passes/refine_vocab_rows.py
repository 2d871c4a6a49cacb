"""A second INT4 stage for the LM head's most-used vocabulary rows (recipe key ``vocab.refine_rows``).

The head's rounding error d_v = w_v - w~_v (its source row against what the finished graph computes: low-bit
part, outlier branch and rotation together) costs the output distribution about sum_t p_tv (x_t . d_v)^2 over
calibration positions t (the second-order KL of a logit error, p the source model's probabilities). A small
share of the vocabulary carries almost all of it: the tokens that hold the probability. Those K rows
get their error rounded again, to INT4 in the head's blocks with FP16 scales, so they end up about as exact as
8-bit rows; the other rows stay as they are.

In the graph: MatMul(x', DequantizeLinear(int4 [C, K])) -> [batch, seq, K], x' being what the head's low-bit part
reads (x, or x R with ``rotation.layers``, the error then carried over as pinv(R) d_v = R^T d_v), scattered onto
the head's logits by ScatterElements(reduction="add") on the last axis, its indices Expand-ed to the correction's
shape. Reading the head's own input, the correction merges with the head (``merge_parallel_linears``) into one
MatMulNBits of V + K columns and a Split in ONNX Runtime. TensorRT would take the ScatterElements add through the
scatterElements plugin of its own plugin library (untested), so ``build`` gives the refinement to the cpu
target only. A row costs 4 bits plus its share of the scales per entry, and decoding reads K/V more of the
head's bytes.

Runs after every pass that changes the head (GPTQ, distillation, INT8 rows, scale codes), on the graph as it will
be saved; the constants carry the head's name as prefix, so the manifest counts them with the layer.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from accullm_export.errors import UserError
from accullm_export.graph.ir import constant
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import half_constant
from accullm_export.quant.symmetric import quantize

CHUNK_BYTES = 64 << 20  # float64 bytes of one [calibration rows, vocabulary] product held at a time


@dataclasses.dataclass(frozen=True)
class VocabRows:
    """What the pass needs: the head, how many rows, and calibration data."""

    count: int  # K, the rows refined
    head: str  # the head's node name (its plan's key)
    input: str  # the tensor the head reads in the source graph (before any rotation)
    output: str  # the tensor the head writes (the logits, or what leads to them)
    samples: np.ndarray  # [T, C] float32: the head's input on calibration text (the sink position left out)
    source_weight: np.ndarray  # [C, V] float32: the head's weight in the source model


def ranked_columns(samples: np.ndarray, weight: np.ndarray, error: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` columns v of largest sum_t p_tv (x_t . error_v)^2, p = softmax(x_t weight), sorted by index."""
    importance = np.zeros(weight.shape[1], dtype=np.float64)
    step = max(1, CHUNK_BYTES // (8 * weight.shape[1]))  # rows whose float64 [rows, vocab] products fit the chunk
    for start in range(0, len(samples), step):
        rows = np.asarray(samples[start:start + step], dtype=np.float32)
        probabilities = (rows @ weight).astype(np.float64)
        probabilities -= probabilities.max(axis=1, keepdims=True)
        np.exp(probabilities, out=probabilities)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        errors = (rows @ error).astype(np.float64)
        probabilities *= errors  # p e e, in place
        probabilities *= errors
        importance += probabilities.sum(axis=0)
    return np.sort(np.argsort(-importance, kind="stable")[:count])


def linear_maps(graph: gs.Graph, source: str, targets: list[str], channels: int,
                float_dtype: np.dtype) -> list[np.ndarray]:
    """The [C, N] matrix the graph applies between tensor ``source`` and each of ``targets`` (linear maps, bias
    left out), by running that part of the graph once in ONNX Runtime on the identity. Unlike
    ``outlier_branch.effective_weight``, which reads one node's constants in its own input's terms, this takes in
    whatever lies between: the rotation in front of the head, its branch, the Add."""
    from accullm_export.runtime.session import create_session

    part = graph.copy()
    tensors = part.tensors()
    start, ends = tensors[source], [tensors[target] for target in targets]
    start.inputs.clear()
    start.dtype, start.shape = float_dtype, [1, channels, channels]
    for end in ends:
        end.dtype, end.shape = float_dtype, None
    part.inputs, part.outputs = [start], ends
    part.cleanup(remove_unused_graph_inputs=True)
    model = gs.export_onnx(part)
    model.ir_version = 10
    session = create_session(model.SerializeToString(), device="cpu", optimization="basic")
    identity = np.eye(channels, dtype=float_dtype)[None]
    ones, zeros = (session.run(None, {source: value}) for value in (identity, np.zeros_like(identity)))
    maps = []
    for one, zero in zip(ones, zeros):
        difference = one[0].astype(np.float32, copy=False)
        difference -= zero[0]  # in place: a vocabulary-wide head's map is large
        maps.append(difference)
    return maps


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The plans, the head's rows to refine with their calibration inputs, and the model's float type."""

    plans: Mapping[str, LayerPlan]
    vocab_rows: VocabRows | None = None
    float_dtype: np.dtype = np.dtype(np.float32)


@register("refine_vocab_rows", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    rows: VocabRows = config.vocab_rows
    plan = config.plans[rows.head]
    tensors = graph.tensors()
    if rows.input not in tensors or rows.output not in tensors:
        raise UserError(f"vocab.refine_rows: {rows.head}'s input or output tensor is gone from the rewritten graph")
    head = next(node for node in graph.nodes if node.name == rows.head)
    reads = head.inputs[0]  # what the head's low-bit part reads: x, or x R with rotation.layers
    rotated = reads.name != rows.input
    maps = linear_maps(graph, rows.input, [rows.output] + ([reads.name] if rotated else []), plan.in_features,
                       config.float_dtype)
    error = np.subtract(rows.source_weight, maps[0], out=maps[0])  # d = w - w~, in the map's memory
    columns = ranked_columns(rows.samples, rows.source_weight, error, rows.count)
    refined = error[:, columns]
    if rotated:  # x R E = x D for the channels R keeps: E = pinv(R) D (R^T for a rotation)
        refined = (np.linalg.pinv(maps[1].astype(np.float64)) @ refined).astype(np.float32)
    values, scales = quantize(refined, 4, plan.block_size)
    name = f"{rows.head}/vocab_rows"
    correction_weight = gs.Variable(f"{name}_dequantized", dtype=config.float_dtype, shape=list(values.shape))
    graph.nodes.append(gs.Node(
        "DequantizeLinear", name=f"{name}/DequantizeLinear", attrs={"axis": 0, "block_size": int(plan.block_size)},
        inputs=[constant(f"{name}_quantized", values.astype(ml_dtypes.int4)),
                half_constant(graph, f"{name}_scale", scales, config.float_dtype)],
        outputs=[correction_weight]))
    correction = gs.Variable(f"{name}_correction", dtype=config.float_dtype)
    graph.nodes.append(gs.Node("MatMul", name=f"{name}/MatMul", inputs=[reads, correction_weight],
                               outputs=[correction]))
    shape = gs.Variable(f"{name}_shape", dtype=np.int64)
    graph.nodes.append(gs.Node("Shape", name=f"{name}/Shape", inputs=[correction], outputs=[shape]))
    indices = gs.Variable(f"{name}_indices", dtype=np.int32)
    graph.nodes.append(gs.Node("Expand", name=f"{name}/Expand",
                               inputs=[constant(f"{name}_columns", columns.astype(np.int32)[None, None]), shape],
                               outputs=[indices]))
    logits = tensors[rows.output]
    unrefined = gs.Variable(f"{name}_unrefined", dtype=logits.dtype, shape=logits.shape)
    producer = logits.inputs[0]
    producer.outputs[producer.outputs.index(logits)] = unrefined
    graph.nodes.append(gs.Node("ScatterElements", name=f"{name}/ScatterElements",
                               attrs={"axis": -1, "reduction": "add"}, inputs=[unrefined, indices, correction],
                               outputs=[logits]))
    notes.append(f"{rows.head}: its {rows.count} vocabulary rows of largest calibration error "
                         f"(sum_t p_tv (x_t . d_v)^2) got a second INT4 stage (vocab.refine_rows)")
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def head_tensors(model: onnx.ModelProto, layers) -> tuple[object, str] | None:
    """(the LinearLayer whose output is the model's first graph output, through Identity or Cast nodes, and that
    output tensor of its node), or None."""
    producers = {output: node for node in model.graph.node for output in node.output}
    by_node = {layer.node: layer for layer in layers}
    tensor = model.graph.output[0].name if model.graph.output else None
    while tensor in producers:
        node = producers[tensor]
        if node.name in by_node and node.op_type == "MatMul":
            return by_node[node.name], node.output[0]
        if node.op_type not in ("Identity", "Cast"):
            return None
        tensor = node.input[0]
    return None
