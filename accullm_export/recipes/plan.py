"""The per-layer plan every rewrite pass reads, computed once from a recipe, the model's linear layers and the
calibration profile, so passes never disagree about a layer (it is written into the output's manifest)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from accullm_export.errors import UserError
from accullm_export.graph.layer_plan import (LayerPlan, activation_groups, activation_scale, override_matches,
                                          sink_channels, split_precision)
from accullm_export.recipes.config import Recipe

# ``outliers.layers = ["residual"]``: the layers that read the residual stream through a norm, where its outlier
# features enter (q/k/v and gate/up after the RMSNorms, the LM head after the final norm), plus the layers that
# write the attention sink's massive activations (their sink channels join the exact rows: GPTQ's statistics
# leave the sink out, so nothing else protects them).
RESIDUAL_READERS = ("*q_proj*", "*k_proj*", "*v_proj*", "*gate_proj*", "*up_proj*", "lm_head")
ROTATION_BLOCKS = (128, 64, 32, 16)  # Hadamard sizes rotation picks from, largest first
AUTO_GROUPS = (32, 16)  # activations.group = "auto" picks the first that divides every layer's width


def layer_weights(recipe: Recipe, node: str) -> tuple[str, int | None]:
    """(precision, INT4 block size or None) from the recipe default or the last override matching ``node``; an
    INT4 override without ``:B`` takes the recipe's block size."""
    precision, block = recipe.weights.precision, None
    for pattern, value in recipe.weights.overrides:
        if override_matches(pattern, node):
            precision, block = split_precision(value)
    return precision, (block or recipe.weights.block_size) if precision == "int4" else None


def _branch_patterns(recipe: Recipe, layers: Sequence, profile) -> tuple[tuple[str, ...], tuple[str, ...], dict]:
    """(patterns that get a branch, '!' patterns that never do, sink writers -> their sink channels)."""
    outlier_layers = tuple(p for p in recipe.outliers.layers if not p.startswith("!"))
    excluded = tuple(p[1:] for p in recipe.outliers.layers if p.startswith("!"))
    sink_writers: dict[str, list[int]] = {}
    if "residual" in outlier_layers:
        readers = [p for p in RESIDUAL_READERS if any(override_matches(p, layer.node) for layer in layers)]
        if not readers:
            raise UserError("outliers.layers residual: no q/k/v, gate/up or lm_head layer in this model (names look "
                            f"like {layers[0].node}); give name patterns instead")
        outlier_layers = tuple(p for p in outlier_layers if p != "residual") + tuple(readers)
        sink_writers = {layer.node: channels for layer in layers
                        if (channels := sink_channels(profile.input_statistics(layer.input)))}
        outlier_layers += tuple(sink_writers)
    return outlier_layers, excluded, sink_writers


def _check_patterns(recipe: Recipe, layers: Sequence, outlier_layers, excluded) -> None:
    for key, pattern in [("weights.overrides", p) for p, _ in recipe.weights.overrides] + [
            ("outliers.layers", p) for p in outlier_layers] + [("outliers.layers !", p) for p in excluded] + [
            ("rotation.layers", p) for p in recipe.rotation.layers] + [
            ("outliers.min_channels", p) for p, _ in recipe.outliers.min_channels]:
        if not any(override_matches(pattern, layer.node) for layer in layers):
            raise UserError(f"{key} {pattern!r} matches no linear layer (names look like {layers[0].node})")


def _outlier_sets(recipe: Recipe, layers: Sequence, profile, precision: dict[str, str]) -> dict[str, set[int]]:
    """Input tensor -> its outlier channels: the union over the tensor's branch readers, topped up to
    ``outliers.min_channels``."""
    outlier_layers, excluded, sink_writers = _branch_patterns(recipe, layers, profile)
    _check_patterns(recipe, layers, outlier_layers, excluded)
    outliers: dict[str, set[int]] = {}
    wanted: dict[str, int] = {}  # input tensor -> the largest min_channels count among its branch readers
    topped: set[str] = set()
    for layer in layers:
        branch = (not outlier_layers or any(override_matches(p, layer.node) for p in outlier_layers)) and \
            not any(override_matches(p, layer.node) for p in excluded)
        if precision[layer.node] in ("int8", "int4") and recipe.outlier_branch and branch:
            outliers.setdefault(layer.input, set()).update(_outlier_channels(recipe, layer, profile))
            outliers[layer.input].update(sink_writers.get(layer.node, ()))
            counts = [count for pattern, count in recipe.outliers.min_channels if override_matches(pattern, layer.node)]
            if counts:
                wanted[layer.input] = max(wanted.get(layer.input, 0), *counts)
                topped.add(layer.node)
    for tensor, count in wanted.items():  # after every reader added its channels: the top-up fills only the gap
        outliers[tensor] = _topped_up(outliers[tensor], count, profile, tensor)
    for pattern, count in recipe.outliers.min_channels:
        if not any(override_matches(pattern, node) for node in topped):
            raise UserError(f"outliers.min_channels {pattern!r}={count}: no layer it matches gets an outlier branch "
                            "(INT8/INT4 layers do, within outliers.layers)")
    return outliers


def plan_layers(recipe: Recipe, layers: Sequence, profile) -> dict[str, LayerPlan]:
    """One plan per linear layer (``graph.linear.LinearLayer``), from the recipe, overrides and profile.

    Layers that share an input get the union of their outlier channels, so the input is split once and its
    quantization scale is the same for all of them.

    Raises:
        UserError: a pattern that matches no layer, or a layer the profile does not know.
    """
    weights = {layer.node: layer_weights(recipe, layer.node) for layer in layers}  # (precision, int4 block)
    precision = {node: chosen for node, (chosen, _) in weights.items()}
    outliers = _outlier_sets(recipe, layers, profile, precision)
    mode, group_size = recipe.activations.mode, recipe.activations.group
    ragged = group_size == "auto"  # auto: the smallest block, its last one short, where none divides every width
    if ragged:  # the granularity of MatMulNBits' own INT8 inputs where the widths allow it
        group_size = next((size for size in AUTO_GROUPS if size in activation_groups(layers)), AUTO_GROUPS[-1])
    plans = {}
    for layer in layers:
        chosen = tuple(sorted(outliers.get(layer.input, ()))) if precision[layer.node] in ("int8", "int4") else ()
        quantize_input = recipe.quantize_activations and precision[layer.node] == "int8"
        scale = group = None
        if quantize_input and mode == "static":
            scale = activation_scale(profile.input_statistics(layer.input), chosen)
        if quantize_input and mode == "dynamic":
            group = group_size
            if layer.in_features % group and not ragged:
                usable = activation_groups(layers)
                raise UserError(f"activations.group {group}: {layer.node} has {layer.in_features} input channels, "
                                f"not a multiple of {group}; this model takes "
                                f"{', '.join(map(str, usable)) or 'no group size'}")
        rotation = None
        if any(override_matches(p, layer.node) for p in recipe.rotation.layers):
            rotation = rotation_block(layer, precision[layer.node], quantize_input)
        plans[layer.node] = LayerPlan(
            node=layer.node, input=layer.input, weight=layer.weight, in_features=layer.in_features,
            out_features=layer.out_features, precision=precision[layer.node],
            block_size=group or weights[layer.node][1], outliers=chosen,
            activations=mode if quantize_input else None, activation_scale=scale,
            activation_group=group, rotation=rotation)
    return plans


def rotation_block(layer, precision: str, quantized_input: bool) -> int:
    """The Hadamard block size ``rotation.layers`` gives ``layer``: the largest of ROTATION_BLOCKS dividing its
    input channels.

    Raises:
        UserError: the layer is not a weight-only INT4 layer, or no block size divides its input channels.
    """
    if precision != "int4" or quantized_input:
        raise UserError(f"rotation.layers: {layer.node} is {precision}"
                        f"{' with INT8 activations' if quantized_input else ''}; only weight-only INT4 layers are "
                        "rotated")
    block = next((size for size in ROTATION_BLOCKS if layer.in_features % size == 0), None)
    if block is None:
        raise UserError(f"rotation.layers: {layer.node} has {layer.in_features} input channels, which no Hadamard "
                        f"block of {', '.join(map(str, ROTATION_BLOCKS))} divides")
    return block


def _outlier_channels(recipe: Recipe, layer, profile) -> list[int]:
    channels = recipe.outliers.channels
    if channels == 0:
        return []
    if channels == "auto":
        policy = None if recipe.outliers.policy == "profile" else recipe.outliers.policy
        policies = profile.manifest["layers"][0]["candidates"] if profile.manifest["layers"] else {}
        if policy is not None and policy not in policies:
            raise UserError(f"the profile has no outlier policy {policy!r}; it has {', '.join(policies)}")
        return profile.outliers(layer.node, policy)
    absmax = profile.input_statistics(layer.input)["absmax"]
    count = min(int(channels), absmax.size)
    return sorted(int(c) for c in np.argsort(-absmax, kind="stable")[:count])


def _topped_up(chosen: set[int], count: int, profile, tensor: str) -> set[int]:
    """``chosen`` plus the channels of largest E[x^2] (calibration) until it holds ``count``."""
    second = np.asarray(profile.input_statistics(tensor)["second_moment"], dtype=np.float64)
    if count >= second.size:
        raise UserError(f"outliers.min_channels {count}: {tensor} has {second.size} channels, so no row would stay "
                        "low-bit")
    extra = [int(c) for c in np.argsort(-second, kind="stable") if int(c) not in chosen]
    return set(chosen) | set(extra[:max(count - len(chosen), 0)])
