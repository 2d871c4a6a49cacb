"""Quantization recipes and the per-layer plan every rewrite pass reads.

A recipe names a default precision for every linear layer; overrides change it for the layers whose names
match; the calibration profile supplies the outlier channels and activation ranges. The plan is computed
once, so passes never disagree about a layer, and it is written into the output's manifest.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Mapping, Sequence

import numpy as np

from accullm_export.errors import UserError
from accullm_export.quant.scale_codes import SCALE_BITS

PRECISIONS = ("fp32", "fp16", "int8", "int4")  # fp32: left as it is
BLOCKS = (16, 32, 64, 128, 256)  # int4 block sizes: powers of two that MatMulNBits and TensorRT take
ACTIVATION_GROUPS = (16, 32, 64, 128, 256)  # --activation-group sizes


@dataclasses.dataclass(frozen=True)
class RecipeDefaults:
    """What a recipe does to a layer nobody overrides."""

    weights: str
    quantize_activations: bool
    outlier_branch: bool
    description: str


RECIPES: dict[str, RecipeDefaults] = {
    "w8a8": RecipeDefaults("int8", True, True,
                           "INT8 per-output-channel weights, INT8 activations, outlier channels in an FP16 branch"),
    "w4a16": RecipeDefaults("int4", False, True,
                            "INT4 blocked weights, activations in the model's float type, outlier rows in FP16"),
    "fp16": RecipeDefaults("fp16", False, False, "linear weights stored in half precision (the baseline)"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """A recipe and its options (the ``quantize`` command line)."""

    name: str
    block_size: int = 128
    outliers: str | int = "auto"  # auto: the profile's policy; N: the N largest channels per layer; 0: none
    policy: str | None = None  # which of the profile's outlier policies "auto" uses (default: its chosen one)
    activations: str = "static"  # w8a8: static per-tensor scales from the profile, or dynamic per-token
    activation_group: int = 0  # dynamic: input channels per scale within a token (0: one scale per token)
    awq: bool = False
    gptq: bool = False
    gptq_absorb: bool = False  # GPTQ's error updates also land on the FP16 outlier rows (OWQ), not only kept rows
    gptq_sink_weight: float = 0.0  # GPTQ's H also counts the attention sink's position, with this weight
    scale_search: bool = False  # INT4 layers: each block's scale searched for the least rounding error
    asymmetric: bool = False  # blocked INT4 layers: uint4 with a zero point per block (ONNX Runtime only)
    scale_bits: int = 16  # blocked INT4 layers' scales: FP16, or 8-bit log codes (quant.scale_codes)
    bias_correction: bool = False  # each low-bit layer gets the FP16 bias E[x] (W - W_quantized); GPTQ centres H
    outlier_bits: int = 16  # the outlier branch's weight rows: FP16, or INT8 in blocks of 16 rows
    outlier_planes: bool = False  # INT4 layers: the branch folded into the weight as two INT4 planes (ORT only)
    smoothquant: float | None = None  # w8a8: SmoothQuant's migration strength alpha
    overrides: tuple[tuple[str, str], ...] = ()  # (layer pattern, precision)
    outlier_layers: tuple[str, ...] = ()  # only layers matching one of these get the FP16 branch (default: all)
    min_outliers: tuple[tuple[str, int], ...] = ()  # (layer pattern, N): at least N branch channels there
    embeddings: str = "int8"  # the token-embedding table: int8 per row, fp16, or fp32 (left as it is)
    distill_steps: int = 0  # INT4 block scales trained this many steps against the source model (0: off)
    distill_norms: bool = False  # ... and the RMSNorm gains with them
    distill_rounding: bool = False  # ... and the integers, each within one step of where rounding left it
    distill_outlier_rows: bool = False  # ... and the FP16 outlier rows
    rotate: tuple[str, ...] = ()  # INT4 layers whose low-bit part reads its input block-Hadamard rotated
    refine_vocab: int = 0  # the INT4 LM head's K rows of largest calibration error get a second INT4 stage
    version: int = 1

    def __post_init__(self):
        if self.name not in RECIPES:
            raise UserError(f"unknown recipe {self.name!r}; choose from {', '.join(RECIPES)}")
        if self.block_size not in BLOCKS:
            raise UserError(f"--block-size must be 16, 32, 64, 128 or 256, not {self.block_size}")
        if self.outliers != "auto" and (not isinstance(self.outliers, int) or self.outliers < 0):
            raise UserError(f"--outliers must be auto, 0 or a positive count, not {self.outliers!r}")
        if self.activations not in ("static", "dynamic"):
            raise UserError(f"--activations must be static or dynamic, not {self.activations!r}")
        if self.activation_group and (self.activations != "dynamic" or not self.defaults.quantize_activations):
            raise UserError("--activation-group applies to w8a8 with --activations dynamic (static scales are "
                            "per tensor)")
        if self.activation_group and self.activation_group not in ACTIVATION_GROUPS:
            raise UserError(f"--activation-group must be 16, 32, 64, 128 or 256, not {self.activation_group}")
        if self.embeddings not in ("int8", "fp16", "fp32"):
            raise UserError(f"--embeddings must be int8, fp16 or fp32, not {self.embeddings!r}")
        if self.awq and self.name != "w4a16":  # its scales would invalidate w8a8's static activation ranges
            raise UserError("--awq applies to the weight-only w4a16 recipe")
        if self.smoothquant is not None and (self.name != "w8a8" or not 0 < self.smoothquant < 1):
            raise UserError("--smoothquant takes an alpha in (0, 1) and applies to the w8a8 recipe")
        if self.scale_search and self.name == "fp16":
            raise UserError("--scale-search applies to INT4 layers (the w4a16 recipe, or int4 overrides)")
        if self.asymmetric and not self.int4_layers:
            raise UserError("--asymmetric applies to blocked INT4 layers (the w4a16 recipe, or int4 overrides)")
        if self.scale_bits not in SCALE_BITS:
            raise UserError(f"--scale-bits must be 16 (FP16 block scales) or 8 (8-bit codes), not {self.scale_bits}")
        if self.scale_bits != 16 and not self.int4_layers:
            raise UserError("--scale-bits 8 applies to blocked INT4 layers (the w4a16 recipe, or int4 overrides)")
        if self.asymmetric and self.distill_rounding:
            raise UserError("--distill-rounding moves the integers within the symmetric INT4 range; it does not "
                            "take --asymmetric")
        if self.bias_correction and self.name == "fp16" and not any(
                split_precision(value)[0] in ("int8", "int4") for _, value in self.overrides):
            raise UserError("--bias-correction corrects the low-bit layers' mean error: the fp16 recipe has none "
                            "(give an int8 or int4 override, or the w4a16 or w8a8 recipe)")
        if self.outlier_bits not in (16, 8):
            raise UserError(f"--outlier-bits must be 16 (FP16 rows) or 8 (INT8 rows), not {self.outlier_bits}")
        if self.outlier_bits == 8 and (self.outliers == 0 or not self.defaults.outlier_branch):
            raise UserError("--outlier-bits 8 stores the outlier branch's rows as INT8: this recipe has no branch")
        if self.outlier_planes and (self.outliers == 0 or not self.defaults.outlier_branch):
            raise UserError("--outlier-planes folds the outlier branch into the INT4 weights: this recipe "
                            f"({self.name}, --outliers {self.outliers}) has no branch")
        if self.outlier_planes and self.bias_correction:
            raise UserError("--outlier-planes and --bias-correction do not combine: the bias is measured on the "
                            "layer's input, which the planes widen; give one of them")
        if self.outlier_planes and not self.int4_layers:
            raise UserError("--outlier-planes folds the outlier rows into blocked INT4 weights (the w4a16 recipe, "
                            "or int4 overrides)")
        if self.gptq and self.name == "fp16":
            raise UserError("--gptq applies to the integer recipes (w4a16, w8a8)")
        if not 0 <= self.gptq_sink_weight < float("inf"):
            raise UserError(f"--gptq-sink-weight must be 0 (off) or positive, not {self.gptq_sink_weight}")
        if self.gptq_sink_weight and not self.gptq:
            raise UserError("--gptq-sink-weight changes GPTQ's objective: give --gptq")
        if self.gptq_absorb and not self.gptq:
            raise UserError("--gptq-absorb changes how GPTQ treats the FP16 outlier rows: give --gptq")
        if self.gptq_absorb and self.outliers == 0:
            raise UserError("--gptq-absorb pushes GPTQ's error onto the FP16 outlier rows, and --outliers 0 has none")
        if self.distill_steps < 0:
            raise UserError(f"--distill-steps must be 0 (off) or positive, not {self.distill_steps}")
        if self.distill_steps and self.name != "w4a16":
            raise UserError("--distill-steps applies to the weight-only w4a16 recipe (its replica does not model "
                            "activation quantization)")
        if self.distill_norms and not self.distill_steps:
            raise UserError("--distill-norms trains the norm gains along with the scales: give --distill-steps")
        if self.distill_rounding and not self.distill_steps:
            raise UserError("--distill-rounding trains the integers along with the scales: give --distill-steps")
        if self.distill_outlier_rows and not self.distill_steps:
            raise UserError("--distill-outlier-rows trains the FP16 outlier rows along with the scales: give "
                            "--distill-steps")
        if self.distill_outlier_rows and self.outliers == 0:
            raise UserError("--distill-outlier-rows trains the FP16 outlier rows, and --outliers 0 has none")
        if self.rotate and not self.int4_layers:
            raise UserError("--rotate applies to blocked INT4 layers (the w4a16 recipe, or int4 overrides)")
        if self.rotate and self.bias_correction:
            raise UserError("--rotate and --bias-correction do not combine yet: the bias would need the rotated "
                            "input's mean in the distillation replica; give one of them")
        if not (isinstance(self.refine_vocab, int) and self.refine_vocab >= 0):
            raise UserError(f"--refine-vocab must be 0 (off) or a positive row count, not {self.refine_vocab!r}")
        if self.refine_vocab and not self.int4_layers:
            raise UserError("--refine-vocab refines an INT4 LM head (the w4a16 recipe, or an int4 override)")
        for pattern, count in self.min_outliers:
            if not (isinstance(count, int) and count >= 1):
                raise UserError(f"--min-outliers {pattern}={count}: the count must be a positive integer")
            if self.outliers == 0 or not self.defaults.outlier_branch:
                raise UserError(f"--min-outliers {pattern}={count} asks for outlier channels, and this recipe "
                                f"({self.name}, --outliers {self.outliers}) has no outlier branch")
        for pattern, value in self.overrides:
            precision, block = split_precision(value)
            if precision not in PRECISIONS or (block is not None and (precision != "int4" or block not in BLOCKS)):
                raise UserError(f"override {pattern}={value}: precision must be one of {', '.join(PRECISIONS)}, or "
                                f"int4:B for INT4 blocks of B rows (B one of {', '.join(map(str, BLOCKS))})")

    @property
    def defaults(self) -> RecipeDefaults:
        return RECIPES[self.name]

    @property
    def int4_layers(self) -> bool:
        """Whether the recipe can give any layer blocked INT4 weights (w4a16, or an int4 override)."""
        return self.name == "w4a16" or any(split_precision(value)[0] == "int4" for _, value in self.overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"overrides": [list(item) for item in self.overrides],
                                           "min_outliers": [list(item) for item in self.min_outliers]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Recipe":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in fields}
        values["overrides"] = tuple(tuple(item) for item in values.get("overrides", ()))
        values["outlier_layers"] = tuple(values.get("outlier_layers", ()))
        values["rotate"] = tuple(values.get("rotate", ()))
        values["min_outliers"] = tuple((pattern, int(count)) for pattern, count in values.get("min_outliers", ()))
        return cls(**values)


# ``--outlier-layers residual``: the layers that read the residual stream through a norm, where its outlier
# features enter (q/k/v and gate/up after the RMSNorms, the LM head after the final norm). The attention output
# (o_proj) and the SwiGLU product (down_proj) carry no such channels; on the sample, with GPTQ, their branches did
# not lower the KL, except where a down projection writes the attention sink (below).
RESIDUAL_READERS = ("*q_proj*", "*k_proj*", "*v_proj*", "*gate_proj*", "*up_proj*", "lm_head")
# ... plus the layers that write the attention sink's massive activations: their input at the sink token exceeds
# every other token's by this factor (on the sample, the down projections of blocks 11 and 28: 154x and 35x).
# Their sink channels join the FP16 rows: GPTQ's statistics leave the sink out, so nothing else protects them
# (without them, 64 GPTQ windows instead of 32 moved block 11's massive activation by 21% and broke the model).
SINK_RATIO = 10.0


def sink_channels(statistics: Mapping[str, np.ndarray], ratio: float = SINK_RATIO) -> list[int]:
    """Channels whose |x| at the attention-sink token exceeds ``ratio`` x the largest |x| of any other token."""
    sink = statistics.get("sink_absmax")
    if sink is None or not np.asarray(statistics["absmax"]).size:
        return []
    limit = ratio * float(np.max(statistics["absmax"]))
    return sorted(int(c) for c in np.flatnonzero(np.asarray(sink) > limit))


def split_precision(value: str) -> tuple[str, int | None]:
    """An override's precision and INT4 block size: ``int4:64`` -> ("int4", 64), ``int8`` -> ("int8", None)."""
    precision, sep, block = value.partition(":")
    if not sep:
        return precision, None
    if not block.isdigit():
        raise UserError(f"override precision {value!r}: expected int4:B with B a block size such as 64")
    return precision, int(block)


def parse_override(text: str) -> tuple[str, str]:
    """``PATTERN=PRECISION`` from the command line, e.g. ``lm_head=int8``, ``layers.0=fp16`` or
    ``lm_head=int4:64`` (INT4 with its own block size)."""
    pattern, sep, precision = text.rpartition("=")
    if not sep or not pattern:
        raise UserError(f"--override {text!r}: expected PATTERN=PRECISION, e.g. lm_head=int8")
    return pattern, precision


def parse_min_outliers(text: str) -> tuple[str, int]:
    """``PATTERN=N`` from the command line (``--min-outliers lm_head=32``)."""
    pattern, sep, count = text.rpartition("=")
    if not sep or not pattern or not count.strip().isdigit():
        raise UserError(f"--min-outliers {text!r}: expected PATTERN=N with N a positive integer, e.g. lm_head=32")
    return pattern, int(count)


def override_matches(pattern: str, node: str) -> bool:
    """A glob with ``*`` matches the whole node name; a plain word matches whole '/'-separated parts of it.

    ``lm_head`` matches ``/lm_head/MatMul``; ``layers.1`` matches ``/model/layers.1/mlp/up_proj/MatMul`` but not
    ``layers.10``; ``*down_proj*`` matches every down projection.
    """
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(node, pattern)
    return re.search(rf"(^|/){re.escape(pattern.strip('/'))}(/|$)", node) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """What the passes do to one linear layer."""

    node: str
    input: str
    weight: str
    in_features: int
    out_features: int
    precision: str  # one of PRECISIONS
    block_size: int | None  # int4: rows per scale block; None: one scale per output channel
    outliers: tuple[int, ...]  # input channels computed from FP16 weight rows, excluded from the low-bit part
    activations: str | None  # "static", "dynamic" or None (not quantized)
    activation_scale: float | None  # static: the input's scale (absmax of the non-outlier channels / 127)
    activation_group: int | None = None  # dynamic: channels per scale within a token (None: the whole row)
    rotation: int | None = None  # --rotate: the low-bit part reads x R, R block-Hadamard with blocks of this size

    @property
    def quantized(self) -> bool:
        return self.precision in ("int8", "int4")

    @property
    def excluded_rows(self) -> tuple[int, ...]:
        """The low-bit weight's rows that are not rounded (zero): the outlier channels, unless the low-bit part
        reads a rotated input, whose every row is rounded (the branch still reads the outlier channels)."""
        return () if self.rotation else self.outliers

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8, "fp16": 16}.get(self.precision, 32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"outliers": list(self.outliers)}


def layer_weights(recipe: Recipe, node: str) -> tuple[str, int | None]:
    """(precision, INT4 block size or None) from the recipe default or the last override matching ``node``; an
    INT4 override without ``:B`` takes the recipe's ``--block-size``."""
    precision, block = recipe.defaults.weights, None
    for pattern, value in recipe.overrides:
        if override_matches(pattern, node):
            precision, block = split_precision(value)
    return precision, (block or recipe.block_size) if precision == "int4" else None


def plan_layers(recipe: Recipe, layers: Sequence, profile) -> dict[str, LayerPlan]:
    """One plan per linear layer (``graph.linear.LinearLayer``), from the recipe, overrides and profile.

    Layers that share an input get the union of their outlier channels, so the input is split once and its
    quantization scale is the same for all of them.

    Raises:
        UserError: an override that matches no layer, or a layer the profile does not know.
    """
    outlier_layers = tuple(p for p in recipe.outlier_layers if not p.startswith("!"))
    excluded = tuple(p[1:] for p in recipe.outlier_layers if p.startswith("!"))  # '!PATTERN': never a branch
    sink_writers: dict[str, list[int]] = {}  # residual mode: layer -> the sink channels its FP16 rows must hold
    if "residual" in outlier_layers:
        readers = [p for p in RESIDUAL_READERS if any(override_matches(p, layer.node) for layer in layers)]
        if not readers:
            raise UserError("--outlier-layers residual: no q/k/v, gate/up or lm_head layer in this model (names look "
                            f"like {layers[0].node}); give name patterns instead")
        outlier_layers = tuple(p for p in outlier_layers if p != "residual") + tuple(readers)
        sink_writers = {layer.node: channels for layer in layers
                        if (channels := sink_channels(profile.input_statistics(layer.input)))}
        outlier_layers += tuple(sink_writers)
    for option, pattern in [("--override", p) for p, _ in recipe.overrides] + [
            ("--outlier-layers", p) for p in outlier_layers] + [("--outlier-layers !", p) for p in excluded] + [
            ("--rotate", p) for p in recipe.rotate] + [("--min-outliers", p) for p, _ in recipe.min_outliers]:
        if not any(override_matches(pattern, layer.node) for layer in layers):
            raise UserError(f"{option} {pattern!r} matches no linear layer (names look like {layers[0].node})")
    weights = {layer.node: layer_weights(recipe, layer.node) for layer in layers}  # (precision, int4 block)
    precision = {node: chosen for node, (chosen, _) in weights.items()}
    outliers: dict[str, set[int]] = {}
    wanted: dict[str, int] = {}  # input tensor -> the largest --min-outliers count among its branch readers
    topped: set[str] = set()  # layers --min-outliers applied to
    for layer in layers:
        branch = (not outlier_layers or any(override_matches(p, layer.node) for p in outlier_layers)) and \
            not any(override_matches(p, layer.node) for p in excluded)
        if precision[layer.node] in ("int8", "int4") and recipe.defaults.outlier_branch and branch:
            outliers.setdefault(layer.input, set()).update(_outlier_channels(recipe, layer, profile))
            if recipe.outliers != 0:
                outliers[layer.input].update(sink_writers.get(layer.node, ()))
            counts = [count for pattern, count in recipe.min_outliers if override_matches(pattern, layer.node)]
            if counts:
                wanted[layer.input] = max(wanted.get(layer.input, 0), *counts)
                topped.add(layer.node)
    for tensor, count in wanted.items():  # after every reader added its channels: the top-up fills only the gap
        outliers[tensor] = _topped_up(outliers[tensor], count, profile, tensor)
    for pattern, count in recipe.min_outliers:
        if not any(override_matches(pattern, node) for node in topped):
            raise UserError(f"--min-outliers {pattern}={count}: no layer it matches gets an outlier branch "
                            "(INT8/INT4 layers do, within --outlier-layers)")
    plans = {}
    for layer in layers:
        chosen = tuple(sorted(outliers.get(layer.input, ()))) if precision[layer.node] in ("int8", "int4") else ()
        quantize_input = recipe.defaults.quantize_activations and precision[layer.node] == "int8"
        scale = group = None
        if quantize_input and recipe.activations == "static":
            scale = activation_scale(profile.input_statistics(layer.input), chosen)
        if quantize_input and recipe.activations == "dynamic" and recipe.activation_group:
            group = recipe.activation_group
            if layer.in_features % group:
                usable = activation_groups(layers)
                raise UserError(f"--activation-group {group}: {layer.node} has {layer.in_features} input channels, "
                                f"not a multiple of {group}; this model takes "
                                f"{', '.join(map(str, usable)) or 'no group size'}")
        rotation = None
        if any(override_matches(p, layer.node) for p in recipe.rotate):
            rotation = rotation_block(layer, precision[layer.node], quantize_input)
        plans[layer.node] = LayerPlan(
            node=layer.node, input=layer.input, weight=layer.weight, in_features=layer.in_features,
            out_features=layer.out_features, precision=precision[layer.node],
            block_size=weights[layer.node][1], outliers=chosen,
            activations=recipe.activations if quantize_input else None, activation_scale=scale,
            activation_group=group, rotation=rotation)
    return plans


ROTATION_BLOCKS = (128, 64, 32, 16)  # Hadamard sizes --rotate picks from, largest first


def rotation_block(layer, precision: str, quantized_input: bool) -> int:
    """The Hadamard block size ``--rotate`` gives ``layer``: the largest of ROTATION_BLOCKS dividing its input
    channels.

    Raises:
        UserError: the layer is not a weight-only INT4 layer, or no block size divides its input channels.
    """
    if precision != "int4" or quantized_input:
        raise UserError(f"--rotate: {layer.node} is {precision}{' with INT8 activations' if quantized_input else ''};"
                        " only weight-only INT4 layers are rotated")
    block = next((size for size in ROTATION_BLOCKS if layer.in_features % size == 0), None)
    if block is None:
        raise UserError(f"--rotate: {layer.node} has {layer.in_features} input channels, which no Hadamard block of "
                        f"{', '.join(map(str, ROTATION_BLOCKS))} divides")
    return block


def activation_groups(layers: Sequence) -> list[int]:
    """The ``--activation-group`` sizes that divide every layer's input width, smallest first."""
    return [g for g in ACTIVATION_GROUPS if all(layer.in_features % g == 0 for layer in layers)]


def _outlier_channels(recipe: Recipe, layer, profile) -> list[int]:
    if recipe.outliers == 0:
        return []
    if recipe.outliers == "auto":
        policies = profile.manifest["layers"][0]["candidates"] if profile.manifest["layers"] else {}
        if recipe.policy is not None and recipe.policy not in policies:
            raise UserError(f"the profile has no outlier policy {recipe.policy!r}; it has {', '.join(policies)}")
        return profile.outliers(layer.node, recipe.policy)
    absmax = profile.input_statistics(layer.input)["absmax"]
    count = min(int(recipe.outliers), absmax.size)
    return sorted(int(c) for c in np.argsort(-absmax, kind="stable")[:count])


def _topped_up(chosen: set[int], count: int, profile, tensor: str) -> set[int]:
    """``chosen`` plus the channels of largest E[x^2] (calibration) until it holds ``count`` (--min-outliers)."""
    second = np.asarray(profile.input_statistics(tensor)["second_moment"], dtype=np.float64)
    if count >= second.size:
        raise UserError(f"--min-outliers {count}: {tensor} has {second.size} channels, so no row would stay low-bit")
    extra = [int(c) for c in np.argsort(-second, kind="stable") if int(c) not in chosen]
    return set(chosen) | set(extra[:max(count - len(chosen), 0)])


def activation_range(statistics: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-channel largest |x| seen in calibration, the attention-sink token included; float64."""
    return np.maximum(statistics["absmax"], statistics.get("sink_absmax", 0.0)).astype(np.float64)


def activation_scale(statistics: Mapping[str, np.ndarray], outliers: Sequence[int],
                     divisor: np.ndarray | None = None) -> float:
    """Static per-tensor INT8 scale: the largest |x| of the non-outlier channels / 127, the attention-sink token
    included (clipping the sink's huge activations is far worse than a coarse scale); with ``divisor``, of
    x / divisor (an input smoothed by SmoothQuant)."""
    magnitude = activation_range(statistics)
    if divisor is not None:
        magnitude = magnitude / np.asarray(divisor, dtype=np.float64)
    if len(outliers):
        magnitude = np.delete(magnitude, list(outliers))
    largest = float(magnitude.max()) if magnitude.size else 0.0
    return largest / 127.0 if largest > 0 else 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PassContext:
    """What every rewrite pass receives: the plans and the data some passes need.

    ``notes`` collects what passes left alone and why (logged by the pipeline, kept in the manifest);
    ``input_scales`` is filled by the AWQ and SmoothQuant passes (input tensor -> the per-channel s its readers'
    weight rows were multiplied by, x being divided by it) for the passes after them.
    """

    plans: Mapping[str, LayerPlan]
    float_dtype: np.dtype
    statistics: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    hessians: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    embeddings: str = "fp32"
    smoothing: float | None = None  # SmoothQuant's alpha, for the smooth_activations pass
    scale_search: bool = False  # INT4 block scales searched (quant.symmetric.searched_scales)
    asymmetric: bool = False  # blocked INT4 layers get zero points (quant.asymmetric)
    gptq_absorb: bool = False  # compensate_errors_gptq: the FP16 outlier rows take error updates
    bias_correction: bool = False  # correct_bias adds E[x] (W - W_quantized); GPTQ works on the covariance
    means: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # input tensor -> E[x] (calibration)
    gptq_sink_weight: float = 0.0  # compensate_errors_gptq: H + weight x the sink position's moment
    # input tensor -> (E[x0 x0^T], E[x0]) at the sink's position, for --gptq-sink-weight
    sink_moments: Mapping[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    reference_weights: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # node -> source weight
    notes: list = dataclasses.field(default_factory=list)
    input_scales: dict = dataclasses.field(default_factory=dict)
    distillation: object = None  # passes.distill_scales.DistillInputs, for quantize --distill-steps
    vocab_rows: object = None  # passes.refine_vocab_rows.VocabRows, for quantize --refine-vocab
