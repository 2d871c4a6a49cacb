"""Add an INT4 residual plane to low-bit layers (the golden build's ``w8`` verifier).

A plan names a tensor ``input`` that a layer (or a merged group of layers) reads, the tensor ``output`` holding
what the layer computes from it, and the residual: what the source model's weight adds to the layer's effective
weight, rounded to INT4 in blocks along the input with its own FP16 scales. The layer stays as it is (its stored
INT4 plane is not touched, so a file may share those bytes with the draft), and

    output' = output + MatMul(input, DequantizeLinear(residual int4, scales))

takes the output's name, its producer writing ``<output>/draft`` instead. The blocked DequantizeLinear + MatMul
is the form ONNX Runtime fuses into ``MatMulNBits``, so the verifier runs two of them per layer where the draft
runs one. The residual's scales are FP16 constants widened by a Cast in an FP32 graph, as ``quantize_weights``
stores them.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.pass_data import PassResult
from accullm_export.graph.passes import register
from accullm_export.graph.rewrite import dequantized_weight


@dataclasses.dataclass(frozen=True)
class ResidualPlane:
    """One layer's residual: read from tensor ``input``, added to tensor ``output``."""

    input: str
    output: str
    values: np.ndarray  # int8 [in, out] on int4's grid [-8, 7]
    scales: np.ndarray  # float32 [blocks, out], FP16 values
    block_size: int

    @property
    def stored_bytes(self) -> int:
        """Bytes the plane takes in the file: packed INT4 values and FP16 scales."""
        return (self.values.size + 1) // 2 + 2 * self.scales.size


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Layer name -> its residual plane, and the model's float type."""

    plans: Mapping[str, ResidualPlane]
    float_dtype: np.dtype = np.dtype(np.float32)


@register("residual_planes", Config)
def run(graph: gs.Graph, config: Config) -> PassResult:
    tensors = graph.tensors()
    stored = 0
    for layer, plane in config.plans.items():
        source, output = tensors.get(plane.input), tensors.get(plane.output)
        if source is None or output is None or len(output.inputs) != 1:
            raise ValueError(f"{layer}: the residual plane's tensors {plane.input} / {plane.output} are not in the "
                             "graph as the plan expects")
        name = f"{plane.output}/residual_plane"
        weight = dequantized_weight(graph, name, plane.values, plane.scales, 4, plane.block_size, config.float_dtype)
        correction = gs.Variable(f"{name}_output", dtype=output.dtype)
        graph.nodes.append(gs.Node("MatMul", name=f"{name}/MatMul", inputs=[source, weight], outputs=[correction]))
        draft = gs.Variable(f"{plane.output}/draft", dtype=output.dtype, shape=output.shape)
        producer = output.inputs[0]
        producer.outputs[producer.outputs.index(output)] = draft
        graph.nodes.append(gs.Node("Add", name=f"{name}/Add", inputs=[draft, correction], outputs=[output]))
        stored += plane.stored_bytes
    notes = (f"{len(config.plans)} layers got an INT4 residual plane ({stored / 2**20:.2f} MiB)",)
    return PassResult(graph.cleanup().toposort(), notes)
