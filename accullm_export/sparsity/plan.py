"""One plan per MLP: the method, the calibrated threshold, and (for ``predictor``) the trained guesser.

Thresholds come from the profile's magnitude histogram of each down projection's input (``calibrate`` records
it): t(s) is the |a| under which a fraction s of all activations fall. Guessers are trained on activations of
the profile's own calibration text, read from the source model a few layers at a time. Both measure a neuron's
activity as the model computes it, a = act(g) * u read from the MLP's own product tensor, so a GELU-tanh MLP is
measured with its GELU as a SwiGLU one with its SiLU.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from accullm_export.calibration.stats import MagnitudeHistogram
from accullm_export.errors import UserError
from accullm_export.graph.mlp import MLPBlock
from accullm_export.sparsity.config import SparsityConfig
from accullm_export.sparsity.predictor import Predictor, train_predictor

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SparsePlan:
    """What the rewrite does to one MLP."""

    mlp: str  # the MLP's name prefix
    down: str  # its down projection's node name (the profile's key)
    activation: str  # the gate's activation (graph.mlp.GATE_ACTIVATIONS): "silu" | "gelu_tanh"
    method: str
    sparsity: float
    threshold: float  # |a| threshold at this sparsity (the label of "large" for the guesser)
    predictor: Predictor | None = None

    def to_dict(self) -> dict:
        data = {"mlp": self.mlp, "down": self.down, "activation": self.activation, "method": self.method,
                "sparsity": self.sparsity, "threshold": self.threshold}
        if self.predictor is not None:
            p = self.predictor
            data["predictor"] = {"rank": int(p.down_rank.shape[1]), "tau": p.tau, "recall": round(p.recall, 4),
                                 "precision": round(p.precision, 4), "kept": round(p.kept, 4),
                                 "flops_percent_of_mlp": round(100 * p.flops_fraction(), 3)}
        return data


def layer_threshold(profile, down_node: str, sparsity: float) -> float:
    """|a| under which ``sparsity`` of the down projection's inputs fell during calibration."""
    entry = next((layer for layer in profile.manifest["layers"] if layer["node"] == down_node), None)
    key = f"{entry['input_index']}.magnitude_histogram" if entry is not None else None
    if key is None or key not in profile.arrays:
        raise UserError(f"profile {profile.folder} has no activation histogram for {down_node}: calibrate this "
                        "model again with the current `accullm-export calibrate`")
    return float(MagnitudeHistogram(counts=profile.arrays[key]).thresholds([sparsity])[0])


def plan_sparsity(model_path: Path, blocks: list[MLPBlock], profile, config: SparsityConfig,
                  budget_bytes: int = 512 << 20) -> dict[str, SparsePlan]:
    """Plans keyed by MLP name; guessers are trained here for the ``predictor`` method."""
    if not blocks:
        raise UserError(f"{model_path} has no recognisable gated MLP (down(act(gate(x)) * up(x)), act SiLU or the "
                        "tanh-approximated GELU, with constant weights): nothing to sparsify")
    if config.method == "predictor" and not all(block.plain for block in blocks):
        raise UserError(f"{model_path}: the guesser narrows gate and up, which must be plain MatMuls of one input; "
                        "sparsify the dense export, not a quantized model with outlier branches")
    plans = {block.name: SparsePlan(mlp=block.name, down=block.down.name, activation=block.activation_kind,
                                    method=config.method, sparsity=config.sparsity,
                                    threshold=layer_threshold(profile, block.down.name, config.sparsity))
             for block in blocks}
    if config.method == "predictor":
        predictors = _train_all(model_path, blocks, plans, profile, config, budget_bytes)
        plans = {name: dataclasses.replace(plan, predictor=predictors[name]) for name, plan in plans.items()}
    return plans


def _train_all(model_path, blocks, plans, profile, config, budget_bytes) -> dict[str, Predictor]:
    from tqdm.auto import tqdm

    from accullm_export.calibration.collect import OPTIMIZATION
    from accullm_export.calibration.run import profile_feeds
    from accullm_export.runtime.intermediates import IntermediateReader

    feeds = profile_feeds(model_path, profile, config.samples)
    rows = sum(int(np.asarray(feed["input_ids"]).size) for feed in feeds)
    per_block = rows * (blocks[0].hidden_size + blocks[0].intermediate_size) * 4
    group = max(1, budget_bytes // max(per_block, 1))
    reader = IntermediateReader(model_path, OPTIMIZATION)
    predictors = {}
    progress = tqdm(total=len(blocks), desc="training guessers", leave=False, disable=not sys.stderr.isatty())
    for start in range(0, len(blocks), group):
        chosen = blocks[start:start + group]
        names = [name for block in chosen for name in (block.input.name, block.product.outputs[0].name)]
        tap = reader.open(names)
        collected = {name: [] for name in names}
        for feed in feeds:
            for name, value in tap.run(feed).items():
                collected[name].append(value[:, 1:, :].reshape(-1, value.shape[-1]))  # position 0: the sink
        for index, block in enumerate(chosen, start):
            inputs = np.concatenate(collected[block.input.name])
            activations = np.concatenate(collected[block.product.outputs[0].name])
            predictor = train_predictor(inputs, activations, plans[block.name].threshold, config.sparsity,
                                        rank=config.rank, steps=config.steps, seed=config.seed + index)
            log.info("%s: guesser recall %.3f, precision %.3f, %.2f%% of the MLP's FLOPs", block.name,
                     predictor.recall, predictor.precision, 100 * predictor.flops_fraction())
            predictors[block.name] = predictor
            progress.update(1)
    progress.close()
    return predictors
