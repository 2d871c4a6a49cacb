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
        return llm_feeds(windows[:samples], model_path)
    names = entry.get("inputs")
    if (kind != "named" or not isinstance(count, int) or count < 1 or not isinstance(names, list)
            or not all(isinstance(name, str) for name in names)):
        raise UserError(f"{where}: its manifest entry is not a stored-feeds description")
    feeds = [{name: arrays[f"{batch}.{index}"] for index, name in enumerate(names) if f"{batch}.{index}" in arrays}
             for batch in range(min(count, samples))]
    if not all(feeds):
        raise UserError(f"{where}: a stored calibration batch has no arrays")
    return feeds
