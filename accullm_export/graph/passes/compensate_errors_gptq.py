"""GPTQ: round INT4/INT8 weights one input row at a time, pushing each row's rounding error onto the rows not
yet rounded, weighted by the input's second-moment matrix H = E[x x^T] (``quant.gptq``).

H comes from the calibration text named in the profile (``quantize --gptq`` collects it). The scales are fixed
before rounding from the weight itself ("static groups"), so the result is stored exactly like plain
rounding's: blocked DequantizeLinear. Rows are rounded in order of decreasing H[i, i]
("act-order"). Outlier rows (FP16 branch) are excluded from the problem, or, with ``--gptq-absorb``, come after
every other row and take their share of the error updates, written back into the branch's FP16 weight (OWQ).
Inputs that AWQ scaled by s use diag(1/s) H diag(1/s).

H leaves the attention-sink token (position 0) out. A layer whose input at the sink is over ``SINK_RATIO`` x any
other token's (the down projections that write the sink's massive activations) is therefore left to plain
rounding, with a note, unless those channels are FP16 outlier rows: GPTQ would move its weights freely along
exactly the channels the sink needs (measured on the sample: with 64 windows and no FP16 rows, Δppl +659%).

With ``quantize --bias-correction`` H is the covariance E[x x^T] - E[x] E[x]^T: ``correct_bias`` cancels the mean
of the output error with a bias, so GPTQ need only minimise its variance. A channel that is nearly constant (the
residual stream's massive activations, after the norm) then weighs by its small spread, not by its large mean.

With ``quantize --gptq-sink-weight W`` the sink's position comes back into the objective as one term of its own:
M = H + W E[x0 x0^T] (x0: the input at position 0 of each calibration window; centred with bias correction), so
the sink weighs W against all other tokens together. The attention sink's keys and values are read by every
later token, and its input is unlike any other token's (on the sample, the q/k/v inputs' massive channel is
about 7 at ordinary tokens and 1 at the sink, where another channel dominates); measured on four q_proj and
four gate_proj layers of the sample with their FP16 rows, W = 0.2 cut the sink's relative output error 5-10x
and changed the other tokens' by under 1% (``benchmarks/layer_error_probe.py``), yet the whole build measured a
worse KL (0.0958 against 0.0878 on 8 held-out windows), so it is off by default.

With ``quantize --asymmetric`` blocked INT4 layers round onto a grid with a zero point per block
(``quant.gptq.gptq_grid``), each row into its block's [-z, 15 - z].
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.errors import UserError
from accullm_export.graph.passes import register
from accullm_export.graph.recipes import SINK_RATIO, sink_channels
from accullm_export.graph.rewrite import (asymmetric_layer, float_weight, is_dequantized, planned_nodes,
                                          replace_weight_dequantized)
from accullm_export.quant.gptq import gptq_grid, gptq_quantize, gptq_quantize_absorbing


@register("compensate_errors_gptq")
def run(graph: gs.Graph, context) -> gs.Graph:
    for node, plan in planned_nodes(graph, context.plans):
        if not plan.quantized or is_dequantized(node):
            continue
        weight = float_weight(node)
        hessian = context.hessians.get(node.inputs[0].name)
        if weight is None or hessian is None:
            context.notes.append(f"{node.name}: no second-moment matrix for its input; plain rounding")
            continue
        hessian = _objective(node, hessian, context)
        statistics = context.statistics.get(node.inputs[0].name)
        sinks = set(sink_channels(statistics)) if statistics else set()
        unprotected = sorted(sinks - set(plan.outliers))
        if unprotected:
            context.notes.append(f"{node.name}: its input at the attention sink exceeds {SINK_RATIO:g}x every other "
                                 f"token's in channels {unprotected}, which have no FP16 row and which GPTQ's "
                                 "statistics leave out; plain rounding")
            continue
        scales = context.input_scales.get(node.inputs[0].name)
        if scales is not None:
            inverse = 1.0 / scales.astype(np.float64)
            hessian = hessian * np.outer(inverse, inverse)
        search = context.scale_search and plan.bits == 4
        branch = _branch_weight(graph, node) if context.gptq_absorb and plan.excluded_rows else None
        # the sink's own channels stay as they are: H leaves the sink out, so it cannot see what moving them costs
        absorbing = [index for index, channel in enumerate(plan.outliers) if channel not in sinks]
        grid, zero_points = None, None
        if asymmetric_layer(context, plan):  # every outlier row is left out of the grid, absorbing or not
            grid = gptq_grid(weight.values, hessian, plan.bits, plan.block_size, exclude=plan.excluded_rows,
                             search=search, asymmetric=True)
            zero_points = grid[1]
        if branch is None or not absorbing:
            values, block_scales = gptq_quantize(weight.values.astype(np.float32), hessian, plan.bits,
                                                 plan.block_size, exclude=plan.excluded_rows, act_order=True,
                                                 search=search, grid=grid)
        else:
            full = weight.values.astype(np.float32)
            full[list(plan.outliers)] = branch.values.astype(np.float32)
            values, block_scales, rows = gptq_quantize_absorbing(
                full, hessian, plan.bits, plan.block_size, absorb=[plan.outliers[i] for i in absorbing],
                exclude=[c for c in plan.outliers if c in sinks], act_order=True, search=search, grid=grid)
            updated = branch.values.copy()
            updated[absorbing] = rows.astype(updated.dtype)
            branch.values = updated
        replace_weight_dequantized(graph, node, values, block_scales, plan.bits, plan.block_size,
                                   weight.values.dtype, zero_points)
    return graph.cleanup().toposort()


def _objective(node: gs.Node, hessian: np.ndarray, context) -> np.ndarray:
    """The matrix GPTQ minimises trace(D^T M D) for: H, centred with ``--bias-correction``, plus the sink
    position's (centred alike) times ``--gptq-sink-weight``."""
    name = node.inputs[0].name
    mean = context.means.get(name) if context.bias_correction else None
    if context.bias_correction and mean is None:
        raise UserError(f"{node.name}: --bias-correction has no calibration mean for its input")
    if mean is not None:
        hessian = hessian - np.outer(mean, mean)
    if context.gptq_sink_weight:
        if name not in context.sink_moments:
            raise UserError(f"{node.name}: --gptq-sink-weight needs its input's values at position 0 (a [batch, "
                            "sequence, channels] tensor)")
        second, sink_mean = context.sink_moments[name]
        if mean is not None:  # E[(x0 - m)(x0 - m)^T]
            second = second - np.outer(sink_mean, mean) - np.outer(mean, sink_mean) + np.outer(mean, mean)
        hessian = hessian + context.gptq_sink_weight * second
    return hessian


def _branch_weight(graph: gs.Graph, node: gs.Node) -> gs.Constant | None:
    """The FP16 rows ``isolate_outliers`` gave ``node``'s outlier channels (None: it gave none)."""
    branch = graph.tensors().get(f"{node.name}/outlier_weight")
    return branch if isinstance(branch, gs.Constant) else None
