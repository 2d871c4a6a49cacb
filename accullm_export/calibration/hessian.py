"""Stream the mean outer product H = E[x x^T] of chosen activation tensors over calibration feeds (for GPTQ).

x is a tensor's last axis (the channels) and the mean runs over every other position; position 0 (the
attention sink, whose activations are outliers the main statistics exclude too) is left out of [batch, seq, C]
tensors unless asked otherwise. Tensors are tapped a group at a time, as ``accullm_export.calibration.collect``
does: a group's fp32 activations for one batch fit ``budget_bytes``, and each group is one pass over the feeds.
Per-batch sizes come from ONNX shape inference with the symbolic input dimensions bound to the first feed's
shapes; a tensor whose size stays unknown is tapped in a group of its own. The sums are float32 [C, C]
matrices, not part of that budget: ``StreamedHessians`` holds as many at a time as its own budget allows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from accullm_export.calibration.collect import OPTIMIZATION, Feeds, group_by_size, plan_groups
from accullm_export.errors import UserError
from accullm_export.runtime.intermediates import IntermediateReader
from accullm_export.progress import progress

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096  # rows multiplied at a time, bounding the temporary copy
MATRIX_ITEMSIZE = 4  # bytes per entry of the float32 sums and means


def collect_hessians(model_path: str | Path, tensors: Sequence[str], feeds: Feeds, *, budget_bytes: int = 512 << 20,
                     skip_first_position: bool = True,
                     shared_initializers: Mapping[str, np.ndarray] | None = None,
                     device: str = "cpu") -> dict[str, np.ndarray]:
    """Mean x x^T (float32 [C, C]) over all rows of each named tensor, x being its last axis.

    Args:
        model_path: the ONNX model (or exported folder).
        tensors: graph inputs or node outputs to measure (usually the inputs of linear layers).
        feeds: a callable returning a fresh iterable of feeds for each pass (it is also called once to read the
            first feed's shapes).
        budget_bytes: activation bytes tapped per batch.
        skip_first_position: for [batch, seq, channels] tensors, leave position 0 out of the mean.
        shared_initializers: the model's weights already in memory, run in place (``IntermediateReader``).
        device: where ONNX Runtime runs the model, "cpu" or "cuda".

    Raises:
        UserError: a name is not a tensor of the model, the feeds are empty, or a tensor's channels change.
    """
    means, _, _ = _collect(model_path, tensors, feeds, (), budget_bytes=budget_bytes,
                           skip_first_position=skip_first_position, shared_initializers=shared_initializers,
                           device=device)
    return means


def _collect(model_path: str | Path, tensors: Sequence[str], feeds: Feeds, kept: Sequence[str], *, budget_bytes: int,
             skip_first_position: bool, shared_initializers: Mapping[str, np.ndarray] | None,
             device: str, given: list[dict[str, np.ndarray]] | None = None,
             carry: Sequence[str] = (), reader: IntermediateReader | None = None,
             sizes: Mapping[str, int] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                               list[dict[str, np.ndarray]]]:
    """``collect_hessians``' means; the values of the ``kept`` tensors on every feed (all positions), stacked
    along the first axis: tapped in the first pass, so they cost no pass of their own; and, per feed, the values
    of the ``carry`` tensors, for a later call's ``given``.

    ``given``: per feed (in the feeds' order), values of intermediate tensors computed by an earlier call
    (``IntermediateReader.carried``): the sessions start from them instead of running what computed them. The
    list's entries are dropped as the last pass has used them.

    ``reader`` and ``sizes`` (elements per feed of each tensor, ``_elements_per_batch``): made once by a caller
    that collects many times from one model (then ``model_path``, ``shared_initializers`` and ``device`` are the
    reader's); else made here."""
    names = list(dict.fromkeys(tensors))
    if reader is None:
        reader = IntermediateReader(model_path, OPTIMIZATION, shared_initializers, device)
    _check_names(reader, names + list(kept) + list(carry), model_path)
    if sizes is None:  # else the caller read the first feed's shapes
        sizes = _elements_per_batch(reader.model, names, _first_feed(feeds), budget_bytes)
    groups = plan_groups({name: sizes[name] for name in names}, 1, budget_bytes) or [[]]
    log.info("collecting Hessians of %d tensors in %d pass(es)%s", len(names), len(groups),
             " from the values a previous pass left" if given else "")
    types = {name: value.dtype for name, value in given[0].items()} if given else {}
    sums = _Sums()
    values_of: dict[str, list[np.ndarray]] = {name: [] for name in kept}
    carried: list[dict[str, np.ndarray]] = []
    for number, group in enumerate(groups):
        extra = list(kept) + list(carry) if number == 0 else []
        tapped = list(dict.fromkeys(name for name in group + extra if name not in types))
        tap = reader.open(tapped, types)
        last = number == len(groups) - 1
        for index, feed in enumerate(progress(feeds(), f"Hessian pass {number + 1}/{len(groups)}")):
            start = given[index] if given else {}
            values = tap.run({**feed, **start})
            values.update((name, start[name]) for name in group + extra if name in start)
            for name in group:
                value = np.asarray(values[name])
                if value.ndim == 0:
                    raise UserError(f"{name} is a scalar: it has no channels to measure")
                sums.add(name, value[:, 1:, :] if skip_first_position and value.ndim == 3 else value)
            if number == 0:
                for name in kept:
                    values_of[name].append(np.asarray(values[name]))
                carried.append({name: np.asarray(values[name]) for name in carry})
            if given and last:
                given[index] = None
        # one session (and one batch's values) at a time: the next group's session is made once these are freed
        tap = values = value = start = None
    empty = [name for name in names if sums.rows.get(name, 0) == 0]
    if empty:
        raise UserError(f"no rows reached {empty[:3]}: the feeds are too short (position 0 is skipped)")
    return ({name: sums.mean(name) for name in names},
            {name: np.concatenate(parts) for name, parts in values_of.items()}, carried)


class StreamedHessians(Mapping[str, np.ndarray]):
    """E[x x^T] of each named tensor (``collect_hessians``), collected a group at a time when first read, so that
    a large model never holds every layer's [C, C] matrix at once.

    The tensors are grouped in the order given (the order the passes read them: graph order) so that each
    group's matrices fit ``matrix_bytes``; reading a tensor of another group drops the group held and runs that
    group's pass over the feeds. Read in order, that is one pass per group; read out of order, a group is
    collected again (``passes`` counts them). ``pinned`` tensors (read by an earlier pass and again later, as
    rotate_inputs reads a rotated layer's input that an unrotated sibling reads in GPTQ) lead the first group and
    are kept once collected, until ``clear``. Entries added with ``merged`` (a pass's own matrices, e.g. of a
    rotated input) are kept as given. The values themselves of the ``kept`` tensors (the LM head's input, for
    distillation's teacher and the head's row ranking) are tapped in the first group's pass and handed over once
    by ``source_values``: the source model runs over the text once for all of them.

    Read in order, a group's pass starts where the previous group's ended: that pass kept, per window, the
    tensors the later layers read (the residual stream, the attention mask: ``IntermediateReader.carried``), so
    each pass runs only its own group's layers, and the whole model runs over the text about once however many
    groups there are (the first pass, which taps the pinned and kept tensors, runs as far as they lie).
    """

    def __init__(self, model_path: str | Path, channels: Mapping[str, int], feeds: Feeds, *,
                 budget_bytes: int = 512 << 20, matrix_bytes: int = 1 << 30, skip_first_position: bool = True,
                 pinned: Sequence[str] = (), device: str = "cpu",
                 kept: Sequence[str] = ()):
        self._model_path, self._feeds, self._budget, self._device = model_path, feeds, budget_bytes, device
        self._shared: Mapping[str, np.ndarray] | None = None
        self._skip = skip_first_position
        self._channels = {name: channels[name] for name in pinned if name in channels} | dict(channels)
        self._pinning = {name for name in pinned if name in channels}
        self.groups = group_by_size({name: count * count * MATRIX_ITEMSIZE
                                     for name, count in self._channels.items()}, matrix_bytes)
        self._group_of = {name: number for number, group in enumerate(self.groups) for name in group}
        self._held: dict[str, np.ndarray] = {}
        self._held_group: int | None = None
        self._pinned: dict[str, np.ndarray] = {}
        self.kept = tuple(dict.fromkeys(kept))
        self._kept_values: dict[str, np.ndarray] = {}
        self._carries: list[list[str]] | None = None  # per group: the tensors its pass keeps for the next one's
        self._state: tuple[int, list[dict[str, np.ndarray]]] | None = None  # (group, its pass's carried values)
        self._reader: IntermediateReader | None = None  # the graph and its tensors' sizes, read once for every pass
        self._sizes: dict[str, int] | None = None
        self.passes = 0
        self.resumed = 0  # passes that started from the previous group's carried values

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._pinned:
            return self._pinned[name]
        if name not in self._group_of:
            raise KeyError(name)
        number = self._group_of[name]
        if number != self._held_group:
            self._held, self._held_group = {}, None
            if len(self.groups) > 1:
                log.info("second moments: group %d of %d (%d tensors)", number + 1, len(self.groups),
                         len(self.groups[number]))
            collected = self._pass(number)
            self._pinned.update({key: value for key, value in collected.items() if key in self._pinning})
            self._held = {key: value for key, value in collected.items() if key not in self._pinning}
            self._held_group = number
        return self._pinned[name] if name in self._pinned else self._held[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._channels)

    def __len__(self) -> int:
        return len(self._channels)

    def source_values(self, name: str) -> np.ndarray:
        """The values of the ``kept`` tensor ``name`` on every feed, stacked along the first axis; handed over once
        (the first group is collected first if no group was yet).

        Raises:
            KeyError: ``name`` was not kept, or its values were already handed over.
        """
        if name not in self.kept:
            raise KeyError(name)
        if self.passes == 0 and self._channels:
            self[next(iter(self._channels))]  # the first group's pass taps the kept tensors too
        elif self.passes == 0:
            self._pass(None)
        return self._kept_values.pop(name)

    def _pass(self, number: int | None) -> dict[str, np.ndarray]:
        """One pass over the feeds for the matrices of group ``number`` (None: none), starting from the previous
        group's carried values when its pass was the last one; the first pass taps the kept tensors too."""
        names = [] if number is None else self.groups[number]
        carry = [] if number is None else self._carry_of(number)
        state, self._state = self._state, None
        given = state[1] if state is not None and number is not None and state[0] == number - 1 else None
        reader, sizes = self._model()
        reader.shared_initializers = self._shared
        try:
            collected, values, carried = _collect(
                self._model_path, names, self._feeds, self.kept if self.passes == 0 else (),
                budget_bytes=self._budget, skip_first_position=self._skip, shared_initializers=self._shared,
                device=self._device, given=given, carry=carry, reader=reader, sizes=sizes)
        finally:
            reader.shared_initializers = None  # the store alone holds the weights between passes (``_release``)
        self.passes += 1
        self.resumed += given is not None
        del state, given
        self._kept_values.update(values)
        if carry:
            self._state = (number, carried)
            self._release(number, {name: value.dtype for name, value in carried[0].items()} if carried else {})
        return collected

    def _release(self, number: int, carry: Mapping[str, np.dtype]) -> None:
        """Let go of the shared weights that no later group's pass reads once it starts from the values group
        ``number``'s pass carried: the caller's arrays are then freed as the passes replace them in its graph. A
        pass that needs one again (a group read out of order) loads it from the model's file."""
        if not self._shared:
            return
        reader, _ = self._model()
        later = [name for group in self.groups[number + 1:] for name in group if name not in self._pinning]
        read = {tensor.name for tensor in reader.pruned(later, carry).graph.initializer}
        self._shared = {name: value for name, value in self._shared.items() if name in read}

    def _carry_of(self, number: int) -> list[str]:
        """The tensors group ``number``'s pass keeps for the next group's (none after the last group)."""
        if self._carries is None:
            reader, sizes = self._model()
            layers = [[name for name in group if name not in self._pinning] for group in self.groups]
            self._carries = [reader.carried([name for group in layers[:index + 1] for name in group],
                                            [name for group in layers[index + 1:] for name in group],
                                            size_of=lambda name: sizes.get(name, 0))
                             for index in range(len(layers) - 1)] + [[]]
        return self._carries[number]

    def _model(self) -> tuple[IntermediateReader, dict[str, int]]:
        """The reader of the model's graph and the elements per feed of its tensors (graph inputs and node
        outputs; ``_elements_per_batch``), made at the first pass and kept for the others."""
        if self._reader is None:
            reader = IntermediateReader(self._model_path, OPTIMIZATION, device=self._device)
            inputs = [value.name for value in reader.model.graph.input]
            self._sizes = _elements_per_batch(reader.model, inputs + reader.tensor_names(), _first_feed(self._feeds),
                                              self._budget, quiet=True)
            self._reader = reader
        return self._reader, self._sizes

    def merged(self, entries: Mapping[str, np.ndarray]) -> "_WithEntries":
        """This store with ``entries`` added (or replacing collected ones): a view of the same store, so that the
        group held is one for both (a copy of the store would keep the group it held when made while the other
        collects the next)."""
        return _WithEntries(self, entries)

    def share(self, initializers: Mapping[str, np.ndarray]) -> None:
        """Run later passes on these arrays (the model's own weights, already in memory) instead of loading the
        weights again: ``collect_hessians``' ``shared_initializers``. They must stay unchanged while in use. The
        store holds each only while a later pass may read it."""
        self._shared = dict(initializers)

    def clear(self) -> None:
        """Drop every matrix held, pinned ones too, and the shared weights (a later read collects the matrices
        again, loading the weights)."""
        self._held, self._held_group = {}, None
        self._pinned.clear()
        self._shared = None
        self._state = None


class _WithEntries(Mapping[str, np.ndarray]):
    """A ``StreamedHessians`` with entries of its own added (``StreamedHessians.merged``): those are read first,
    the rest from the store, whose other attributes (``passes``, ``kept``, ``clear`` ...) it passes on."""

    def __init__(self, store: StreamedHessians, entries: Mapping[str, np.ndarray]):
        self._store, self._entries = store, dict(entries)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._entries[name] if name in self._entries else self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self._store), **dict.fromkeys(self._entries)})

    def __len__(self) -> int:
        return len(set(self._store) | set(self._entries))

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def merged(self, entries: Mapping[str, np.ndarray]) -> "_WithEntries":
        return _WithEntries(self._store, {**self._entries, **entries})


def _check_names(reader: IntermediateReader, names: list[str], model_path: str | Path) -> None:
    known = {value.name for value in reader.model.graph.input} | set(reader.tensor_names())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"{model_path} has no tensor named {', '.join(map(repr, unknown[:5]))}"
                        f"{' ...' if len(unknown) > 5 else ''} (graph inputs and node outputs can be measured)")


class _Sums:
    """Running float32 sums of x x^T and row counts, per tensor."""

    def __init__(self):
        self.second: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, value: np.ndarray) -> None:
        channels = value.shape[-1]
        flat = value.reshape(-1, channels)
        total = self.second.setdefault(name, np.zeros((channels, channels), dtype=np.float32))
        if total.shape[0] != channels:
            raise UserError(f"{name} changed from {total.shape[0]} to {channels} channels between batches")
        for start in range(0, flat.shape[0], CHUNK_ROWS):
            chunk = flat[start:start + CHUNK_ROWS].astype(np.float32, copy=False)
            total += chunk.T @ chunk
        self.rows[name] = self.rows.get(name, 0) + flat.shape[0]

    def mean(self, name: str) -> np.ndarray:
        """The sum divided by the rows in place and handed over (no second [C, C] copy)."""
        total = self.second.pop(name)
        total /= self.rows[name]
        return total


def _first_feed(feeds: Feeds) -> Mapping[str, np.ndarray]:
    """The first of the feeds (whose shapes size the passes).

    Raises:
        UserError: there are none.
    """
    first = next(iter(feeds()), None)
    if first is None:
        raise UserError("no calibration feeds: the Hessians need at least one batch")
    return first


def _elements_per_batch(model: onnx.ModelProto, names: list[str], feed: Mapping[str, np.ndarray],
                        budget_bytes: int, quiet: bool = False) -> dict[str, int]:
    """Elements of each tensor for one feed like ``feed``; unknown sizes count as the whole budget."""
    shapes = _inferred_shapes(model)
    bound = _bind_input_dims(model, feed)
    alone = budget_bytes // 4 + 1  # more than a budget's worth: plan_groups gives it a group of its own
    sizes = {}
    for name in names:
        dims = [dim.dim_value if dim.HasField("dim_value") else bound.get(dim.dim_param, 0)
                for dim in shapes.get(name, [])]
        sizes[name] = int(np.prod(dims)) if dims and all(size > 0 for size in dims) else alone
    unknown = sum(size == alone for size in sizes.values())
    if unknown and not quiet:
        log.info("%d tensor(s) of unknown size are tapped one per pass", unknown)
    return sizes


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Name -> list of TensorShapeProto dims, for every value ONNX shape inference can type (no weights read)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        # only a sizing hint: without it every tensor gets a pass of its own
        log.debug("shape inference failed (%s); tensor sizes unknown", exc)
        inferred = model
    graph = inferred.graph
    return {value.name: list(value.type.tensor_type.shape.dim) for value in
            [*graph.input, *graph.value_info, *graph.output] if value.type.tensor_type.HasField("shape")}


def _bind_input_dims(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Symbolic dimension name -> its size in ``feed`` (e.g. batch_size -> 1, sequence_length -> 128)."""
    bound: dict[str, int] = {}
    for value in model.graph.input:
        if value.name not in feed:
            continue
        shape = np.shape(feed[value.name])
        dims = value.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            bound.update({dim.dim_param: size for dim, size in zip(dims, shape) if dim.dim_param})
    return bound
