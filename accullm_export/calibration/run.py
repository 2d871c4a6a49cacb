"""``calibrate``: statistics, outlier choices and sparsity thresholds of a model, saved as a profile."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx

import accullm_export
from accullm_export.atomic import atomic_dir, check_output
from accullm_export.calibration.collect import CollectedStatistics, collect_statistics
from accullm_export.calibration.feeds import (check_feeds, llm_feeds, restore_feeds, stored_named, stored_windows,
                                             text_windows)
from accullm_export.calibration.outliers import LayerStatistics, OutlierPolicy, select_outliers
from accullm_export.calibration.profile import (FEEDS, PROFILE_KIND, PROFILE_VERSION, Profile, feeds_archive,
                                                model_fingerprint, read_feeds, write_profile)
from accullm_export.calibration.stats import SPARSITY_LEVELS
from accullm_export.errors import UserError
from accullm_export.graph.linear import LinearLayer, find_linear_layers

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Where the data comes from and how much of it; the outlier policy."""

    source: str = "wiki"  # wiki (its calibration split), a .txt/.jsonl file, or a load_data() .py script
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    policy: OutlierPolicy = OutlierPolicy()
    budget_mb: int = 512
    version: int = 1

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["policy"] = self.policy.to_dict()
        return data


def calibrate(model: str | Path, out_dir: str | Path, config: CalibrationConfig, overwrite: bool = False) -> dict:
    """Measure ``model`` and write the profile folder; returns the manifest."""
    from accullm_export.graph.io import load_onnx

    if config.samples < 1 or config.seq_len < 2:
        raise UserError("--samples must be at least 1 and --seq-len at least 2")
    inputs = [model, config.source if Path(config.source).is_file() else None]  # wiki names no file
    check_output(out_dir, PROFILE_KIND, overwrite, protected=inputs)
    model_path = Path(model) / "model.onnx" if Path(model).is_dir() else Path(model)
    graph_model = load_onnx(model_path, load_external_data=False)
    layers = find_linear_layers(graph_model)
    if not layers:
        raise UserError(f"{model_path} has no MatMul/Gemm with an initializer weight: nothing to calibrate")
    is_llm = {"input_ids", "past_key_values.0.key"} <= {value.name for value in graph_model.graph.input}
    feeds, source, rows_per_batch, total_rows, (stored, entry) = _feeds(model_path, config, is_llm)
    archive, digest = feeds_archive(stored)
    with atomic_dir(out_dir, overwrite=overwrite, kind=PROFILE_KIND, protected=inputs) as staging:
        collected = collect_statistics(model_path, layers, lambda: feeds, total_rows=total_rows,
                                       rows_per_batch=rows_per_batch, sink=is_llm,
                                       budget_bytes=config.budget_mb << 20)
        manifest, arrays = _profile(model_path, layers, collected, config, source, is_llm)
        manifest["feeds"] = {"file": FEEDS, "sha256": digest, **entry}
        write_profile(staging, manifest, arrays, archive)
        from accullm_export.calibration.report import write_calibration_report

        write_calibration_report(manifest, arrays, staging)
    return manifest


def _feeds(model_path: Path, config: CalibrationConfig, is_llm: bool):
    """(feeds, source description, rows per batch, total rows, (arrays, manifest entry) to store in the profile).

    ``config.source`` comes from this command line only: a ``.py`` source is the user's own script, run here.
    """
    if config.source.endswith(".py"):
        from accullm_export.data.loader_script import load_data_script

        feeds = check_feeds(load_data_script(config.source), model_path, f"data-loader script {config.source}")
        rows = _rows_of(feeds[0], is_llm)
        return (feeds, {"kind": "script", "path": str(Path(config.source).resolve())}, rows, len(feeds) * rows,
                stored_named(feeds))
    if not is_llm:
        raise UserError(f"{model_path} is not an exported decoder: calibrate it with a load_data() script "
                        "(--calib loader.py), not text")
    source = "wiki:calibration" if config.source == "wiki" else config.source
    windows, description = text_windows(model_path.parent, source, config.samples, config.seq_len, config.seed)
    return (llm_feeds(windows, model_path), description, config.seq_len, config.samples * (config.seq_len - 1),
            stored_windows(windows))


def profile_feeds(model_path: Path, profile: Profile, samples: int) -> list[dict[str, np.ndarray]]:
    """Feeds from the calibration data a profile was measured on (its first ``samples`` windows or batches).

    They are read from the profile's ``feeds.npz`` (as data, hash-checked); the source its manifest names is
    never read again, and a script there is never run.

    Raises:
        UserError: the profile holds no stored feeds (an older profile), or they do not match its manifest.
    """
    arrays = read_feeds(profile)
    return restore_feeds(arrays, profile.manifest["feeds"], Path(model_path), samples, profile.folder / FEEDS)


def _rows_of(feed: dict, is_llm: bool) -> int:
    """Rows (tokens) one feed contributes, estimated from its first input (one position is the sink for LLMs)."""
    first = np.asarray(feed["input_ids"] if "input_ids" in feed else next(iter(feed.values())))
    rows = int(np.prod(first.shape[:-1])) if first.ndim > 1 and not is_llm else int(first.size)
    return rows - (first.shape[0] if is_llm else 0)


def _profile(model_path: Path, layers: list[LinearLayer], collected: CollectedStatistics, config: CalibrationConfig,
             source: dict, is_llm: bool) -> tuple[dict, dict[str, np.ndarray]]:
    finished = {name: stats.finish() for name, stats in collected.channels.items()}
    inputs = list(finished)
    arrays = {f"{index}.{key}": np.asarray(value) for index, name in enumerate(inputs)
              for key, value in finished[name].items()}
    weights = _WeightLoader(model_path)
    layer_stats = {layer.node: LayerStatistics(absmax=finished[layer.input]["absmax"],
                                               second_moment=finished[layer.input]["second_moment"],
                                               weight=weights.getter(layer)) for layer in layers}
    choices = select_outliers(layer_stats, config.policy)
    sparsity = {}
    for layer in layers:
        histogram = collected.histograms.get(layer.input)
        if histogram is not None and layer.is_mlp_down_projection:
            index = inputs.index(layer.input)
            arrays[f"{index}.magnitude_histogram"] = histogram.counts
            sparsity[layer.node] = {"levels": list(SPARSITY_LEVELS),
                                    "thresholds": [float(t) for t in histogram.thresholds()]}
    manifest = {
        "kind": PROFILE_KIND, "version": PROFILE_VERSION,
        "model": {"path": str(model_path), "sha256": model_fingerprint(model_path), "llm": is_llm},
        "source": source, "config": config.to_dict(), "policy": config.policy.to_dict(),
        "batches": collected.batches, "passes": collected.passes, "batch_digests": collected.batch_digests,
        "inputs": [{"name": name, "channels": int(finished[name]["absmax"].size), "rows": int(finished[name]["rows"]),
                    "p999_exact": bool(finished[name]["p999_exact"])} for name in inputs],
        "layers": [{"node": layer.node, "op_type": layer.op_type, "input": layer.input,
                    "input_index": inputs.index(layer.input), "weight": layer.weight,
                    "in_features": layer.in_features, "out_features": layer.out_features,
                    "mlp_down_projection": layer.is_mlp_down_projection,
                    "outliers": choices[config.policy.name][layer.node],
                    "candidates": {policy: chosen[layer.node] for policy, chosen in choices.items()}}
                   for layer in layers],
        "sparsity": sparsity,
        "versions": {"accullm_export": accullm_export.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__},
    }
    return manifest, arrays


class _WeightLoader:
    """Loads weights lazily (only the sensitivity policy needs them), one at a time, as [in, out] float32: the
    model's proto is read without its external data, and each weight from its file when asked for."""

    def __init__(self, model_path: Path):
        self.model_path = model_path
        self._initializers = None
        self._files: dict[str, Path] = {}

    def getter(self, layer: LinearLayer):
        return lambda: self._weight(layer)

    def _weight(self, layer: LinearLayer) -> np.ndarray:
        from accullm_export.graph.io import external_data_files, load_onnx
        from accullm_export.graph.ir import initializer_array

        if self._initializers is None:
            model = load_onnx(self.model_path, load_external_data=False)
            self._files = external_data_files(model, self.model_path.parent, self.model_path)
            self._initializers = {t.name: t for t in model.graph.initializer}
        array = initializer_array(self._initializers[layer.weight], self._files,
                                  self.model_path.parent).astype(np.float32, copy=False)
        transposed = array.shape != (layer.in_features, layer.out_features)
        return array.T if transposed else array
