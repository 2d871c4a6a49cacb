"""Block-Hadamard input rotations: the matrices and the node pattern ``rotate_inputs`` writes into a graph.

R = diag(d) (I (x) H_b / sqrt(b)), with random signs d and a Hadamard transform within each block of b
consecutive channels. ``rotate_inputs`` inserts it and ``distill_scales`` reads it back (its torch replica
multiplies by the same R), so both take the matrices and the pattern from here.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from accullm_export.graph.rewrite import producer_of

ROTATION_SUFFIX = "/rotation/Mul"  # the name of the first node of an inserted rotation ends so


def hadamard(size: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of a power-of-two ``size``, scaled to be orthogonal."""
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix / np.sqrt(size)


def rotation_matrix(signs: np.ndarray, block: int) -> np.ndarray:
    """R = diag(d) (I (x) H_b): x R is what the rotation nodes compute (float64 [C, C])."""
    channels = signs.shape[0]
    return np.kron(np.eye(channels // block), hadamard(block)) * np.asarray(signs, dtype=np.float64)[:, None]


def input_rotation(node: gs.Node) -> tuple[gs.Variable, np.ndarray] | None:
    """(the unrotated input, R) when ``node`` reads its input through the nodes ``rotate_inputs`` writes.

    Returns:
        None when the input is not rotated.
    """
    back = producer_of(node.inputs[0], "Reshape")
    matmul = producer_of(back.inputs[0], "MatMul") if back is not None else None
    split = producer_of(matmul.inputs[0], "Reshape") if matmul is not None else None
    multiply = producer_of(split.inputs[0], "Mul") if split is not None else None
    if multiply is None or not multiply.name.endswith(ROTATION_SUFFIX):
        return None
    signs = np.asarray(multiply.inputs[1].values, dtype=np.float64)
    return multiply.inputs[0], rotation_matrix(signs, int(matmul.inputs[1].values.shape[0]))
