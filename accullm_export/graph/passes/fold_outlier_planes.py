"""Fold each FP16 outlier branch into its layer's blocked INT4 weight as two INT4 planes
(recipe key ``outliers.planes``; ONNX Runtime targets).

The branch ``y = x @ W_int4 + x[..., O] @ R`` costs three nodes per layer (a Gather shared by the layers of an
input, a small MatMul and an Add); at batch-1 decode in ONNX Runtime each node costs a dispatch whatever it
computes, so the branches cost far more decode time than their few multiply-adds. Here the layer reads
``x' = Concat(x, x[..., O], x[..., O])`` (the branch's Gather, kept, appended twice to the input; one Concat per
input, shared like the Gather) through a ``[K + 2|O|, N]`` INT4 weight behind the same blocked DequantizeLinear,
which ONNX Runtime fuses into one ``MatMulNBits``:

* plane 1, in place: row c of O (zero so far) takes integers on its own block's grid (the block's scale and zero
  point stay, so the other rows of the block keep their values);
* plane 2, a new block of ``COPIES`` x |O| rows after the K (each copy of a channel has its own row, so the
  channel's plane-2 integer is the sum of ``COPIES`` int4 values, in [-16, 14] for two): int4's symmetric range
  (zero point 8 for asymmetric weights) with one new scale per output column, stored like the layer's other
  scales (FP16, or an 8-bit log code on the layer's grid).

``two_planes`` searches each column's plane-2 scale and gives every entry the pair of integers of least error,
for the least squared error weighted by the channels' E[x^2]. One copy leaves the rows less exact than FP16
rows; two copies match them, and more add bytes for no accuracy. The input is widened by a Concat of the
gathered channels because ONNX Runtime copies that far faster than a Gather of every channel. The last block
holds 2|O| rows instead of ``block_size``, which ONNX's blocked DequantizeLinear allows (its scale axis is
ceil(K'/B)) and ONNX Runtime fuses.

A branch stays FP16, with a note, when the profile saw the attention sink (position 0) drive its channels beyond
``SINK_RATIO`` times their 99.9th percentile: any rounding of those rows is multiplied by the sink's huge
activations, and the sink's keys and values reach every later token. So does a layer whose input is not a whole
number of blocks (the new rows need a block of their own: the sample's 576 channels at block 128), and a branch
in any other form. Runs after every pass that sets weights or scales (GPTQ, distillation, 8-bit scale codes),
before ``quantize_outlier_rows`` (INT8 rows for the branches left) and ``refine_vocab_rows``, which measures the
head as saved; ``merge_parallel_linears`` then merges the layers of an input (they read the same Concat) as
before.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant, constant_array
from accullm_export.graph.outlier_branch import branch_matmul, constant_value
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import (coded_scale, half_constant, planned_nodes, producer_of, scale_code,
                                          widening_cast)
from accullm_export.quant import scale_codes
from accullm_export.quant.asymmetric import LEVELS, signed_values, stored_unsigned
from accullm_export.quant.symmetric import block_index, half_representable

LOW, HIGH = -8, 7  # int4 storage range (symmetric weights: zero point 0)
COPIES = 2  # plane 2 reads the outlier channels this many times: its integer is the sum of COPIES int4 values
CANDIDATES = range(-40, 9)  # plane 2's scale: anchor * 2^(step / 8), from 1/32 of it to twice it
# a branch whose channels see the attention sink's activations beyond this many times their 99.9th percentile stays
# FP16: there the sink's massive activations (the down projections that write them) multiply any rounding of the
# rows, while ordinary inputs stay far below this ratio
SINK_RATIO = 100.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The plans, the inputs' calibration statistics and the model's float type."""

    plans: Mapping[str, LayerPlan]
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    float_dtype: np.dtype = np.dtype(np.float32)


@register("fold_outlier_planes", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    inputs: dict[tuple[str, str], gs.Variable] = {}
    folded, rows, worst = 0, 0, 0.0
    for node, plan in planned_nodes(graph, config.plans):
        if not plan.outliers:
            continue
        matmul = branch_matmul(node)
        if matmul is None:
            continue
        layout = _layout(node, matmul)
        if isinstance(layout, str):
            notes.append(f"{node.name}: {layout}; its outlier branch stays")
            continue
        dequantize, channels, branch_rows, scales, add = layout
        statistics = config.statistics.get(plan.input, {})
        sink = sink_ratio(statistics, channels)
        if sink > SINK_RATIO:
            notes.append(f"{node.name}: the attention sink's activations on its outlier channels reach "
                                 f"{sink:.0f}x their 99.9th percentile, beyond what INT4 planes keep; its outlier "
                                 "branch stays")
            continue
        moments = statistics.get("second_moment")
        importance = np.ones(len(channels)) if moments is None else np.asarray(moments, np.float64)[channels]
        worst = max(worst, _fold(graph, node, dequantize, channels, branch_rows, scales, importance,
                                 config.float_dtype))
        node.inputs[0] = _extended_input(graph, inputs, node.inputs[0], matmul.inputs[0], COPIES)
        output = add.outputs[0]
        add.outputs.clear()
        node.outputs[0] = output
        folded, rows = folded + 1, rows + len(channels)
    if folded:
        notes.append(f"{folded} layers' outlier branches folded into their INT4 weights as two planes "
                             f"({rows} rows; largest error of a folded entry: {worst:.3g} of its row's largest weight)")
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def sink_ratio(statistics: dict, channels: np.ndarray) -> float:
    """The largest |x| the profile saw at the attention sink (position 0) on ``channels``, over their 99.9th
    percentile of |x| (0 without those statistics)."""
    if "sink_absmax" not in statistics or "p999" not in statistics:
        return 0.0
    sink = np.asarray(statistics["sink_absmax"], dtype=np.float64)[channels]
    usual = np.maximum(np.asarray(statistics["p999"], dtype=np.float64)[channels], np.finfo(np.float32).tiny)
    return float((sink / usual).max()) if len(channels) else 0.0


def _layout(node: gs.Node, matmul: gs.Node):
    """(the layer's DequantizeLinear, the outlier channels, their float32 rows, the weight's float32 block scales,
    the branch's Add) or why not."""
    add = matmul.outputs[0].outputs[0] if len(matmul.outputs[0].outputs) == 1 else None
    if add is None or add.op != "Add" or node.outputs[0] not in add.inputs:
        return "its branch is not added straight to the layer's output"
    gather = producer_of(matmul.inputs[0], "Gather")
    if gather is None or gather.inputs[0] is not node.inputs[0] or not isinstance(gather.inputs[1], gs.Constant) \
            or int(gather.attrs.get("axis", 0)) not in (-1, len(node.inputs[0].shape or ()) - 1):
        return "its branch does not gather constant channels of the layer's own input"
    dequantize = producer_of(node.inputs[1], "DequantizeLinear")
    if dequantize is None or "block_size" not in dequantize.attrs or int(dequantize.attrs.get("axis", 0)) != 0:
        return "its weight is not a blocked DequantizeLinear"
    values = dequantize.inputs[0]
    kind = np.dtype(values.dtype).name if isinstance(values, gs.Constant) else "computed"
    if kind not in ("int4", "uint4") or (kind == "uint4") != (len(dequantize.inputs) > 2):
        return f"its weight is stored as {kind}, not blocked INT4 (uint4 with zero points)"
    if len(dequantize.outputs[0].outputs) != 1:
        return "its dequantized weight has other readers"
    if values.shape[0] % int(dequantize.attrs["block_size"]):
        return "its input size is not a whole number of blocks"
    channels = np.asarray(constant_array(gather.inputs[1]), dtype=np.int64).reshape(-1)
    if COPIES * channels.size > int(dequantize.attrs["block_size"]):
        return f"{COPIES} copies of its {channels.size} outlier channels exceed one block"
    rows = constant_value(matmul.inputs[1])
    scales = constant_value(dequantize.inputs[1])
    if rows is None or scales is None:
        return "its branch rows or block scales are computed, not stored"
    return dequantize, channels, rows.astype(np.float32), np.asarray(scales, dtype=np.float32), add


def _fold(graph: gs.Graph, node: gs.Node, dequantize: gs.Node, channels: np.ndarray, branch_rows: np.ndarray,
          scales: np.ndarray, importance: np.ndarray, float_dtype: np.dtype) -> float:
    """Rewrite the DequantizeLinear's constants to hold both planes; returns the largest error of a folded entry
    relative to the largest weight of its row."""
    block = int(dequantize.attrs["block_size"])
    stored = np.asarray(constant_array(dequantize.inputs[0]))
    zero_points = np.asarray(constant_array(dequantize.inputs[2])).astype(np.int16) if len(dequantize.inputs) > 2 \
        else None
    values = (signed_values(stored, zero_points, block) if zero_points is not None else stored).astype(np.int16)
    row_blocks = block_index(values.shape[0], block)[channels]
    row_scales = scales[row_blocks]  # [|O|, N]
    target = values[channels] * row_scales + branch_rows
    low, high = _limits(zero_points[row_blocks] if zero_points is not None else None)
    coded = scale_code(dequantize.inputs[1])  # once: every candidate scale is made storable the same way
    first, second, second_scale = two_planes(target, row_scales, low, high, importance,
                                             lambda scale: _storable(coded, scale), COPIES)
    values[channels] = first
    values = np.concatenate([values, *split_copies(second, COPIES)])
    error = np.abs(target - first * row_scales - second * second_scale).max(axis=1)
    span = np.maximum(np.abs(target).max(axis=1), np.finfo(np.float32).tiny)
    all_scales = np.concatenate([scales, second_scale])
    if zero_points is not None:  # plane 2 on int4's symmetric range: zero point 8
        zero_points = np.concatenate([zero_points, np.full(second_scale.shape, -LOW, dtype=np.int16)])
        # (the extra rows, COPIES x |O| <= block_size, share the one new block's scale and zero point)
        stored_values = stored_unsigned(values, zero_points, block).astype(ml_dtypes.uint4)
    else:
        stored_values = values.astype(ml_dtypes.int4)
    dequantize.inputs[0] = constant(f"{node.name}/weight_planes_quantized", stored_values)
    dequantize.inputs[1] = _scale_tensor(graph, node.name, dequantize.inputs[1], coded, all_scales, float_dtype)
    if zero_points is not None:
        dequantize.inputs[2] = constant(f"{node.name}/weight_planes_zero_point", zero_points.astype(ml_dtypes.uint4))
    dequantize.outputs[0].shape = list(values.shape)
    return float((error / span).max())


def split_copies(total: np.ndarray, copies: int) -> list[np.ndarray]:
    """``copies`` int4 arrays summing to ``total`` (each entry in [LOW * copies, HIGH * copies]): the floor of the
    share in every copy and one more in the first ``total - copies * floor`` of them."""
    base = np.floor_divide(total, copies)
    extra = total - base * copies
    return [(base + (extra > index)).astype(np.int16) for index in range(copies)]


def two_planes(target: np.ndarray, row_scales: np.ndarray, low, high, importance: np.ndarray,
               storable, copies: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(plane 1 [n, N], plane 2 [n, N], plane 2's scales [1, N]) for rows ``target`` [n, N]: plane 1 on each row's
    block grid (``row_scales``, integers in [low, high]), plane 2 on int4's symmetric range with one scale per
    column. Each column's scale is searched: CANDIDATES steps of 2^(1/8) below and above absmax / 7 of what
    rounding on the block grid alone leaves, each made ``storable``; for a scale, every entry takes the plane-2
    integer (and so the plane-1 integer) of least error; the column keeps the scale of least error summed over its
    rows, squared and weighted by ``importance`` (the channels' E[x^2]). Ties go to the first scale and the
    smallest integer."""
    safe = np.where(row_scales > 0, row_scales, 1).astype(np.float32)

    def best(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        plane2 = np.arange(LOW * copies, HIGH * copies + 1, dtype=np.float32).reshape(-1, 1, 1)
        rest = target - plane2 * scale
        plane1 = np.where(row_scales > 0, np.clip(np.rint(rest / safe), low, high), 0)
        error = np.abs(rest - plane1 * row_scales)
        pick = np.argmin(error, axis=0)[None]
        plane2 = np.broadcast_to(plane2, rest.shape)
        return tuple(np.take_along_axis(array, pick, 0)[0] for array in (plane1, plane2, error))

    plane1 = np.where(row_scales > 0, np.clip(np.rint(target / safe), low, high), 0)
    anchor = np.abs(target - plane1 * row_scales).max(axis=0, keepdims=True) / np.float32(HIGH * copies)
    weights = np.asarray(importance, dtype=np.float64).reshape(-1, 1)
    chosen, chosen_cost = None, None
    for step in CANDIDATES:
        scale = np.asarray(storable(anchor * np.float32(2.0 ** (step / 8))), dtype=np.float32)
        cost = (weights * best(scale)[2].astype(np.float64) ** 2).sum(axis=0, keepdims=True)
        if chosen is None:
            chosen, chosen_cost = scale, cost
        else:
            better = cost < chosen_cost
            chosen, chosen_cost = np.where(better, scale, chosen), np.where(better, cost, chosen_cost)
    first, second, _ = best(chosen)
    return first.astype(np.int16), second.astype(np.int16), chosen


def _limits(zero_points: np.ndarray | None) -> tuple:
    """The signed range v = q - z a row may take: [-z, 15 - z] with zero points, else int4's."""
    if zero_points is None:
        return LOW, HIGH
    return -zero_points, LEVELS - zero_points


def _storable(coded: tuple | None, scale: np.ndarray) -> np.ndarray:
    """The nearest scale the layer can store: on its 8-bit code grid (``coded``, as ``scale_code`` reads it), or
    FP16 (at least FP16's smallest normal)."""
    if coded is None:
        return half_representable(np.maximum(scale, 0))
    return scale_codes.decode(scale_codes.encode(scale, coded[1], coded[2]), coded[1], coded[2])


def _scale_tensor(graph: gs.Graph, layer: str, old, coded: tuple | None, scales: np.ndarray,
                  float_dtype: np.dtype):
    """The tensor the DequantizeLinear reads its [blocks + 1, N] scales from, stored as the old ones were
    (``coded``: ``scale_code(old)``)."""
    if coded is not None:
        codes = scale_codes.encode(scales, coded[1], coded[2])
        return coded_scale(graph, layer, codes, coded[1], coded[2], float_dtype, stem="weight_planes_scale")
    if widening_cast(old) is not None or np.dtype(old.dtype) == np.float16:
        return half_constant(graph, f"{layer}/weight_planes_scale", scales, float_dtype)
    return constant(f"{layer}/weight_planes_scale", scales.astype(old.dtype))


def _extended_input(graph: gs.Graph, inputs: dict, source: gs.Variable, gathered: gs.Variable,
                    copies: int) -> gs.Variable:
    """Concat(source, the branch's gathered outlier channels) along the last axis, one per input and Gather (a
    Concat copies far faster in ONNX Runtime than a Gather of every channel)."""
    key = (source.name, gathered.name)
    if key not in inputs:
        extended = gs.Variable(f"{source.name}/outlier_planes_input", dtype=source.dtype)
        graph.nodes.append(gs.Node("Concat", name=f"{source.name}/outlier_planes/Concat", attrs={"axis": -1},
                                   inputs=[source] + [gathered] * copies, outputs=[extended]))
        inputs[key] = extended
    return inputs[key]
