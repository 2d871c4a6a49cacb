"""Distil the INT4 block scales: fit a quantized LLM's block scales to the full-precision model's next-token
distributions on calibration text, by gradient descent on KL(teacher || student).

The integers stay as rounding (and GPTQ) left them and only the scales move (optionally the norm gains and the
exact outlier rows too), so the stored layout, the file size and the decode speed do not change. This is the end-to-end training of quantization parameters of PEQA (Kim et
al., 2023) and EfficientQAT's E2E-QP (Chen et al., 2024), here on the few thousand calibration tokens the
profile names: one scale per block of 64 or 128 weights is about 1% of the parameters, and a layer-by-layer
objective (GPTQ's) cannot see how errors compound through the residual stream and the LM head; the KL does.

Both models are torch replicas built with transformers from the export folder's ``config.json`` and the ONNX
graph's constants (``graph_weights``): the teacher from the model before any pass (run once over the windows: its
final hidden states and its head are all the loss reads), the student from the graph being rewritten, each low-bit layer replaced by ``BlockScaledLinear``: W = values * scales (blocked along the
input rows) + the FP16 outlier rows, exactly what DequantizeLinear and the outlier branch compute. Scales are
trained as s0 * exp(theta) (Adam on theta: every scale moves by a relative step, whatever its layer's range),
and written back rounded to FP16 as the graph stores them. Where transformers fuses layers the export splits
(Phi-3's qkv_proj and gate_up_proj), the replica holds the parts under the export's names and concatenates their
outputs in the fused module's place, so every architecture's layers are named as the graph names them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
import weakref
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from accullm_export.errors import BackendError, UserError, require
from accullm_export.resources import reused_allocations

log = logging.getLogger(__name__)

# the FP16 outlier rows' Adam step relative to the scales': theirs is an absolute step on the weights, the
# scales' a relative one, so the same rate would move the rows far too fast
OUTLIER_ROWS_LR_FACTOR = 0.1


PRECISIONS = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How long and how fast the scales are trained."""

    steps: int = 0  # optimizer steps (0: off)
    learning_rate: float = 1e-3  # Adam's step on log-scales (a relative change of about 0.1% per step)
    batch_windows: int = 1  # calibration windows per step
    seed: int = 0
    norms: bool = False  # also train the RMSNorm gains (stored in float, so free at inference)
    outlier_rows: bool = False  # also train the FP16 outlier rows (stored in FP16, so free at inference)
    device: str = "cpu"  # torch device of the teacher, the student and the windows: "cpu" or "cuda"
    # recompute each decoder layer's activations in the backward pass instead of keeping them from the forward
    # (the same gradients, a layer's forward more per step); None: when a step's would pass ACTIVATION_BUDGET_BYTES
    recompute: bool | None = None
    # the products in the training steps: "bfloat16" multiplies the decoder layers and the LM head's backward in
    # bfloat16 (float32 sums, parameters, logits and loss), faster where the hardware multiplies bfloat16
    # natively; "auto": bfloat16 where the device does (native_bfloat16), float32 elsewhere
    precision: str = "float32"
    # at most this many steps x trained weights (0: no limit): a larger model trains fewer steps, so the
    # distillation's time grows no faster than the model's size (steps_for)
    weight_steps: int = 0

    def __post_init__(self):
        if self.weight_steps < 0:
            raise UserError(f"distill.weight_steps must be 0 (no limit) or positive, not {self.weight_steps}")
        if self.precision not in PRECISIONS:
            raise UserError(f"the distillation precision must be one of {', '.join(PRECISIONS)}, not "
                            f"{self.precision!r}")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"the distillation device must be cpu or cuda, not {self.device!r}")
        if self.steps < 0:
            raise UserError(f"distill.steps must be 0 (off) or positive, not {self.steps}")
        if not self.learning_rate > 0:
            raise UserError(f"distill.lr must be positive, not {self.learning_rate}")
        if self.batch_windows < 1:
            raise UserError(f"the distillation batch must hold at least one window, not {self.batch_windows}")

    @property
    def active(self) -> bool:
        return self.steps > 0

    def steps_for(self, weights: int) -> int:
        """The steps to train ``weights`` weights: ``steps``, fewer where ``weight_steps`` allows fewer, and 0
        where it allows fewer than ``MIN_BUDGETED_STEPS`` (too few to move the scales)."""
        if not self.weight_steps or weights <= 0:
            return self.steps
        allowed = self.weight_steps // weights
        return min(self.steps, allowed) if allowed >= MIN_BUDGETED_STEPS else 0


# the fewest steps a weight_steps budget trains; below it the distillation is skipped
MIN_BUDGETED_STEPS = 8


@dataclasses.dataclass
class DistillResult:
    """What training returns: only what it kept (nothing trained when the held-out KL did not drop)."""

    scales: dict[str, np.ndarray]  # module -> scales [blocks, out] float32 (the initial ones if not kept)
    gains: dict[str, np.ndarray]  # norm parameter name -> gain (with ``norms``)
    outlier_rows: dict[str, np.ndarray]  # module -> FP16 branch rows [outliers, out] float32 (with ``outlier_rows``)
    report: dict


@dataclasses.dataclass
class BlockScaled:
    """One low-bit layer as the graph stores it (MatMul layout, [in, out])."""

    module: str  # the transformers module path, e.g. model.layers.3.mlp.down_proj
    values: np.ndarray  # integers [in, out]; zero on the outlier rows
    scales: np.ndarray  # [blocks, out]
    block_size: int
    outliers: tuple[int, ...] = ()
    outlier_rows: np.ndarray | None = None  # [len(outliers), out], the FP16 branch's weight
    rotation: np.ndarray | None = None  # rotation.layers: the integers multiply x @ rotation [in, in]; all rows low-bit


def module_of(node_name: str) -> str:
    """'/model/layers.3/mlp/down_proj/MatMul' -> 'model.layers.3.mlp.down_proj' (the exporter's naming)."""
    path = node_name.strip("/").split("/")
    if len(path) < 2 or path[-1] != "MatMul":
        raise UserError(f"{node_name!r} is not named like an exported linear layer ('/<module path>/MatMul')")
    return ".".join(path[:-1])


# transformers' Gemma norms multiply by (1 + weight); the export stores that sum as the gain
NORM_GAIN_OFFSETS = {"gemma2": 1.0, "gemma3_text": 1.0}
# model_type -> {fused module: its parts}: transformers' module stacks along its outputs, in this order, what the
# export writes as separate layers named after the parts (siblings of the fused module)
FUSED_PROJECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
}


def _is_norm_gain(name: str) -> bool:
    return name.endswith("norm.weight")


def export_config(config_dir: str | Path):
    """transformers' config of the export folder ``config_dir`` (its config.json).

    Raises:
        UserError: there is no config.json transformers can read there.
    """
    transformers = require("transformers", "export")
    try:
        return transformers.AutoConfig.from_pretrained(str(config_dir))
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_dir} has no usable config.json for a torch replica ({exc}); distillation "
                        "needs an exported LLM folder") from exc


def build_replica(config_dir: str | Path, weights: Mapping[str, np.ndarray], *, share_memory: bool = False,
                  copied: Callable[[str], bool] = lambda name: False):
    """A float32 transformers causal LM with ``weights`` (transformers parameter name -> array) loaded.

    The LM head gets its own parameter even when the checkpoint ties it to the embedding table: the graph
    quantizes the head and keeps the table, so the two differ. A module that fuses layers the export splits
    (``FUSED_PROJECTIONS``) runs as those layers (``split_fused_projections``). The modules are made without
    memory (accelerate's ``init_empty_weights``) and take the arrays of ``weights``: with ``share_memory`` the
    float32 arrays themselves, a graph's [in, out] weight as its transposed view, except the parameters ``copied``
    names (those a training step writes into); without it, C-ordered copies of all.

    Raises:
        UserError: the config is not a causal LM transformers knows, or a parameter is missing from ``weights``
            or has another shape (for split layers: the parts do not add up to the fused module).
    """
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    config = export_config(config_dir)
    config.tie_word_embeddings = False
    from accelerate import init_empty_weights  # parameters on the meta device, buffers (rotary tables) real

    with torch.random.fork_rng(devices=[]), init_empty_weights():
        try:  # soft-capped attention (Gemma 2) has no SDPA form in transformers
            implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
        except ValueError as exc:
            raise UserError(f"transformers cannot build {config.model_type!r} as a causal LM: {exc}") from exc
    offset = NORM_GAIN_OFFSETS.get(config.model_type, 0.0)
    if offset:  # the export stores the gain the norm multiplies by; transformers adds the offset itself
        weights = {name: np.asarray(value, dtype=np.float32) - offset if _is_norm_gain(name) else value
                   for name, value in weights.items()}
    split_fused_projections(model, FUSED_PROJECTIONS.get(config.model_type, {}), weights)
    state = model.state_dict()
    _require_weights(state, weights)
    loaded = {}
    for name, tensor in state.items():
        value = np.asarray(weights[name], dtype=np.float32)
        if value.shape != tuple(tensor.shape):
            raise UserError(f"{name}: the graph holds shape {value.shape}, the architecture needs "
                            f"{tuple(tensor.shape)}")
        shared = share_memory and not copied(name)
        loaded[name] = torch.from_numpy(value if shared else np.array(value, order="C"))  # strides kept
    model.load_state_dict(loaded, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


def _require_weights(names, weights: Mapping[str, np.ndarray]) -> None:
    missing = [name for name in names if name not in weights]
    if missing:
        raise UserError(f"the graph has no weight for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: "
                        "it is not laid out as accullm-export exports this architecture")


def split_fused_projections(model, fused: Mapping[str, Sequence[str]], weights: Mapping[str, np.ndarray]) -> None:
    """Give ``model`` the export's layers where its modules fuse them: each module named in ``fused`` (module
    name -> its parts, in the order its output stacks them) becomes a ``ConcatenatedParts`` over new linear
    layers named after the parts, siblings of it in the same parent and shaped as ``weights`` holds them, so
    their parameters carry the graph's names. The parts are left uninitialized (``weights`` fills them).

    Raises:
        UserError: a part's weight is missing from ``weights``, or the parts do not add up to the fused module.
    """
    torch = require("torch", "export")
    concatenated_parts = _concatenated_parts_class()
    for path, module in list(model.named_modules()):
        parent_path, _, leaf = path.rpartition(".")
        if leaf not in fused:
            continue
        parent = model.get_submodule(parent_path)
        prefix = f"{parent_path}." if parent_path else ""
        _require_weights([f"{prefix}{part}.weight" for part in fused[leaf]], weights)
        shapes = [np.shape(weights[f"{prefix}{part}.weight"]) for part in fused[leaf]]
        if any(len(shape) != 2 or shape[1] != module.in_features for shape in shapes) \
                or sum(shape[0] for shape in shapes) != module.out_features:
            raise UserError(f"{path}: the graph's {', '.join(fused[leaf])} hold shapes {shapes}, the architecture "
                            f"stacks [{module.out_features}, {module.in_features}] along the first axis")
        for part, (outputs, inputs) in zip(fused[leaf], shapes):
            setattr(parent, part, torch.nn.utils.skip_init(torch.nn.Linear, inputs, outputs,
                                                           bias=module.bias is not None, dtype=module.weight.dtype))
        setattr(parent, leaf, concatenated_parts(parent, fused[leaf]))


def _concatenated_parts_class():
    """``ConcatenatedParts`` (defined lazily: torch is an optional dependency)."""
    torch = require("torch", "export")

    class ConcatenatedParts(torch.nn.Module):
        """A fused projection run as its parts: the parent's modules ``parts``, outputs concatenated in order.

        The parts stay the parent's children (their parameters keep the graph's names) and are looked up on each
        call, so a part swapped for a ``BlockScaledLinear`` is the one that runs; the parent is held by weak
        reference, as a child it would make the module tree a cycle."""

        def __init__(self, parent, parts: Sequence[str]):
            super().__init__()
            self.parent = weakref.ref(parent)
            self.parts = tuple(parts)

        def forward(self, x):
            parent = self.parent()
            return torch.cat([getattr(parent, part)(x) for part in self.parts], dim=-1)

        def extra_repr(self) -> str:
            return ", ".join(self.parts)

    return ConcatenatedParts


def block_scaled_linear_class():
    """``BlockScaledLinear`` (defined lazily: torch is an optional dependency)."""
    torch = require("torch", "export")
    product = _scaled_integer_product(torch)

    class BlockScaledLinear(torch.nn.Module):
        """y = x @ (integers * expand(s0 * exp(theta))) + x[..., O] @ outlier rows + bias, theta trainable.

        Only what a forward reads is kept: the integers as int8 (exact in float32 products) and the outlier
        rows as [outliers, out], trainable with ``outlier_rows``; a layer without outliers adds no branch. The
        integers are zero on the outlier rows, so the branch adds exactly those rows' part of the product."""

        def __init__(self, layer: BlockScaled, bias, outlier_rows: bool = False):
            super().__init__()
            self.register_buffer("values", torch.from_numpy(np.ascontiguousarray(layer.values, dtype=np.int8)))
            self.register_buffer("initial", torch.from_numpy(layer.scales.astype(np.float32)))
            self.block_size = layer.block_size
            self.register_buffer("outlier_index", torch.tensor(list(layer.outliers), dtype=torch.int64))
            kept = np.zeros((len(layer.outliers), layer.values.shape[1]), dtype=np.float32)
            if layer.outliers:
                kept[:] = layer.outlier_rows
            kept = torch.from_numpy(kept)
            self.outlier_rows = torch.nn.Parameter(kept, requires_grad=False) if outlier_rows and layer.outliers \
                else torch.nn.Buffer(kept)
            self.rotation = None if layer.rotation is None else torch.nn.Buffer(
                torch.from_numpy(np.asarray(layer.rotation, dtype=np.float32)))
            self.theta = torch.nn.Parameter(torch.zeros_like(self.initial))
            self.bias = bias
            self.dtype = None  # the forward product's dtype (None: the input's): ``products_in``
            self.grad_dtype = None  # the backward products' dtype (None: the gradient's)

        def scales(self):
            return self.initial * torch.exp(self.theta)

        def forward(self, x):
            return self.with_weight(x, None)

        def with_weight(self, x, weight, scales=None, grad_weight=None):
            """The forward with the low-bit part's float weight given (built from ``scales``, a leaf standing in
            for ``self.scales()`` that gathers their gradient, and ``grad_weight``, that weight in
            ``grad_dtype``: ``_head_weight``), or rebuilt inside the product (None)."""
            main = x if self.rotation is None else x @ self.rotation
            out = product(main, self.values, self.scales() if scales is None else scales, self.block_size, weight,
                          self.dtype, self.grad_dtype, grad_weight)
            if len(self.outlier_index):
                out = out + x.index_select(-1, self.outlier_index) @ self.outlier_rows
            return out if self.bias is None else out + self.bias

    return BlockScaledLinear


# output columns whose block scales' gradient is made at a time: the LM head's [in, vocabulary] gradient is never
# held whole
GRADIENT_COLUMNS = 8192


def _scaled_integer_product(torch):
    """x @ (integers * block scales), given the float weight already built from them (the LM head's, once for
    every logit chunk of a step) or rebuilding it, and again in the backward instead of keeping it: autograd
    would otherwise hold every layer's float32 weight from the forward to the backward. The scales' gradient is
    made ``GRADIENT_COLUMNS`` output columns at a time. With a ``dtype`` (bfloat16) the forward product
    multiplies in it, with a ``grad_dtype`` the backward's two (given their weight there as ``grad_weight``, or
    converting ``weight``); results and the block sums of the scales' gradient come back in the input's dtype."""

    class ScaledIntegerProduct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, values, scales, block, weight=None, dtype=None, grad_dtype=None, grad_weight=None):
            ctx.save_for_backward(x, values, scales, weight if grad_weight is None else grad_weight)
            ctx.block, ctx.dtype = block, grad_dtype
            return (_low(x, dtype) @ _weight(values, scales, block, weight, dtype)).to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            x, values, scales, weight = ctx.saved_tensors
            grad_x = grad_scales = None
            dtype = ctx.dtype
            if ctx.needs_input_grad[0]:
                grad_x = (_low(grad, dtype) @ _weight(values, scales, ctx.block, weight, dtype).T).to(grad.dtype)
            if ctx.needs_input_grad[2]:
                rows = _low(x.reshape(-1, x.shape[-1]).T, dtype)
                flat = _low(grad.reshape(-1, grad.shape[-1]), dtype)
                grad_scales = torch.empty_like(scales)
                for start in range(0, values.shape[1], GRADIENT_COLUMNS):
                    part = slice(start, start + GRADIENT_COLUMNS)
                    grad_scales[:, part] = _block_sums((rows @ flat[:, part]).mul_(values[:, part]), ctx.block,
                                                       scales.shape[0], scales.dtype)
            return grad_x, None, grad_scales, None, None, None, None, None

    return ScaledIntegerProduct.apply


def _low(tensor, dtype):
    """``tensor`` in the products' ``dtype`` (None: as it is)."""
    return tensor if dtype is None else tensor.to(dtype)


def _weight(values, scales, block: int, weight, dtype):
    """The float weight a product multiplies by: ``weight`` when given, else the integers times their block
    scales, made in ``dtype`` (the integers are exact in bfloat16, the scales round once)."""
    if weight is not None:
        return _low(weight, dtype)
    return _block_product(_low(values, dtype), _low(scales, dtype), block)


def _block_product(values, scales, block: int):
    """integers [in, out] times each input row's block scale (scales [blocks, out], the last block possibly
    short): by broadcasting over [blocks, block, out] where the blocks are whole, no index of rows made."""
    import torch

    rows, columns = values.shape
    if rows % block == 0:
        return (values.view(rows // block, block, columns) * scales.unsqueeze(1)).view(rows, columns)
    return values * scales[torch.arange(rows, device=values.device) // block]


def _block_sums(products, block: int, blocks: int, dtype=None):
    """The sums of ``products`` [in, out] over each block of input rows, accumulated and returned in ``dtype``
    (None: the products'): [blocks, out]."""
    import torch

    rows, columns = products.shape
    if rows % block == 0:
        return products.view(blocks, block, columns).sum(1, dtype=dtype)
    index = torch.arange(rows, device=products.device) // block
    return torch.zeros((blocks, columns), dtype=dtype or products.dtype,
                       device=products.device).index_add_(0, index, products.to(dtype or products.dtype))


def _set_module(model, path: str, module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def student_replica(config_dir: str | Path, weights: Mapping[str, np.ndarray], layers: Sequence[BlockScaled],
                    outlier_rows: bool = False):
    """The quantized model as torch: ``weights`` loaded, then each of ``layers`` swapped for a
    ``BlockScaledLinear`` (a bias the module had stays). ``weights`` need not hold the layers' own weights: the
    modules are built on untouched zero pages (no memory) and swapped out at once. Returns (model, module path ->
    BlockScaledLinear)."""
    placeholders = {f"{layer.module}.weight": np.zeros(layer.values.shape[::-1], dtype=np.float32)
                    for layer in layers if f"{layer.module}.weight" not in weights}
    student = build_replica(config_dir, {**weights, **placeholders}, share_memory=True,
                            copied=_is_norm_gain)  # the gains train
    del placeholders
    linear_class = block_scaled_linear_class()
    by_module = {}
    for layer in layers:
        original = student.get_submodule(layer.module)
        bias = original.bias if getattr(original, "bias", None) is not None else None
        by_module[layer.module] = linear_class(layer, bias, outlier_rows)
        _set_module(student, layer.module, by_module[layer.module])
    return student, by_module


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What the loss reads of the full-precision model: its final hidden states on every window (after the final
    norm) and its head. Made once, before the low-bit layers replace the source weights, so training holds no
    float copy of the decoder layers and runs no teacher forward."""

    hidden: object  # torch float32 [windows, seq_len, hidden_size]
    head: object  # torch float32 [vocabulary, hidden_size] (the source array itself)
    softcap: float | None = None  # Gemma 2's final logit soft cap

    def logits(self, hidden):
        import torch

        return _soft_capped(torch.nn.functional.linear(hidden, self.head), self.softcap)


def teacher_outputs(config_dir: str | Path, weights: Mapping[str, np.ndarray], windows: np.ndarray,
                    device: str = "cpu") -> Teacher:
    """Run the full-precision model (``weights`` by transformers name, shared, not copied) over ``windows``
    (int64 [n, seq_len]) once, a window at a time, and keep what ``distill_scales`` needs of it."""
    torch = require("torch", "export")
    _check_windows(windows)
    device = torch_device(device)
    model = build_replica(config_dir, weights, share_memory=True).to(device)
    tokens = torch.from_numpy(np.asarray(windows, dtype=np.int64)).to(device)
    with torch.no_grad():
        hidden = torch.cat([_decoder(model)(window, use_cache=False).last_hidden_state for window in tokens.split(1)])
    return Teacher(hidden=hidden, head=model.lm_head.weight.detach(),
                   softcap=getattr(model.config, "final_logit_softcapping", None))


def teacher_from_hidden(config_dir: str | Path, hidden: np.ndarray, head: np.ndarray, device: str = "cpu") -> Teacher:
    """The teacher from the full-precision model's final hidden states already computed (its LM head's input on
    the windows, [n, seq_len, hidden_size]) and its head's weight ([vocabulary, hidden_size], shared, not
    copied); the soft cap is read from the export folder's config.json."""
    torch = require("torch", "export")
    config = export_config(config_dir)
    device = torch_device(device)
    return Teacher(hidden=torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32)).to(device),
                   head=torch.from_numpy(np.asarray(head, dtype=np.float32)).to(device),
                   softcap=getattr(config, "final_logit_softcapping", None))


def distill_scales(config_dir: str | Path, teacher: Teacher, student_weights: Mapping[str, np.ndarray],
                   layers: Sequence[BlockScaled], windows: np.ndarray, config: DistillConfig) -> DistillResult:
    """Train the block scales of ``layers`` (with ``config.norms`` the RMSNorm gains, with ``config.outlier_rows``
    the FP16 outlier rows) on ``windows``.

    Args:
        config_dir: the export folder (its config.json).
        teacher: the full-precision model's outputs on ``windows`` (``teacher_outputs``).
        student_weights: the quantized model's float parameters by name (norms, embedding; the low-bit layers'
            come from ``layers``).
        layers: the low-bit layers whose scales train.
        windows: int64 token ids [n, seq_len], the calibration text.
        config: steps, learning rate, batch.

    Returns:
        The trained values; nothing trained (the initial scales, no gains or rows) when the held-out
        KL did not drop.
    """
    torch = require("torch", "export")
    _check_windows(windows)
    if tuple(teacher.hidden.shape[:2]) != windows.shape:
        raise UserError(f"the teacher's outputs cover windows {tuple(teacher.hidden.shape[:2])}, the distillation "
                        f"windows are {windows.shape}")
    if not layers:
        raise UserError("distillation found no INT4 block-scaled layer to train")
    weights = sum(int(layer.values.size) for layer in layers)
    steps = config.steps_for(weights)
    if not steps:
        reason = (f"distill.weight_steps {config.weight_steps:,} allows {config.weight_steps // weights} steps of "
                  f"{weights:,} trained weights, fewer than {MIN_BUDGETED_STEPS}")
        log.info("distillation skipped: %s", reason)
        return DistillResult({layer.module: np.asarray(layer.scales, dtype=np.float32) for layer in layers}, {}, {},
                             {"steps": 0, "skipped": reason, "kept": False, "layers": len(layers)})
    asked = config.steps
    if steps < config.steps:
        log.info("distillation: %d steps (distill.weight_steps %s over %s trained weights)", steps,
                 f"{config.weight_steps:,}", f"{weights:,}")
        config = dataclasses.replace(config, steps=steps)
    started = time.perf_counter()
    device = torch_device(config.device)
    student, by_module = student_replica(config_dir, student_weights, layers, config.outlier_rows)
    student.to(device)
    kept_bytes = activation_bytes(student.config, windows.shape[1] * config.batch_windows)
    recompute = kept_bytes > ACTIVATION_BUDGET_BYTES if config.recompute is None else config.recompute
    if recompute:
        recompute_layers(student)
        log.info("distillation: each decoder layer's activations are recomputed in the backward pass (a step "
                 "would keep about %.1f GB of them)", kept_bytes / 1e9)
    precision = resolved_precision(config.precision, device)
    optimizer, norms = training_optimizer(student, by_module, config)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    held = held_out_count(len(windows))
    train = windows[:len(windows) - held] if held else windows
    tokens = torch.from_numpy(np.asarray(windows, dtype=np.int64)).to(device)
    checked = range(len(windows) - held, len(windows))
    with reused_allocations():  # every step frees and makes the same tensors
        before = mean_kl(teacher, student, tokens, checked) if held else None
        order = np.random.default_rng(config.seed).permutation
        batch_order = np.empty(0, dtype=np.int64)
        training = time.perf_counter()
        for step in range(config.steps):
            if batch_order.size < config.batch_windows:
                batch_order = np.concatenate([batch_order, order(len(train))])
            chosen, batch_order = batch_order[:config.batch_windows], batch_order[config.batch_windows:]
            optimizer.zero_grad(set_to_none=True)
            with products_in(student, by_module, precision):
                loss = kl_step(teacher, student, tokens, chosen)
            optimizer.step()
            schedule.step()
            if step % 10 == 0 or step == config.steps - 1:
                pace = (time.perf_counter() - training) / (step + 1)
                log.info("distill step %d/%d: KL %.4f (%.1f s a step, about %.0f min left)", step + 1, config.steps,
                         loss, pace, pace * (config.steps - step - 1) / 60)
        after = mean_kl(teacher, student, tokens, checked) if held else None
    kept = not held or after < before
    with torch.no_grad():
        scales = {module: (layer.scales() if kept else layer.initial).cpu().numpy().astype(np.float32)
                  for module, layer in by_module.items()}
        gains = {name: parameter.detach().cpu().numpy().astype(np.float32) for name, parameter in norms.items()} \
            if kept else {}
        trained_rows = {module: layer.outlier_rows.detach().cpu().numpy().copy()
                        for module, layer in by_module.items()
                        if kept and isinstance(layer.outlier_rows, torch.nn.Parameter)}
    report = {"steps": config.steps, "steps_asked": asked, "trained_weights": weights, "windows": int(len(train)), "held_out_windows": held,
              "held_out_kl_before": None if before is None else round(before, 5),
              "held_out_kl_after": None if after is None else round(after, 5), "kept": kept,
              "layers": len(by_module), "norms": len(gains), "outlier_rows": sum(len(r) for r in trained_rows.values()),
              "recomputed": recompute, "precision": precision,
              "seconds": round(time.perf_counter() - started, 1)}
    log.info("distilled %d layers' scales in %.0f s: held-out KL %s -> %s%s", len(by_module), report["seconds"],
             report["held_out_kl_before"], report["held_out_kl_after"],
             "" if kept else " (no better: the original scales are kept)")
    return DistillResult(scales, gains, trained_rows, report)


def resolved_precision(precision: str, device) -> str:
    """``precision`` with "auto" resolved for the torch ``device``: bfloat16 where it multiplies bfloat16
    natively (``native_bfloat16``), float32 elsewhere (emulated bfloat16 products are slower than float32's)."""
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16(device) else "float32"


def native_bfloat16(device) -> bool:
    """Whether the torch ``device`` multiplies bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX tiles (torch's own CPU capability checks)."""
    torch = require("torch", "export")
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


@contextlib.contextmanager
def products_in(student, by_module: Mapping[str, object], precision: str):
    """Within the block, the layers of ``by_module`` multiply in ``precision`` ("float32": as they are; "auto"
    resolved for the layers' device), except the LM head's forward: its logits' log-softmax over the vocabulary
    is the loss, so it stays float32 (its two backward products do not)."""
    torch = require("torch", "export")
    if precision == "auto":
        precision = resolved_precision(precision, next(iter(by_module.values())).values.device)
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[precision]
    layers = list(by_module.values())
    for layer in layers:
        layer.dtype = None if layer is student.lm_head else dtype
        layer.grad_dtype = dtype
    try:
        yield
    finally:
        for layer in layers:
            layer.dtype = layer.grad_dtype = None


# a step's activations kept for the backward pass above which each decoder layer's are recomputed instead
ACTIVATION_BUDGET_BYTES = 1 << 30


def activation_bytes(config, tokens: int) -> int:
    """About what one step's forward keeps for the backward pass over ``tokens`` positions of a decoder with
    transformers ``config``: per layer and position, float32 tensors of 8 x the hidden size (norms, attention)
    and 4 x the MLP's (its projections, activation and product)."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    return layers * tokens * (8 * hidden + 4 * intermediate) * 4


def recompute_layers(model) -> None:
    """Have each decoder layer of ``model`` keep only its inputs for the backward pass and run its forward again
    there (torch's non-reentrant checkpoint): a step holds one layer's activations at a time, for a layer's
    forward more of work, with the same gradients. Without gradients (evaluation) the layers run as they are."""
    torch = require("torch", "export")
    from torch.utils.checkpoint import checkpoint

    def recomputed(forward, *args, **kwargs):
        forward = forward()  # the layer's own forward: held weakly, so the layer is not in a reference cycle with
        if not torch.is_grad_enabled():  # its wrapper and is freed with the model, not by the cycle collector
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for layer in _decoder(model).layers:
        layer.forward = functools.partial(recomputed, weakref.WeakMethod(layer.forward))


def training_optimizer(student, by_module: Mapping[str, object], config: DistillConfig):
    """Adam over what ``config`` trains of ``student`` (``student_replica``'s pair), made trainable here: the
    log-scales of every layer in ``by_module`` at the full rate, the FP16 outlier rows where they are parameters,
    the RMSNorm gains with ``config.norms``. Returns the optimizer and the gains by parameter name."""
    torch = require("torch", "export")
    parameters = [module.theta for module in by_module.values()]
    norms = {name: parameter for name, parameter in student.named_parameters()
             if config.norms and name.endswith("norm.weight")}
    rows = [module.outlier_rows for module in by_module.values()
            if isinstance(module.outlier_rows, torch.nn.Parameter)]
    for parameter in [*parameters, *norms.values(), *rows]:
        parameter.requires_grad_(True)
    groups = [{"params": parameters}]
    if rows:  # an absolute step on FP16 weights: Adam's relative step on the log-scales times a typical entry
        groups.append({"params": rows, "lr": config.learning_rate * OUTLIER_ROWS_LR_FACTOR})
    if norms:
        groups.append({"params": list(norms.values()), "lr": config.learning_rate * 0.5})
    return torch.optim.Adam(groups, lr=config.learning_rate), norms


def held_out_count(windows: int) -> int:
    """How many of ``windows`` calibration windows (the last ones) judge the result instead of training."""
    return max(1, windows // 8) if windows > 1 else 0


def torch_device(name: str):
    """The torch device ``name`` ("cpu" or "cuda"); BackendError when CUDA is asked for and torch has none."""
    torch = require("torch", "export")
    if name == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: torch sees no CUDA GPU here (a CUDA build of torch and an NVIDIA GPU "
                           "are needed); use --device cpu")
    return torch.device(name)


def kl_step(teacher: Teacher, student, tokens, chosen: Sequence[int], chunk_tokens: int | None = None) -> float:
    """Mean over tokens of KL(teacher || student) on the windows ``tokens[chosen]``, its gradient accumulated into
    the student's parameters. The head's logits over the vocabulary are made ``chunk_tokens`` positions at a time
    (default: about ``LOGIT_CHUNK_BYTES`` of float32 per tensor): each chunk's KL is differentiated at once, down
    to the final hidden state and to a quantized head's scales (its float weight made once a step), whose
    gradients then run back through the layers and to the head's log-scales in one pass each. Nothing is
    computed twice, no [tokens, vocabulary] tensor outlives its chunk, and the head's [in, vocabulary] weight has
    no gradient of its size."""
    import torch

    index = torch.as_tensor(np.asarray(chosen, dtype=np.int64), device=tokens.device)
    batch, target_hidden = tokens[index], teacher.hidden[index]
    hidden = _decoder(student)(batch, use_cache=False).last_hidden_state
    detached = hidden.detach().requires_grad_(True)
    head, scales = _head_weight(student)
    total = 0.0
    for part in _token_chunks(student, batch, chunk_tokens):
        loss = _chunk_kl(teacher, student, target_hidden[:, part], detached[:, part], head) / batch.numel()
        loss.backward()
        total += float(loss.detach())
    if scales is not None and scales.requires_grad:  # the head's log-scales: one backward from its scales
        scales.backward(head.scales_leaf.grad)
    if hidden.requires_grad:  # something before the head trains too
        hidden.backward(detached.grad)
    return total


def mean_kl(teacher: Teacher, student, tokens, windows: Sequence[int], chunk_tokens: int | None = None) -> float:
    """Mean over the windows ``tokens[windows]`` of each one's mean-over-tokens KL(teacher || student), without
    gradients."""
    import torch

    values = []
    with torch.no_grad():
        head, _ = _head_weight(student)
        for index in windows:
            window = tokens[index:index + 1]
            hidden = _decoder(student)(window, use_cache=False).last_hidden_state
            total = sum(float(_chunk_kl(teacher, student, teacher.hidden[index:index + 1, part], hidden[:, part],
                                        head)) for part in _token_chunks(student, window, chunk_tokens))
            values.append(total / window.numel())
    return float(np.mean(values))


# float32 bytes of one [tokens, vocabulary] tensor per chunk of the distillation loss
LOGIT_CHUNK_BYTES = 64 << 20


def _decoder(model):
    """The causal LM's decoder stack (its final norm included), whose last hidden state the head reads."""
    return getattr(model, model.base_model_prefix)


def _token_chunks(model, batch, chunk_tokens: int | None) -> list[slice]:
    positions = batch.shape[1]
    if chunk_tokens is None:
        rows = max(1, LOGIT_CHUNK_BYTES // (4 * model.config.vocab_size * batch.shape[0]))
        chunk_tokens = min(positions, rows)
    return [slice(start, min(start + chunk_tokens, positions)) for start in range(0, positions, chunk_tokens)]


@dataclasses.dataclass
class _HeadWithWeight:
    """A BlockScaledLinear head, its float weight built once for every chunk of a step (and once more in the
    backward products' dtype where that differs), and a leaf standing in for its scales: the chunks' gradients
    of the scales gather on the leaf ([blocks, vocabulary]), and one backward takes them to the log-scales."""

    module: object
    weight: object
    scales_leaf: object
    grad_weight: object = None

    def __call__(self, hidden):
        return self.module.with_weight(hidden, self.weight, self.scales_leaf, self.grad_weight)


def _head_weight(student):
    """(head, scales): the student's head as ``_logits`` runs it, and the scales its leaf was cut from (None
    where the head is not a BlockScaledLinear: then the head runs as it is)."""
    import torch

    head = student.lm_head
    if not hasattr(head, "scales"):
        return None, None
    scales = head.scales()
    leaf = scales.detach().requires_grad_(scales.requires_grad)
    with torch.no_grad():
        weight = _block_product(head.values, leaf, head.block_size)
        low = None if head.grad_dtype in (None, weight.dtype) else weight.to(head.grad_dtype)
    return _HeadWithWeight(head, weight, leaf, low), scales


def _chunk_kl(teacher: Teacher, student, teacher_hidden, hidden, head=None):
    """Sum over the chunk's tokens of KL(teacher || student), from each model's final hidden states (``head``:
    ``_head_weight``'s, or None for the student's own head module)."""
    import torch

    with torch.no_grad():
        target = torch.log_softmax(teacher.logits(teacher_hidden), dim=-1)
    predicted = torch.log_softmax(_logits(student, hidden, head), dim=-1)
    return torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="sum")


def _logits(model, hidden, head=None):
    """The causal LM's head on its final hidden states, as its forward applies it (Gemma 2's soft cap too)."""
    return _soft_capped((head or model.lm_head)(hidden).float(),
                        getattr(model.config, "final_logit_softcapping", None))


def _soft_capped(logits, cap: float | None):
    """cap * tanh(logits / cap), Gemma 2's final soft cap; the logits as they are without one."""
    import torch

    return logits if not cap else torch.tanh(logits / cap) * cap


def _check_windows(windows: np.ndarray) -> None:
    if windows.ndim != 2 or len(windows) == 0:
        raise UserError(f"distillation needs calibration windows [n, seq_len], got shape {windows.shape}")
