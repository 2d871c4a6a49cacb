"""The ``sparsify`` options: a frozen, versioned config checked once, where it is made."""

from __future__ import annotations

import dataclasses

from accullm_export.errors import UserError

METHODS = ("threshold", "predictor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityConfig:
    """How many MLP neurons to skip per token and how to choose them.

    Attributes:
        sparsity: the fraction of each MLP's neurons skipped per token, in [0, 1); 0 leaves the MLPs dense.
        method: ``threshold`` (TEAL/CATS: drop the down-projection inputs under the layer's calibrated |a|
            threshold; gate and up stay dense) or ``predictor`` (a low-rank guesser picks the neurons before
            the MLP runs, so gate, up and down all skip them).
        rank: the guesser's inner width r (hidden -> r -> intermediate).
        samples: calibration windows whose activations train the guessers (from the profile's text).
        steps: optimizer steps per guesser.
        seed: seeds the guessers' initialization and batches (training is reproducible with it).
        dense_first: the sequence's first position (position id 0, the attention sink whose MLP writes the
            massive activations every later token attends to) keeps all its neurons. It is computed once, in
            the prompt's prefill, so decoding skips exactly as much as without it.
    """

    sparsity: float
    method: str = "threshold"
    rank: int = 64
    samples: int = 16
    steps: int = 400
    seed: int = 0
    dense_first: bool = True
    version: int = 1

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"--sparsity must be in [0, 1) (the fraction of MLP neurons skipped), got {self.sparsity}")
        if self.method not in METHODS:
            raise UserError(f"unknown sparsity method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.rank < 1 or self.samples < 1 or self.steps < 1:
            raise UserError("--predictor-rank, --predictor-samples and --predictor-steps must be at least 1")

    @property
    def active(self) -> bool:
        return self.sparsity > 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SparsityConfig":
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})
