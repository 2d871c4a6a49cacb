"""``inspect``: what an ONNX model holds (opset, I/O, op counts, parameters by dtype, linear layers)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
from onnx import helper

from accullm_export.quant.storage import storage_bytes

LINEAR_OPS = ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger")


@dataclasses.dataclass(frozen=True)
class LinearLayer:
    node: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    opsets: dict[str, int]
    ir_version: int
    inputs: list[tuple[str, str, list]]
    outputs: list[tuple[str, str, list]]
    op_counts: dict[str, int]
    parameters_by_dtype: dict[str, tuple[int, int]]  # dtype -> (element count, bytes)
    linear_layers: list[LinearLayer]

    @property
    def num_parameters(self) -> int:
        return sum(count for count, _ in self.parameters_by_dtype.values())

    @property
    def num_bytes(self) -> int:
        return sum(size for _, size in self.parameters_by_dtype.values())


def summarize(model: onnx.ModelProto) -> ModelSummary:
    """Summarize a model; initializers are read from their headers, so external data need not be loaded."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    parameters: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for tensor in graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        parameters[dtype.name][0] += count
        parameters[dtype.name][1] += storage_bytes(dtype, count)
    producers = {output: node for node in graph.node for output in node.output}
    linear = []
    for node in graph.node:
        if node.op_type in LINEAR_OPS and len(node.input) > 1:
            found = _stored_weight(node.input[1], initializers, producers)
            if found is not None:
                weight, storage = found
                tensor = initializers[weight]
                linear.append(LinearLayer(node.name, node.op_type, weight, tuple(tensor.dims), storage))
    return ModelSummary(
        opsets={entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        ir_version=model.ir_version,
        inputs=[_value_info(v) for v in graph.input if v.name not in initializers],
        outputs=[_value_info(v) for v in graph.output],
        op_counts=dict(collections.Counter(node.op_type for node in graph.node).most_common()),
        parameters_by_dtype={k: (v[0], v[1]) for k, v in parameters.items()},
        linear_layers=linear,
    )


def format_summary(summary: ModelSummary, max_linear: int = 12) -> str:
    """One screen of text; the linear-layer list is cut after ``max_linear`` rows (0 prints them all)."""
    lines = [f"opset: {', '.join(f'{d} {v}' for d, v in summary.opsets.items())}   ir_version: {summary.ir_version}"]
    for title, values in (("inputs", summary.inputs), ("outputs", summary.outputs)):
        lines.append(f"{title} ({len(values)}):")
        shown = values if len(values) <= 8 else values[:6] + [("...", "", [])] + values[-1:]
        lines += [f"  {name:40s} {dtype:8s} {shape}" if dtype else f"  {name}" for name, dtype, shape in shown]
    lines.append("ops: " + ", ".join(f"{op} {count}" for op, count in summary.op_counts.items()))
    lines.append(f"parameters: {summary.num_parameters:,} ({summary.num_bytes / 2**20:.1f} MiB)")
    for dtype, (count, size) in sorted(summary.parameters_by_dtype.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {dtype:10s} {count:>14,} params {size / 2**20:>10.1f} MiB")
    layers = summary.linear_layers
    lines.append(f"linear layers ({len(layers)}):")
    shown = layers if not max_linear or len(layers) <= max_linear else layers[:max_linear]
    lines += [f"  {layer.node:50s} {layer.op_type:8s} {layer.dtype:16s} {list(layer.shape)}" for layer in shown]
    if len(shown) < len(layers):
        lines.append(f"  ... {len(layers) - len(shown)} more (use --all)")
    return "\n".join(lines)


def _stored_weight(name: str, initializers: dict, producers: dict) -> tuple[str, str] | None:
    """(initializer, how it is stored) behind a linear layer's weight input: the initializer itself, or one
    behind a Cast ("float16>float32") or a weight DequantizeLinear ("int4/b64", "uint4+zp/b64", "int8/ch"; "/s8"
    when its block scales are 8-bit codes)."""
    if name in initializers:
        return name, _dtype_name(initializers[name])
    producer = producers.get(name)
    if producer is None or not producer.input or producer.input[0] not in initializers:
        return None
    stored = initializers[producer.input[0]]
    if producer.op_type == "Cast":
        return stored.name, f"{_dtype_name(stored)}>{helper.tensor_dtype_to_np_dtype(producer.attribute[0].i).name}"
    if producer.op_type != "DequantizeLinear":
        return None
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in producer.attribute}
    zero_point = "+zp" if len(producer.input) > 2 and producer.input[2] and \
        np.dtype(helper.tensor_dtype_to_np_dtype(stored.data_type)).name.startswith("uint") else ""
    layout = f"b{attributes['block_size']}" if attributes.get("block_size") else "ch"
    scale = producers.get(producer.input[1])
    if scale is not None and scale.op_type == "Cast":  # FP16 scales, or the end of an FP16 graph's decoding
        scale = producers.get(scale.input[0])
    coded = "/s8" if scale is not None and scale.op_type == "Exp" else ""  # 8-bit codes (quant.scale_codes)
    return stored.name, f"{_dtype_name(stored)}{zero_point}/{layout}{coded}"


def _dtype_name(tensor: onnx.TensorProto) -> str:
    return helper.tensor_dtype_to_np_dtype(tensor.data_type).name


def _value_info(value: onnx.ValueInfoProto) -> tuple[str, str, list]:
    tensor_type = value.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name if tensor_type.elem_type else "?"
    shape = [dim.dim_param or dim.dim_value for dim in tensor_type.shape.dim]
    return value.name, dtype, shape
