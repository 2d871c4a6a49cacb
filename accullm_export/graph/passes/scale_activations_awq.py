"""Activation-aware weight scaling (AWQ): scale up the weight rows of salient input channels before INT4
rounding and fold the inverse scale into whatever produces the input.

Per input tensor (shared by, say, q/k/v), ``quant.awq`` searches the exponent alpha of s = mean|x|^alpha on the
profile's per-channel statistics. The rows of every consumer's weight are multiplied by s and x is divided by
s where that costs nothing:

* the producer is a Mul by a constant (RMSNorm's weight): the constant is divided by s;
* the producer is a Mul of two tensors, one of them a MatMul output read only there (SwiGLU's up projection
  feeding the down projection): that MatMul's weight columns are divided by s.

Inputs with another producer (attention's output feeding o_proj), or read by layers outside the plan, are
left unscaled, with a note. Outlier channels (FP16 rows) keep s = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.layer_plan import LayerPlan
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import apply_input_scales, scalable_inputs
from accullm_export.quant.awq import search_awq_scales


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The layer plans and the inputs' calibration statistics."""

    plans: Mapping[str, LayerPlan]
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)


@register("scale_activations_awq", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    notes: list[str] = []
    produced: dict[str, np.ndarray] = {}
    for tensor_name, members, fold in scalable_inputs(graph, config.plans, ("int4",), notes):
        plan = members[0][1]
        statistics = config.statistics[tensor_name]
        result = search_awq_scales([node.inputs[1].values.astype(np.float32) for node, _ in members],
                                   statistics["mean_abs"], statistics["second_moment"], 4, plan.block_size,
                                   exclude=plan.outliers)
        if result.alpha == 0:
            continue
        apply_input_scales(members, fold, result.scales, "awq")
        produced[tensor_name] = result.scales
        notes.append(f"{tensor_name}: alpha {result.alpha:.2f}, proxy error "
                             f"{result.baseline_error:.4g} -> {min(e for _, e in result.errors):.4g}")
    return PassResult(graph.cleanup().toposort(), tuple(notes), produced={"input_scales": produced})
