"""Calibration feeds: token windows of text for exported decoders, or a user's load_data() script."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from accullm_export.errors import UserError
from accullm_export.runtime.base import max_positions


def llm_input_geometry(model_path: Path) -> tuple[int, int, int, np.dtype]:
    """(layers, kv heads, head dim, kv dtype) of an exported decoder, read from its graph inputs."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_path), load_external_data=False).graph
    past = [value for value in graph.input if value.name.startswith("past_key_values.") and value.name.endswith(".key")]
    if not past:
        raise UserError(f"{model_path} has no past_key_values inputs; it is not an exported decoder")
    dims = past[0].type.tensor_type.shape.dim
    dtype = helper.tensor_dtype_to_np_dtype(past[0].type.tensor_type.elem_type)
    return len(past), dims[1].dim_value, dims[3].dim_value, dtype


def llm_feeds(windows: np.ndarray, model_path: Path) -> list[dict[str, np.ndarray]]:
    """One feed per token window: ids, an all-ones mask, positions 0..L-1 and an empty KV cache."""
    layers, kv_heads, head_dim, dtype = llm_input_geometry(model_path)
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
    feeds = []
    for window in windows:
        ids = np.asarray(window, dtype=np.int64)[None, :]
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :]}
        for i in range(layers):
            feed[f"past_key_values.{i}.key"] = empty
            feed[f"past_key_values.{i}.value"] = empty
        feeds.append(feed)
    return feeds


def text_windows(folder: Path, source: str, samples: int, seq_len: int, seed: int) -> tuple[np.ndarray, dict]:
    """Token windows from a text source, tokenized with the model folder's tokenizer."""
    from accullm_export.data.text import load_text_source, token_windows
    from accullm_export.runtime.tokenizer import FolderTokenizer

    limit = max_positions(folder)
    if limit is not None and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} is over the model's maximum of {limit} positions")
    tokenizer = FolderTokenizer(folder)
    text = load_text_source(source)
    windows = token_windows(text.documents, tokenizer.encode, num_windows=samples, seq_len=seq_len, seed=seed,
                            separator_ids=tokenizer.eos_token_ids[:1])
    return windows, {"name": text.name, **text.description}


def check_feeds(feeds: list[dict[str, np.ndarray]], model_path: Path,
                source: str | Path) -> list[dict[str, np.ndarray]]:
    """Refuse, before any session runs, feeds that do not fit the model's inputs: a name it does not take or one it
    lacks, another kind of dtype, rank or static dimension, NaN or infinite values, token ids out of range.

    Raises:
        UserError: naming ``source`` (the script or file the feeds came from), the feed, the input and the problem.
    """
    inputs, vocab = _graph_inputs(Path(model_path))
    for number, feed in enumerate(feeds, start=1):
        where = f"{source}: feed {number}"
        unknown = sorted(set(feed) - set(inputs))
        if unknown:
            raise UserError(f"{where} has input {unknown[0]!r}, which {model_path} does not take "
                            f"(its inputs: {', '.join(sorted(inputs)[:8])})")
        missing = [name for name in inputs if name not in feed]
        if missing:
            raise UserError(f"{where} lacks input {missing[0]!r} of {model_path}")
        for name, (kinds, dims) in inputs.items():
            problem = _input_problem(np.asarray(feed[name]), name, kinds, dims, vocab)
            if problem:
                raise UserError(f"{where}: input {name!r} {problem}")
    return feeds


def _graph_inputs(model_path: Path) -> tuple[dict[str, tuple[str, list[int | None]]], int | None]:
    """name -> (accepted NumPy dtype kinds, dims with None where symbolic) of the inputs a feed must give, and the
    vocabulary size (the static last dimension of a ``logits`` output) when there is one."""
    import onnx
    from onnx import helper

    path = model_path / "model.onnx" if model_path.is_dir() else model_path
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        kind = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).kind if tensor_type.elem_type else "f"
        kinds = "iu" if kind in "iu" else ("b" if kind == "b" else "f")  # bfloat16 and fp8 report kind V
        dims = ([dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
                if tensor_type.HasField("shape") else None)
        inputs[value.name] = (kinds, dims)
    logits = next((value for value in graph.output if value.name == "logits"), None)
    last = logits.type.tensor_type.shape.dim[-1] if logits is not None and logits.type.tensor_type.shape.dim else None
    return inputs, (last.dim_value if last is not None and last.HasField("dim_value") else None)


def _input_problem(value: np.ndarray, name: str, kinds: str, dims: list[int | None] | None,
                   vocab: int | None) -> str | None:
    """What is wrong with one input value, or None."""
    if value.dtype.kind not in kinds:
        return f"is {value.dtype}, but the model takes {_KIND_NAMES.get(kinds, kinds)} values"
    if dims is not None and (len(dims) != value.ndim
                             or any(d is not None and d != v for d, v in zip(dims, value.shape))):
        shown = ["?" if d is None else d for d in dims]
        return f"has shape {list(value.shape)}, but the model takes {shown}"
    if value.size == 0 and not name.startswith("past_key_values."):  # an empty KV cache is the one empty input
        return f"is empty (shape {list(value.shape)})"
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        return "holds NaN or infinite values"
    if name == "input_ids" and value.size and (value.min() < 0 or (vocab is not None and value.max() >= vocab)):
        return f"holds token ids outside [0, {vocab if vocab is not None else 'vocab'})"
    return None


_KIND_NAMES = {"f": "floating-point", "iu": "integer", "b": "boolean"}


def iterate(feeds: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    yield from feeds


def stored_windows(windows: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """Token windows [n, seq_len] as the arrays of ``feeds.npz`` and their manifest entry."""
    windows = np.asarray(windows)
    return {"windows": windows}, {"kind": "windows", "count": int(windows.shape[0]), "seq_len": int(windows.shape[1])}


def stored_named(feeds: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], dict]:
    """A load_data() script's feeds as the arrays of ``feeds.npz`` (``<batch>.<input index>``) and their manifest
    entry (the input names, in order of appearance)."""
    names: list[str] = []
    arrays = {}
    for batch, feed in enumerate(feeds):
        for name, value in feed.items():
            if name not in names:
                names.append(name)
            arrays[f"{batch}.{names.index(name)}"] = np.asarray(value)
    return arrays, {"kind": "named", "count": len(feeds), "inputs": names}


def restore_feeds(arrays: dict[str, np.ndarray], entry: dict, model_path: Path, samples: int,
                  where: Path) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` feeds stored by :func:`stored_windows` or :func:`stored_named`.

    Raises:
        UserError: the arrays do not fit their manifest entry (``where`` names the file).
    """
    kind, count = entry.get("kind"), entry.get("count")
    if kind == "windows":
        windows = arrays.get("windows")
        if (windows is None or windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2
                or not np.issubdtype(windows.dtype, np.integer) or (windows < 0).any()):
            raise UserError(f"{where}: the token windows are not a non-empty [windows, tokens] array of token ids")
        return check_feeds(llm_feeds(windows[:samples], model_path), model_path, where)
    names = entry.get("inputs")
    if (kind != "named" or not isinstance(count, int) or count < 1 or not isinstance(names, list)
            or not all(isinstance(name, str) for name in names)):
        raise UserError(f"{where}: its manifest entry is not a stored-feeds description")
    feeds = [{name: arrays[f"{batch}.{index}"] for index, name in enumerate(names) if f"{batch}.{index}" in arrays}
             for batch in range(min(count, samples))]
    if not all(feeds):
        raise UserError(f"{where}: a stored calibration batch has no arrays")
    return check_feeds(feeds, model_path, where)
