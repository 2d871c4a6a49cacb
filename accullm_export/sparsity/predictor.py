"""The "guesser": a low-rank predictor (hidden -> r -> intermediate) of which MLP neurons will matter.

Trained per layer with torch on calibration activations (Deja Vu's recipe, simplified): the input is the MLP's
input x, the label of neuron n is |a_n| > t, where a is the down projection's input and t the layer's
magnitude threshold at the target sparsity. After training, the decision level tau is set so that, on the
training rows, the guesser keeps the same fraction of neurons the threshold would (1 - sparsity).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from accullm_export.errors import require

BATCH_ROWS = 1024
LEARNING_RATE = 3e-3
HELD_OUT = 0.1  # the last tenth of the rows (whole windows come last) measures recall and precision


@dataclasses.dataclass(frozen=True)
class Predictor:
    """logits = (x @ down_rank) @ up_rank + bias; a neuron is kept where logits > tau."""

    down_rank: np.ndarray  # [hidden, r], the input standardisation folded in
    up_rank: np.ndarray  # [r, intermediate]
    bias: np.ndarray  # [intermediate]
    tau: float
    recall: float  # of the truly large neurons (|a| > t), on held-out rows
    precision: float
    kept: float  # fraction of neurons kept on held-out rows

    def logits(self, x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) @ self.down_rank) @ self.up_rank + self.bias

    def flops_fraction(self) -> float:
        """Multiply-adds per token as a fraction of the dense gated MLP's (three hidden x intermediate)."""
        hidden, rank = self.down_rank.shape
        intermediate = self.up_rank.shape[1]
        return (hidden * rank + rank * intermediate) / (3 * hidden * intermediate)


def train_predictor(inputs: np.ndarray, activations: np.ndarray, threshold: float, sparsity: float, *,
                    rank: int, steps: int, seed: int) -> Predictor:
    """Fit one layer's guesser.

    Args:
        inputs: the MLP's input rows [n, hidden].
        activations: the down projection's input rows [n, intermediate], row for row.
        threshold: |a| above which a neuron counts as large (the layer's threshold at ``sparsity``).
        sparsity: the fraction of neurons to skip; sets tau.
        rank, steps, seed: the guesser's width, optimizer steps and random seed.
    """
    torch = require("torch", "export")
    rows = inputs.shape[0]
    split = max(1, min(rows - 1, int(round(rows * (1 - HELD_OUT))))) if rows > 1 else rows
    x = inputs.astype(np.float32)
    labels = np.abs(activations) > threshold
    mean, std = x[:split].mean(axis=0), x[:split].std(axis=0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], rank, bias=False),
                                    torch.nn.Linear(rank, activations.shape[1], bias=True))
    train_x = torch.from_numpy((x[:split] - mean) / std)
    train_y = torch.from_numpy(labels[:split].astype(np.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_function = torch.nn.BCEWithLogitsLoss()
    for _ in range(steps):
        batch = torch.randint(0, split, (min(BATCH_ROWS, split),), generator=generator)
        optimizer.zero_grad()
        loss = loss_function(model(train_x[batch]), train_y[batch])
        loss.backward()
        optimizer.step()
    first, second = model[0].weight.detach().numpy().T, model[1].weight.detach().numpy().T
    bias = model[1].bias.detach().numpy()
    down_rank = (first / std[:, None]).astype(np.float32)  # fold the standardisation: (x - mean) / std @ A
    bias = (bias - (mean / std) @ first @ second).astype(np.float32)
    predictor = Predictor(down_rank=down_rank, up_rank=second.astype(np.float32), bias=bias, tau=0.0,
                          recall=0.0, precision=0.0, kept=0.0)
    train_logits = predictor.logits(x[:split])
    tau = float(np.quantile(train_logits, sparsity)) if sparsity > 0 else float(train_logits.min()) - 1.0
    held_x, held_labels = (x[split:], labels[split:]) if split < rows else (x, labels)
    chosen = predictor.logits(held_x) > tau
    large = held_labels.sum()
    return dataclasses.replace(predictor, tau=tau,
                               recall=float((chosen & held_labels).sum() / max(large, 1)),
                               precision=float((chosen & held_labels).sum() / max(chosen.sum(), 1)),
                               kept=float(chosen.mean()))
