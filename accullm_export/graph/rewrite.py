"""Building blocks the rewrite passes share: finding planned layers in a graphsurgeon graph, and replacing a
layer's float weight with a quantized constant behind DequantizeLinear."""

from __future__ import annotations

import gc
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.ir import constant, constant_array
from accullm_export.quant import scale_codes
from accullm_export.quant.asymmetric import stored_unsigned


def planned_nodes(graph: gs.Graph, plans: Mapping) -> Iterator[tuple[gs.Node, object]]:
    """(node, plan) for each MatMul of the graph that has a plan, in graph order."""
    for node in list(graph.nodes):
        plan = plans.get(node.name)
        if plan is not None and node.op == "MatMul":
            yield node, plan


def asymmetric_layer(config, plan) -> bool:
    """Whether a planned layer gets asymmetric INT4 (``config.asymmetric``: blocked INT4 layers not kept
    symmetric by their plan)."""
    return config.asymmetric and plan.bits == 4 and plan.block_size is not None and not plan.symmetric


def producer_of(tensor, op: str) -> gs.Node | None:
    """The node producing ``tensor`` if it is the only one and of type ``op`` (None for constants and inputs)."""
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1 or tensor.inputs[0].op != op:
        return None
    return tensor.inputs[0]


def float_weight(node: gs.Node) -> gs.Constant | None:
    """The layer's weight if it is still a float constant (not already behind a DequantizeLinear)."""
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant) and np.dtype(weight.dtype).kind == "f":  # not .values: a lazy copy stays lazy
        return weight
    return None


def is_dequantized(node: gs.Node) -> bool:
    """Whether the layer's weight already comes from a DequantizeLinear (or a Cast of a stored constant)."""
    weight = node.inputs[1]
    return not isinstance(weight, gs.Constant) and bool(weight.inputs) and weight.inputs[0].op in (
        "DequantizeLinear", "Cast")


def widening_cast(tensor) -> gs.Node | None:
    """The Cast producing ``tensor`` from a stored constant (FP16 block scales widened to the float type), else
    None."""
    cast = producer_of(tensor, "Cast")
    return cast if cast is not None and isinstance(cast.inputs[0], gs.Constant) else None


def stored_scales(dequantize: gs.Node) -> gs.Constant | None:
    """The constant holding a weight DequantizeLinear's scales: its scale input, or the FP16 constant behind the
    Cast that widens blocked scales to the model's float type (see ``replace_weight_dequantized``)."""
    scale = dequantize.inputs[1]
    cast = widening_cast(scale)
    if cast is not None:
        return cast.inputs[0]
    return scale if isinstance(scale, gs.Constant) else None


def replace_weight_dequantized(graph: gs.Graph, node: gs.Node, values: np.ndarray, scales: np.ndarray, bits: int,
                               block_size: int | None, float_dtype: np.dtype,
                               zero_points: np.ndarray | None = None) -> None:
    """Make ``node`` read DequantizeLinear(int values, scales) instead of its float weight
    (``dequantized_weight`` with the prefix ``<node>/weight``); the float constant, where nothing else reads it,
    is freed soon after (``release_replaced``)."""
    replaced = node.inputs[1]
    node.inputs[1] = dequantized_weight(graph, f"{node.name}/weight", values, scales, bits, block_size, float_dtype,
                                        zero_points)
    waiting = replaced_bytes(replaced)
    del replaced
    release_replaced(waiting)


COLLECT_BYTES = 256 << 20  # replaced constants' bytes left waiting for Python's cycle collector at most
_waiting = 0  # bytes of replaced constants since the last collection


def replaced_bytes(tensor) -> int:
    """The bytes a constant just replaced frees once collected: none while something still reads it."""
    if not isinstance(tensor, gs.Constant) or tensor.outputs:
        return 0
    return int(getattr(tensor._values, "nbytes", 0))


def release_replaced(size: int) -> None:
    """Count ``size`` bytes of constants a pass has replaced (``replaced_bytes``; the caller holds none of them
    any longer), and run Python's cycle collector once ``COLLECT_BYTES`` of them wait: a graphsurgeon tensor
    and its synchronized lists of producers and consumers refer to each other, so reference counting never frees
    one, and a pass that replaces a model's weights layer by layer would otherwise hold every float copy until
    the collector happens to run."""
    global _waiting
    _waiting += size
    if _waiting >= COLLECT_BYTES:
        _waiting = 0
        gc.collect()


def dequantized_weight(graph: gs.Graph, prefix: str, values: np.ndarray, scales: np.ndarray, bits: int,
                       block_size: int | None, float_dtype: np.dtype,
                       zero_points: np.ndarray | None = None) -> gs.Variable:
    """A DequantizeLinear of integer weights (constants ``<prefix>_quantized``, ``<prefix>_scale``, node
    ``<prefix>/DequantizeLinear``) appended to ``graph``; returns its float output ``<prefix>_dequantized``.

    Args:
        values: integers on the symmetric grid, [in, out]; with ``zero_points``, the signed v = q - z of
            asymmetric INT4 (``quant.asymmetric``), stored as uint4 q with the zero points beside them.
        scales: [blocks, out] (blocked, axis 0) or [1, out] (per output channel, axis 1).
        bits: 4 (stored packed as int4) or 8.
        float_dtype: the dtype of the weight it stands for. Per-channel scales are stored in it; blocked
            scales (FP16 values, ``symmetric.half_representable``) are stored in FP16 and, in a float32 graph,
            widened by a Cast of the constant, which ONNX Runtime folds at load time (MatMulNBits fusion included)
            and the TensorRT bundle folds before parsing.
        zero_points: blocked INT4 only: uint8 [blocks, out] in [0, 15], stored as uint4 (TensorRT takes zero
            points of 0 alone: ``passes.lower_zero_points`` rewrites them for it).
    """
    storage = ml_dtypes.int4 if bits == 4 else np.int8
    if zero_points is not None:
        if bits != 4 or block_size is None:
            raise ValueError("zero points are for blocked INT4 weights")
        values = stored_unsigned(values, zero_points, block_size)
        storage = ml_dtypes.uint4
    quantized = constant(f"{prefix}_quantized", values.astype(storage))
    if block_size is None:
        scale = constant(f"{prefix}_scale", scales.reshape(-1).astype(float_dtype))
        attrs = {"axis": 1}
        inputs = [quantized, scale, constant(f"{prefix}_zero_point", np.zeros(scales.size, storage))]
    else:
        # ONNX Runtime's blocked DequantizeLinear rejects a zero point of another rank; 0 is the default
        scale = half_constant(graph, f"{prefix}_scale", scales, float_dtype)
        attrs = {"axis": 0, "block_size": int(block_size)}
        inputs = [quantized, scale]
        if zero_points is not None:  # the same shape as the scales
            inputs.append(constant(f"{prefix}_zero_point", zero_points.astype(ml_dtypes.uint4)))
    weight = gs.Variable(f"{prefix}_dequantized", dtype=float_dtype, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{prefix}/DequantizeLinear", attrs=attrs, inputs=inputs,
                               outputs=[weight]))
    return weight


def half_constant(graph: gs.Graph, name: str, values: np.ndarray, float_dtype: np.dtype):
    """``values`` stored as an FP16 constant ``name``, widened to ``float_dtype`` by a Cast (``name/Cast``, output
    ``name_widened``) unless that is FP16; returns the tensor readers should take."""
    stored = constant(name, np.asarray(values).astype(np.float16))
    if np.dtype(float_dtype) == np.float16:
        return stored
    widened = gs.Variable(f"{name}_widened", dtype=float_dtype, shape=list(np.shape(values)))
    graph.nodes.append(gs.Node("Cast", name=f"{name}/Cast", attrs={"to": onnx_type(float_dtype)}, inputs=[stored],
                               outputs=[widened]))
    return widened


def replace_weight_cast(graph: gs.Graph, node: gs.Node, values: np.ndarray, storage_dtype: np.dtype,
                        float_dtype: np.dtype) -> None:
    """Make ``node`` read Cast(constant stored as ``storage_dtype``) back to ``float_dtype``."""
    stored = constant(f"{node.name}/weight_{np.dtype(storage_dtype).name}", values.astype(storage_dtype))
    weight = gs.Variable(f"{node.name}/weight_cast", dtype=float_dtype, shape=list(values.shape))
    cast = gs.Node("Cast", name=f"{node.name}/weight/Cast", attrs={"to": onnx_type(float_dtype)},
                   inputs=[stored], outputs=[weight])
    node.inputs[1] = weight
    graph.nodes.append(cast)


def onnx_type(dtype: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def scalable_inputs(graph: gs.Graph, plans, precisions: tuple[str, ...], notes: list[str]):
    """(input tensor name, [(node, plan)], fold) for each input whose readers are all planned at one of
    ``precisions`` and whose producer can absorb a per-channel 1/s for free (see ``fold_target``); the
    other inputs get a note in ``notes`` saying why they are left unscaled."""
    import collections

    by_input: dict[str, list] = collections.defaultdict(list)
    for node, plan in planned_nodes(graph, plans):
        if plan.precision in precisions:
            by_input[node.inputs[0].name].append((node, plan))
    for tensor_name, members in by_input.items():
        source = members[0][0].inputs[0]
        if {id(consumer) for consumer in source.outputs} != {id(node) for node, _ in members}:
            notes.append(f"{tensor_name}: read by layers outside the plan; not scaled")
            continue
        fold = fold_target(source)
        if fold is None or any(float_weight(node) is None for node, _ in members):
            notes.append(f"{tensor_name}: no producer to fold 1/s into; not scaled")
            continue
        yield tensor_name, members, fold


def fold_target(tensor: gs.Variable):
    """A function dividing ``tensor`` by per-channel s inside its producer, or None if that is not free:

    * a Mul by a constant (RMSNorm's weight): the constant is divided;
    * a Mul of two tensors, one a MatMul output read only there (SwiGLU's up projection feeding the down
      projection): that MatMul's weight columns are divided.
    """
    producer = producer_of(tensor, "Mul")
    if producer is None:
        return None
    for index, operand in enumerate(producer.inputs):
        if isinstance(operand, gs.Constant) and operand.values.ndim >= 1 and operand.values.shape[-1] > 1:
            return lambda s, node=producer, index=index: _divide_last_axis(node, index, s)
    for operand in producer.inputs:
        if isinstance(operand, gs.Variable) and len(operand.inputs) == 1 and len(operand.outputs) == 1:
            matmul = operand.inputs[0]
            if matmul.op == "MatMul" and isinstance(matmul.inputs[1], gs.Constant):
                return lambda s, node=matmul: _divide_last_axis(node, 1, s)
    return None


def apply_input_scales(members, fold, scales: np.ndarray, suffix: str) -> None:
    """Multiply the readers' weight rows by s and fold 1/s into the producer: the function is unchanged."""
    scales = np.asarray(scales, dtype=np.float64)
    for node, _ in members:
        replace_input(node, 1, node.inputs[1].values.astype(np.float64) * scales[:, None], f"{suffix}_scaled")
    fold(scales)


def _divide_last_axis(node: gs.Node, index: int, scales: np.ndarray) -> None:
    replace_input(node, index, node.inputs[index].values.astype(np.float64) / scales, "folded_scales")


def replace_input(node: gs.Node, index: int, values: np.ndarray, suffix: str) -> None:
    """Give ``node`` a new constant: the old one may be shared (tied embeddings read the lm_head's weight)."""
    old = node.inputs[index]
    node.inputs[index] = constant(f"{node.name}/{suffix}", values.astype(old.values.dtype))


def coded_scale(graph: gs.Graph, owner: str, codes: np.ndarray, log_min: np.float32, log_step: np.float32,
                float_dtype: np.dtype, stem: str = "weight_scale") -> gs.Variable:
    """Blocked scales decoded in the graph from uint8 codes (``quant.scale_codes``): Cast to float32, Mul by
    log_step, Add log_min, Exp, and a Cast to ``float_dtype`` if that is not float32. Constants only, so ONNX
    Runtime folds the chain at load time. The constants are named ``owner/stem_...`` after ``owner`` (the layer),
    which the bits accounting counts them under."""
    shape = list(codes.shape)
    stored = constant(f"{owner}/{stem}_code", np.asarray(codes, dtype=np.uint8))
    tensor = stored
    steps = [("Cast", {"to": onnx_type(np.float32)}, None),
             ("Mul", {}, constant(f"{owner}/{stem}_log_step", np.asarray(log_step, dtype=np.float32))),
             ("Add", {}, constant(f"{owner}/{stem}_log_min", np.asarray(log_min, dtype=np.float32))),
             ("Exp", {}, None)]
    if np.dtype(float_dtype) != np.float32:
        steps.append(("Cast", {"to": onnx_type(float_dtype)}, None))
    for index, (op, attrs, operand) in enumerate(steps):
        dtype = float_dtype if index == len(steps) - 1 else np.float32
        output = gs.Variable(f"{owner}/{stem}_decoded_{index}", dtype=dtype, shape=shape)
        inputs = [tensor] if operand is None else [tensor, operand]
        graph.nodes.append(gs.Node(op, name=f"{owner}/{stem}_code/{op}_{index}", attrs=attrs, inputs=inputs,
                                   outputs=[output]))
        tensor = output
    return tensor


def scale_code(tensor) -> tuple[gs.Constant, np.float32, np.float32, dict | None] | None:
    """(the uint8 code constant, log_min, log_step, the final Cast's attributes or None) if ``tensor`` is
    decoded from codes as ``coded_scale`` writes it, else None."""
    final = producer_of(tensor, "Cast")
    exp = producer_of(final.inputs[0] if final is not None else tensor, "Exp")
    add = producer_of(exp.inputs[0], "Add") if exp is not None else None
    mul = producer_of(add.inputs[0], "Mul") if add is not None else None
    cast = producer_of(mul.inputs[0], "Cast") if mul is not None else None
    if cast is None or not isinstance(cast.inputs[0], gs.Constant) or cast.inputs[0].values.dtype != np.uint8 or \
            not all(isinstance(t, gs.Constant) and t.values.size == 1 for t in (mul.inputs[1], add.inputs[1])):
        return None
    return (cast.inputs[0], np.float32(add.inputs[1].values.reshape(-1)[0]),
            np.float32(mul.inputs[1].values.reshape(-1)[0]), dict(final.attrs) if final is not None else None)


def decoded_scale(coded: tuple) -> np.ndarray:
    """The scales a ``scale_code`` chain computes, in the chain's output type (float32, or narrowed by its final
    Cast)."""
    from onnx import helper

    values = scale_codes.decode(constant_array(coded[0]), coded[1], coded[2])
    return values if coded[3] is None else values.astype(helper.tensor_dtype_to_np_dtype(int(coded[3]["to"])))
