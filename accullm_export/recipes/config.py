"""The recipe: a tree of small frozen dataclasses, each validating itself, read from and written to TOML.

A preset (``recipes/presets/*.toml``) or a ``--config`` file resolves to one ``Recipe`` for one backend. Every
error names the key it is about (``weights.block_size``), so a config file's mistake is one clear line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any, Mapping

from accullm_export.errors import UserError
from accullm_export.graph.layer_plan import split_precision
from accullm_export.quant.scale_codes import SCALE_BITS
from accullm_export.sparsity.config import METHODS
from accullm_export.training.distill import PRECISIONS as DISTILL_PRECISIONS

RECIPE_VERSION = 1
BACKENDS = ("onnxruntime", "tensorrt")
WEIGHT_PRECISIONS = ("int4", "int8", "fp16")
LAYER_PRECISIONS = ("fp32", "fp16", "int8", "int4")  # an override's precision (fp32: left as it is)
BLOCKS = (16, 32, 64, 128, 256)  # int4 block sizes: powers of two that MatMulNBits and TensorRT take
ACTIVATION_GROUPS = (16, 32, 64, 128, 256)
POLICIES = ("profile", "threshold", "topk", "ratio", "sensitivity")  # profile: the one calibrate chose
MAX_COUNT = 1_000_000  # windows, samples, steps, channels, rows: the command line's limit (cli/arg_types.py)
MAX_RANK = 65536  # the sparsity guesser's inner width, as sparsify --predictor-rank takes it
MAX_SEED = 2**32 - 1  # what NumPy's and torch's generators take on every platform


def _fail(key: str, message: str) -> UserError:
    return UserError(f"recipe key {key}: {message}")


def shown(value) -> str:
    """``value`` as an error message shows it: its repr on one line, cut short (a file may hold huge values)."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's limit on the digits it prints
        text = f"a {type(value).__name__} too large to show"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def key_name(key) -> str:
    """A recipe key as TOML writes it: bare when it can be, quoted (control characters escaped) otherwise."""
    return key if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(str(key))[:80]


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise _fail(key, f"must be one of {', '.join(map(str, allowed))}, not {shown(value)}")


def _count(key: str, value: int, low: int, high: int = MAX_COUNT, off: str = "") -> None:
    """An integer key within [low, high]; ``off`` says what 0 means where 0 is allowed."""
    if value < low:
        raise _fail(key, f"must be {off + ' or positive' if off else f'at least {low}'}, not {shown(value)}")
    if value > high:
        raise _fail(key, f"must be at most {high:,}, not {shown(value)}")


def _override_block(pattern: str, value: str) -> None:
    """An override's ``:B`` suffix must be a block size as written in BLOCKS before ``split_precision`` reads it."""
    _, sep, block = value.partition(":")
    if sep and block not in {str(size) for size in BLOCKS}:
        raise _fail("weights.overrides", f"{shown(pattern)}={shown(value)}: expected PRECISION or int4:B, with B "
                    f"one of {', '.join(map(str, BLOCKS))}")


def _check_patterns(key: str, patterns) -> None:
    """Layer patterns must name something: an empty one (or a bare "!") would match every layer."""
    for pattern in patterns:
        if not pattern.removeprefix("!").strip("/"):
            raise _fail(key, f"{shown(pattern)}: a layer pattern must not be empty (it would match every layer)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightsConfig:
    """How linear weights are stored.

    Attributes:
        precision: int4 (blocked, weight-only), int8 (one scale per output channel) or fp16.
        block_size: rows per INT4 scale block.
        scale_search: each INT4 block's clipping level searched for the least E[x^2]-weighted rounding error.
        asymmetric: INT4 blocks as uint4 with a zero point; for TensorRT, signed INT4 plus an FP16 offset per
            block (``graph.passes.lower_zero_points``).
        scale_bits: INT4 block scales in FP16 (16) or as 8-bit codes on a shared log grid (8).
        awq: activation-aware per-channel weight scaling before rounding (int4 only).
        overrides: (layer pattern, precision) pairs; the last match wins; int4:B gives its own block size.
        embeddings: the token-embedding table: int8 per row, fp16, or fp32 (left as it is).
    """

    precision: str = "int4"
    block_size: int = 128
    scale_search: bool = False
    asymmetric: bool = False
    scale_bits: int = 16
    awq: bool = False
    overrides: tuple[tuple[str, str], ...] = ()
    embeddings: str = "int8"

    def __post_init__(self):
        _one_of("weights.precision", self.precision, WEIGHT_PRECISIONS)
        _one_of("weights.block_size", self.block_size, BLOCKS)
        _one_of("weights.scale_bits", self.scale_bits, SCALE_BITS)
        _one_of("weights.embeddings", self.embeddings, ("int8", "fp16", "fp32"))
        _check_patterns("weights.overrides", [pattern for pattern, _ in self.overrides])
        for pattern, value in self.overrides:
            _override_block(pattern, value)
            precision, block = split_precision(value)
            if precision not in LAYER_PRECISIONS or (block is not None and (precision != "int4" or block not in BLOCKS)):
                raise _fail("weights.overrides", f"{shown(pattern)}={shown(value)}: precision must be one of "
                            f"{', '.join(LAYER_PRECISIONS)}, or int4:B (B one of {', '.join(map(str, BLOCKS))})")
        if self.awq and self.precision != "int4":  # its scales would invalidate w8a8's static activation ranges
            raise _fail("weights.awq", "applies to weight-only INT4 (weights.precision = \"int4\")")
        if not self.int4_layers:
            for key in ("scale_search", "asymmetric"):
                if getattr(self, key):
                    raise _fail(f"weights.{key}", "applies to blocked INT4 layers (precision int4, or an int4 override)")
            if self.scale_bits != 16:
                raise _fail("weights.scale_bits", "8-bit codes apply to blocked INT4 layers (precision int4, or an "
                            "int4 override)")

    @property
    def int4_layers(self) -> bool:
        """Whether any layer can get blocked INT4 weights (precision int4, or an int4 override)."""
        return self.precision == "int4" or any(split_precision(v)[0] == "int4" for _, v in self.overrides)

    @property
    def low_bit_layers(self) -> bool:
        return self.precision in ("int4", "int8") or any(
            split_precision(v)[0] in ("int4", "int8") for _, v in self.overrides)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationsConfig:
    """INT8 activations of INT8 layers.

    Attributes:
        mode: none (the model's float type), static (one scale per tensor from the profile: TensorRT's Q/DQ) or
            dynamic (scales per group of a token's channels, computed at run time by ONNX Runtime's MatMulNBits).
        group: dynamic: one scale per this many input channels of a token, the weights in blocks of as many rows
            (ONNX Runtime's 8-bit MatMulNBits; "auto": 32 where every layer's width allows it, else 16, with a
            shorter last block where a width is no multiple of 16).
        smoothquant: SmoothQuant's migration strength alpha in (0, 1), folded into the producers (0: off).
    """

    mode: str = "none"
    group: int | str = "auto"
    smoothquant: float = 0.0

    def __post_init__(self):
        _one_of("activations.mode", self.mode, ("none", "static", "dynamic"))
        earlier_off = type(self.group) is int and self.group == 0 and self.mode != "dynamic"  # an older dump's "off"
        if not earlier_off:
            _one_of("activations.group", self.group, ACTIVATION_GROUPS + ("auto",))
            if self.group != "auto" and self.mode != "dynamic":
                raise _fail("activations.group", "applies to mode = \"dynamic\" (static scales are per tensor)")
        if self.smoothquant and not 0 < self.smoothquant < 1:
            raise _fail("activations.smoothquant", f"takes an alpha in (0, 1) (0: off), not {self.smoothquant}")
        if self.smoothquant and self.mode == "none":
            raise _fail("activations.smoothquant", "smooths INT8 activations: give mode static or dynamic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutliersConfig:
    """Input channels computed exactly, beside the low-bit rest of each layer.

    Attributes:
        channels: "auto" (the profile's policy), N (the N largest channels of each input) or 0 (no branch).
        policy: which of the profile's outlier policies "auto" uses ("profile": the one calibrate chose).
        layers: only layers matching one of these patterns get a branch ("residual": the residual stream's
            readers and the attention sink's writers; "!PATTERN" takes layers out); empty: every low-bit layer.
        min_channels: (pattern, N): at least N branch channels there, topped up by largest E[x^2].
        bits: the branch's weight rows in FP16 (16) or INT8 in blocks of 16 rows (8, ONNX Runtime).
        planes: fold each INT4 layer's branch into its weight as two INT4 planes (ONNX Runtime).
    """

    channels: str | int = "auto"
    policy: str = "profile"
    layers: tuple[str, ...] = ()
    min_channels: tuple[tuple[str, int], ...] = ()
    bits: int = 16
    planes: bool = False

    def __post_init__(self):
        if self.channels != "auto" and (isinstance(self.channels, bool) or not isinstance(self.channels, int)
                                         or not 0 <= self.channels <= MAX_COUNT):
            raise _fail("outliers.channels", f"must be \"auto\", 0 or a count up to {MAX_COUNT:,}, not "
                        f"{shown(self.channels)}")
        _one_of("outliers.policy", self.policy, POLICIES)
        _one_of("outliers.bits", self.bits, (16, 8))
        _check_patterns("outliers.layers", self.layers)
        _check_patterns("outliers.min_channels", [pattern for pattern, _ in self.min_channels])
        for pattern, count in self.min_channels:
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
                raise _fail("outliers.min_channels", f"{shown(pattern)}={shown(count)}: the count must be an integer "
                            f"from 1 to {MAX_COUNT:,}")

    @property
    def enabled(self) -> bool:
        return self.channels != 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """GPTQ error compensation (act-order) on calibration windows."""

    enabled: bool = False
    samples: int = 32

    def __post_init__(self):
        _count("gptq.samples", self.samples, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """INT4 block scales (and optionally norm gains and outlier rows) trained against the source model's
    next-token distributions; kept only if the held-out KL drops.

    Attributes:
        steps: training steps, one calibration window each (0: off).
        norms: train the RMSNorm gains too.
        outlier_rows: train the FP16 outlier rows too.
        lr: Adam's step on the log-scales.
        samples: calibration windows of the profile to train on (one eighth held out).
        weight_steps: at most this many steps x trained weights (0: no limit); a larger model trains fewer
            steps, none where fewer than eight would be left.
        precision: the products in training steps: "float32", "bfloat16" (the decoder layers and the LM
            head's backward; float32 parameters, sums, logits and loss, and the held-out check in float32),
            faster where the CPU or GPU multiplies bfloat16 natively, or "auto" (bfloat16 where it does,
            float32 elsewhere).
    """

    steps: int = 0
    norms: bool = False
    outlier_rows: bool = False
    lr: float = 3e-4
    samples: int = 64
    precision: str = "float32"
    weight_steps: int = 0

    def __post_init__(self):
        _count("distill.steps", self.steps, 0, off="0 (off)")
        _count("distill.weight_steps", self.weight_steps, 0, 10**18, off="0 (no limit)")
        _one_of("distill.precision", self.precision, DISTILL_PRECISIONS)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise _fail("distill.lr", f"must be positive, not {self.lr}")
        _count("distill.samples", self.samples, 1)
        for key in ("norms", "outlier_rows"):
            if getattr(self, key) and not self.steps:
                raise _fail(f"distill.{key}", "trains along with the scales: give distill.steps")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotationConfig:
    """Weight-only INT4 layers whose low-bit part reads its input block-Hadamard rotated (the branch does not)."""

    layers: tuple[str, ...] = ()

    def __post_init__(self):
        _check_patterns("rotation.layers", self.layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VocabConfig:
    """The INT4 LM head's rows of largest calibration error get a second INT4 stage.

    Attributes:
        refine_rows: how many rows (0: off; "auto": a twelfth of the vocabulary, in multiples of 64).
        samples: calibration windows the rows are ranked on.
    """

    refine_rows: str | int = 0
    samples: int = 32

    def __post_init__(self):
        if self.refine_rows != "auto" and (isinstance(self.refine_rows, bool) or not isinstance(self.refine_rows, int)
                                            or not 0 <= self.refine_rows <= MAX_COUNT):
            raise _fail("vocab.refine_rows", f"must be 0 (off), \"auto\" or a row count up to {MAX_COUNT:,}, not "
                        f"{shown(self.refine_rows)}")
        _count("vocab.samples", self.samples, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityRecipe:
    """Sparse-skip MLPs (see ``sparsify``): the fraction of neurons skipped per token and how they are chosen."""

    fraction: float = 0.0
    method: str = "threshold"
    predictor_rank: int = 64
    predictor_samples: int = 16
    predictor_steps: int = 400
    seed: int = 0
    dense_first_token: bool = True

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise _fail("sparsity.fraction", f"must be in [0, 1), not {self.fraction}")
        _one_of("sparsity.method", self.method, METHODS)
        _count("sparsity.predictor_rank", self.predictor_rank, 1, MAX_RANK)
        for key in ("predictor_samples", "predictor_steps"):
            _count(f"sparsity.{key}", getattr(self, key), 1)
        _count("sparsity.seed", self.seed, 0, MAX_SEED)

    def to_sparsity_config(self):
        """The ``sparsity.config.SparsityConfig`` the sparsify passes take."""
        from accullm_export.sparsity.config import SparsityConfig

        return SparsityConfig(sparsity=self.fraction, method=self.method, rank=self.predictor_rank,
                              samples=self.predictor_samples, steps=self.predictor_steps, seed=self.seed,
                              dense_first=self.dense_first_token)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraphConfig:
    """Graph forms: ONNX Runtime's contrib attention and residual + RMSNorm ops (the file then runs only there)."""

    onnxruntime_fusions: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """A complete, versioned recipe for one backend."""

    version: int = RECIPE_VERSION
    name: str = "custom"
    backend: str = "onnxruntime"
    weights: WeightsConfig = WeightsConfig()
    activations: ActivationsConfig = ActivationsConfig()
    outliers: OutliersConfig = OutliersConfig()
    gptq: GPTQConfig = GPTQConfig()
    distill: DistillConfig = DistillConfig()
    rotation: RotationConfig = RotationConfig()
    vocab: VocabConfig = VocabConfig()
    sparsity: SparsityRecipe = SparsityRecipe()
    graph: GraphConfig = GraphConfig()

    def __post_init__(self):
        if self.version != RECIPE_VERSION:
            raise _fail("version", f"this kit reads recipe version {RECIPE_VERSION}, not {shown(self.version)}")
        _one_of("backend", self.backend, BACKENDS)
        weights, activations, outliers = self.weights, self.activations, self.outliers
        if activations.mode != "none" and weights.precision != "int8":
            raise _fail("activations.mode", "INT8 activations need weights.precision = \"int8\"")
        if outliers.bits == 8 and not self.outlier_branch:
            raise _fail("outliers.bits", "stores the outlier branch's rows as INT8: this recipe has no branch")
        if outliers.planes and not (self.outlier_branch and weights.int4_layers):
            raise _fail("outliers.planes", "folds an outlier branch into blocked INT4 weights: this recipe has "
                        "no INT4 layer with a branch")
        if outliers.min_channels and not self.outlier_branch:
            raise _fail("outliers.min_channels", "asks for outlier channels, and this recipe has no outlier branch")
        if self.gptq.enabled and not weights.low_bit_layers:
            raise _fail("gptq.enabled", "GPTQ compensates INT8/INT4 rounding: this recipe has no such layer")
        if self.distill.steps and weights.precision != "int4":
            raise _fail("distill.steps", "trains weight-only INT4 block scales (weights.precision = \"int4\")")
        if self.distill.outlier_rows and not outliers.enabled:
            raise _fail("distill.outlier_rows", "trains the FP16 outlier rows, and outliers.channels = 0 has none")
        if self.rotation.layers and not weights.int4_layers:
            raise _fail("rotation.layers", "applies to blocked INT4 layers (precision int4, or an int4 override)")
        if self.vocab.refine_rows and not weights.int4_layers:
            raise _fail("vocab.refine_rows", "refines an INT4 LM head (precision int4, or an int4 override)")
        if self.sparsity.fraction and activations.mode == "dynamic":
            raise _fail("sparsity.fraction", "composes with weight-only and static INT8 recipes; dynamic INT8 "
                        "(MatMulNBits over the whole width) is not narrowed")
        if self.backend == "tensorrt":
            self._check_tensorrt()

    def _check_tensorrt(self) -> None:
        """What TensorRT's ONNX parser and our plugins cannot take."""
        refusals = {
            "outliers.planes": (self.outliers.planes, "the planes need ONNX Runtime's MatMulNBits; TensorRT keeps "
                                "the FP16 branch for its OutlierSplitGemm plugin"),
            "outliers.bits": (self.outliers.bits == 8, "TensorRT's OutlierSplitGemm plugin takes FP16 rows only"),
            "activations.mode": (self.activations.mode == "dynamic", "TensorRT takes static Q/DQ scales; give "
                                 "mode = \"static\" (the w8a8-static preset)"),
            "graph.onnxruntime_fusions": (self.graph.onnxruntime_fusions, "ONNX Runtime's contrib ops do not parse "
                                          "in TensorRT"),
            "sparsity.dense_first_token": (bool(self.sparsity.fraction) and self.sparsity.dense_first_token,
                                           "the SparseSkipMLP plugin picks each token's neurons by its score alone, "
                                           "with no position input; give dense_first_token = false"),
        }
        for key, (refused, why) in refusals.items():
            if refused:
                raise _fail(key, f"cannot run on the tensorrt backend: {why}")

    @property
    def scheme(self) -> str:
        """w4a16, w8a8, w8a16 or fp16: what the default layer stores and computes in."""
        if self.weights.precision == "int4":
            return "w4a16"
        if self.weights.precision == "int8":
            return "w8a8" if self.activations.mode != "none" else "w8a16"
        return "fp16"

    @property
    def outlier_branch(self) -> bool:
        """Whether low-bit layers get an outlier branch (the fp16 scheme keeps none, even for overrides)."""
        return self.outliers.enabled and self.weights.precision in ("int4", "int8")

    @property
    def quantize_activations(self) -> bool:
        return self.activations.mode != "none"

    def to_dict(self) -> dict:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Recipe":
        """A recipe from nested plain data (a parsed TOML file); unknown keys and wrong types raise UserError."""
        return _from_plain(cls, data, "")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(item) for item in value]
    return value


def _from_plain(cls, data, prefix: str):
    if not isinstance(data, Mapping):
        raise _fail(prefix.rstrip(".") or "(top level)", f"must be a table, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise _fail(f"{prefix}{key_name(unknown[0])}", f"unknown key; {prefix.rstrip('.') or 'the recipe'} takes "
                    f"{', '.join(sorted(fields))}")
    values = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def _coerce(hint, value, key: str):
    """``value`` checked against the field's annotation (bool is not an int; an int is a float)."""
    if dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(key, f"must be a list, not {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], item, key) for item in value)
        if len(value) != len(args):
            raise _fail(key, f"each entry must be a list of {len(args)} items, not {shown(value)}")
        return tuple(_coerce(arg, item, key) for arg, item in zip(args, value))
    if args:  # a union such as str | int
        for arg in args:
            try:
                return _coerce(arg, value, key)
            except UserError:
                continue
        raise _fail(key, f"must be {' or '.join(a.__name__ for a in args)}, not {shown(value)}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**64:  # float() of a longer integer overflows, or rounds it to a value it never had
            raise _fail(key, f"must be a finite number, not {shown(value)}")
        value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise _fail(key, f"must be a finite number, not {value}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise _fail(key, f"must be {hint.__name__}, not {type(value).__name__} ({shown(value)})")
    return value
