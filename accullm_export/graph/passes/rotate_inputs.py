"""Block-Hadamard rotation of an INT4 layer's input (recipe key ``rotation.layers``): the low-bit part computes
(x R)(R^T W) = x W, and R^T W rounds better than W.

R = diag(d) (I (x) H_b / sqrt(b)): random signs d, then a Hadamard transform within each block of b consecutive
channels (b the largest of 128/64/32/16 dividing the input width; 64 on the sample). Rotating the weight's rows
within a block spreads each block's largest entries over all of its rows, so a block's scale fits its rows more
evenly (QuIP#/QuaRot's incoherence processing, here on one layer's input only, never on the residual stream:
the outlier channels stay where the FP16 branch reads them). The outlier channels' signs are 0, so the rotated
input leaves them out exactly as the zero rows of an unrotated layer do, and its values carry no outliers into
ONNX Runtime's per-block activation quantization (accuracy level 4) either.

In the graph, once per rotated input (layers that read one input share it, so they still merge): Mul(x, d) ->
Reshape [batch, seq, C/b, b] -> MatMul(H_b / sqrt(b)) -> Reshape [batch, seq, C], four small nodes whose constants
take C floats (every rotation of block b shares one H_b). The layer's statistics follow the input: its
second-moment matrix (GPTQ) becomes R^T H R, its per-channel second moments (scale search) diag(R^T H R), and its
plan reads the rotated tensor with no excluded rows. The distillation replica multiplies by the same R
(``training.distill``). Runs after ``isolate_outliers`` (the branch keeps reading x) and before GPTQ and rounding.

Meant for a layer whose block size costs a large share of the decode time, the LM head above all: the rotation
lets it keep large blocks at the accuracy of smaller ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping
import zlib

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.errors import UserError
from accullm_export.graph.ir import LazyArray, ZeroedRows, constant
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.layer_plan import sink_channels
from accullm_export.graph.rewrite import float_weight, planned_nodes
from accullm_export.graph.rotation import hadamard, rotation_matrix


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The plans, the inputs' statistics and E[x x^T], and the AWQ divisors."""

    plans: Mapping[str, LayerPlan]
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    hessians: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    input_scales: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


@register("rotate_inputs", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    produced: dict[str, dict] = {"plans": {}, "hessians": {}, "statistics": {}}
    rotated, inputs = 0, {}  # source tensor name -> (rotated tensor, signs): its readers share the rotation
    hadamards: dict = {}  # (block size, dtype) -> H_b / sqrt(b), one constant for every rotation
    for node, plan in planned_nodes(graph, config.plans):
        if not plan.rotation:
            continue
        weight = float_weight(node)
        source = node.inputs[0]
        if weight is None:
            raise UserError(f"rotation.layers: {node.name}'s weight is not a float constant; it cannot be rotated")
        if source.shape is not None and len(source.shape) != 3:
            raise UserError(f"rotation.layers: {node.name} reads a rank-{len(source.shape)} input; the rotation "
                            "reshapes [batch, sequence, channels] inputs only")
        if source.name not in inputs:
            unprotected = sorted(set(sink_channels(config.statistics.get(source.name) or {})) - set(plan.outliers))
            if unprotected:
                notes.append(f"{node.name}: its input's attention-sink channels {unprotected} have no FP16 "
                             "row, so the rotation mixes them into the low-bit part, whose statistics leave the "
                             "sink out")
            signs = rotation_signs(source.name, weight.values.shape[0], plan.outliers)
            rotated_input = _insert_rotation(graph, node.name, source, signs, plan.rotation, hadamards)
            inputs[source.name] = (rotated_input, signs)
            _rotate_statistics(config, source.name, rotated_input.name, rotation_matrix(signs, plan.rotation),
                               produced)
        rotated_input, signs = inputs[source.name]
        node.inputs[0] = rotated_input
        # the branch computes the outlier rows (isolate_outliers zeroed them already): their 0 is spread out
        # made when read (by GPTQ or the rounding, which then replace it): a head-sized copy is not held meanwhile
        lazy = weight._values if isinstance(weight._values, ZeroedRows) else None
        source = weight.values if lazy is None else lazy._source
        zeroed = sorted(set(plan.outliers) | set(() if lazy is None else lazy._rows))
        node.inputs[1] = gs.Constant(f"{node.name}/weight_rotated", LazyArray(
            functools.partial(rotated_rows, source, signs, plan.rotation, zeroed=zeroed), source.shape, source.dtype,
            f"rotated in blocks of {plan.rotation}"))
        produced["plans"][node.name] = dataclasses.replace(plan, input=rotated_input.name)
        rotated += 1
    notes.append(f"{rotated} layers' low-bit parts read their input block-Hadamard rotated, {len(inputs)} "
                 "rotations (rotation.layers)")
    return PassResult(graph.cleanup().toposort(), tuple(notes), produced=produced)


ROTATION_COLUMNS = 8192  # output columns rotated per float64 working copy


def rotation_signs(source: str, channels: int, outliers) -> np.ndarray:
    """The random signs d of the rotation of input tensor ``source`` (seeded by its name, so a rebuild gives the
    same R), 0 on the outlier channels."""
    signs = np.random.default_rng(zlib.crc32(source.encode())).choice([-1.0, 1.0], size=channels)
    signs[list(outliers)] = 0.0
    return signs.astype(np.float32)


def rotated_rows(weight: np.ndarray, signs: np.ndarray, block: int, *, zeroed=(),
                 columns: int = ROTATION_COLUMNS) -> np.ndarray:
    """R^T W block by block, (I (x) H_b)^T (d * W), without forming R: O(C b N) instead of O(C^2 N), computed in
    float64 ``columns`` output columns at a time (a vocabulary-sized head is not copied whole in float64) and
    returned in the weight's dtype. The rows in ``zeroed`` count as 0."""
    rotated = np.empty(weight.shape, dtype=weight.dtype)
    factors = np.asarray(signs, dtype=np.float64)[:, None]
    factors[list(zeroed)] = 0.0
    matrix = hadamard(block)
    for start in range(0, weight.shape[1], columns):
        part = slice(start, min(start + columns, weight.shape[1]))
        signed = factors * np.asarray(weight[:, part], dtype=np.float64)
        blocks = signed.reshape(signed.shape[0] // block, block, -1)
        rotated[:, part] = np.einsum("ji,kjn->kin", matrix, blocks).reshape(signed.shape)
    return rotated


def _insert_rotation(graph: gs.Graph, layer: str, source: gs.Variable, signs: np.ndarray, block: int,
                     hadamards: dict) -> gs.Variable:
    """x R as four nodes named after the input; the constants carry the first reader's name (``layer``), so the
    manifest counts their bytes with that layer. Rotations of one block size share one H_b constant
    (``hadamards``, (block size, dtype) -> constant), counted once, with the first layer rotated."""
    prefix = f"{source.name}/rotation"
    channels, dtype = signs.shape[0], source.dtype or np.float32
    key = (block, np.dtype(dtype).name)
    if key not in hadamards:
        hadamards[key] = constant(f"{layer}/rotation_hadamard", hadamard(block).astype(dtype))
    signed, blocks, mixed, output = (gs.Variable(f"{prefix}/{name}", dtype=dtype)
                                     for name in ("signed", "blocks", "mixed", "output"))
    graph.nodes += [
        gs.Node("Mul", name=f"{prefix}/Mul", inputs=[source, constant(f"{layer}/rotation_signs", signs.astype(dtype))],
                outputs=[signed]),
        gs.Node("Reshape", name=f"{prefix}/Reshape_blocks",
                inputs=[signed, constant(f"{prefix}/blocks_shape", np.array([0, 0, channels // block, block]))],
                outputs=[blocks]),
        gs.Node("MatMul", name=f"{prefix}/MatMul",
                inputs=[blocks, hadamards[key]],
                outputs=[mixed]),
        gs.Node("Reshape", name=f"{prefix}/Reshape_channels",
                inputs=[mixed, constant(f"{prefix}/channels_shape", np.array([0, 0, channels]))], outputs=[output]),
    ]
    return output


def _rotate_statistics(config: Config, source: str, rotated: str, matrix: np.ndarray, produced: dict) -> None:
    """The rotated input's second moments (and E[x x^T]) from the source's, for GPTQ and the scale search, into
    ``produced``; AWQ's divisors of the source are applied first (the rotation reads x / s)."""
    scales = config.input_scales.get(source)
    inverse = None if scales is None else 1.0 / np.asarray(scales, dtype=np.float64)
    hessian = config.hessians.get(source)
    if hessian is not None:
        hessian = np.asarray(hessian, dtype=np.float64)
        if inverse is not None:
            hessian = hessian * np.outer(inverse, inverse)
        produced["hessians"][rotated] = matrix.T @ hessian @ matrix
        second = np.diag(produced["hessians"][rotated]).copy()
    else:
        statistics = config.statistics.get(source, {})
        if "second_moment" not in statistics:
            return
        diagonal = np.asarray(statistics["second_moment"], dtype=np.float64)
        if inverse is not None:
            diagonal = diagonal * inverse ** 2
        second = (matrix ** 2 * diagonal[:, None]).sum(axis=0)
    produced["statistics"][rotated] = {"second_moment": second}
