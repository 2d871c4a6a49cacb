"""Store the blocked INT4 layers' scales as 8-bit log codes (recipe key ``weights.scale_bits = 8``;
``quant.scale_codes``).

Runs after every pass that chooses scales (GPTQ, distillation). The layers reading the same input share one grid,
so that ``merge_parallel_linears`` can concatenate their codes. Each DequantizeLinear's scale input becomes the
decoding chain ``rewrite.coded_scale`` writes; the integers and zero points stay as they are. Blocks whose
integers are all zero (any scale gives them zero weights) do not widen the grid and get code 0. A note per
model gives the largest step of any grid and the largest relative move of a scale.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
import collections

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant_array
from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import coded_scale, planned_nodes, producer_of, stored_scales
from accullm_export.quant import scale_codes
from accullm_export.quant.asymmetric import signed_values
from accullm_export.quant.symmetric import grouped_blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The layer plans and the model's float type."""

    plans: Mapping[str, LayerPlan]
    float_dtype: np.dtype = np.dtype(np.float32)


@register("code_block_scales", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    groups: dict[str, list[tuple[gs.Node, gs.Node, np.ndarray, np.ndarray]]] = collections.defaultdict(list)
    for node, plan in planned_nodes(graph, config.plans):
        dequantize = producer_of(node.inputs[1], "DequantizeLinear")
        if dequantize is None or "block_size" not in dequantize.attrs:
            continue
        stored = stored_scales(dequantize)
        if stored is None:
            notes.append(f"{node.name}: its block scales are computed, not stored; left in FP16")
            continue
        scales = np.asarray(constant_array(stored), dtype=np.float32)
        groups[node.inputs[0].name].append((node, dequantize, scales, _used_blocks(dequantize)))
    largest_step = largest_move = 0.0
    for members in groups.values():
        log_min, log_step = scale_codes.scale_grid([scales[used] for _, _, scales, used in members])
        if any(used.any() for _, _, _, used in members):  # else every block is zero and the grid is moot
            largest_step = max(largest_step, float(np.expm1(log_step)))
        for node, dequantize, scales, used in members:
            codes = np.where(used, scale_codes.encode(scales, log_min, log_step), 0).astype(np.uint8)
            decoded = scale_codes.decode(codes, log_min, log_step)
            if used.any():
                largest_move = max(largest_move, float(np.max(np.abs(decoded[used] / scales[used] - 1))))
            dequantize.inputs[1] = coded_scale(graph, node.name, codes, log_min, log_step, config.float_dtype)
    if groups:
        count = sum(len(members) for members in groups.values())
        notes.append(f"{count} layers' block scales stored as 8-bit log codes on {len(groups)} grids "
                             f"(largest step {largest_step:.2%}; largest move of a scale {largest_move:.2%})")
    return PassResult(graph.cleanup().toposort(), tuple(notes))


def _used_blocks(dequantize: gs.Node) -> np.ndarray:
    """[blocks, out]: whether the block holds a nonzero integer (v = q - z with zero points)."""
    block = int(dequantize.attrs["block_size"])
    values = np.asarray(constant_array(dequantize.inputs[0]))
    if len(dequantize.inputs) > 2:
        values = signed_values(values, np.asarray(constant_array(dequantize.inputs[2])), block)
    nonzero, _ = grouped_blocks(np.asarray(values, dtype=np.int16) != 0, block, None)  # padding rows: zero
    return nonzero.any(axis=1)
