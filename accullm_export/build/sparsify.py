"""``sparsify``: give every gated MLP (SwiGLU or GELU-tanh) of a model a sparse-skip path, into a new model folder.

Steps: refuse a model that is already sparse or a profile of another model; find the MLPs (none is an error);
plan them (thresholds from the profile, guessers trained on its calibration text); run the
``skip_sparse_neurons`` pass; write the graph, the side files and a manifest with each layer's threshold and
guesser quality; open the result in ONNX Runtime before the folder appears.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx

import accullm_export
from accullm_export.atomic import atomic_dir, check_output
from accullm_export.errors import UserError
from accullm_export.sparsity.config import SparsityConfig

log = logging.getLogger(__name__)

MANIFEST_KIND, MANIFEST_VERSION = "accullm-export/sparse", 1
SPARSITY_KEY = "accullm_export.sparsity"  # ONNX metadata_props key marking a sparse-skip model


def refuse_sparse(model: onnx.ModelProto, path: Path) -> None:
    """UserError for a model that already has sparse-skip MLPs."""
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    if SPARSITY_KEY in metadata:
        raise UserError(f"{path} already has sparse-skip MLPs ({metadata[SPARSITY_KEY]}); sparsify the dense "
                        "export instead")


def sparsity_metadata(config: SparsityConfig) -> dict[str, str]:
    """The metadata_props entry that marks a sparse-skip model (``refuse_sparse`` reads it)."""
    return {SPARSITY_KEY: f"{config.method}:{config.sparsity}"}


def sparsity_plans(model_path: Path, graph, profile, config: SparsityConfig) -> dict:
    """Find the MLPs of ``graph`` and plan them (the guessers train on ``model_path``'s activations)."""
    from accullm_export.graph.mlp import find_mlp_blocks
    from accullm_export.sparsity.plan import plan_sparsity

    return plan_sparsity(model_path, find_mlp_blocks(graph), profile, config)


def sparsity_summary(plans: dict, config: SparsityConfig) -> dict:
    """The manifest's sparsity section: the config, and each MLP's plan with its guesser's quality."""
    layers = [plan.to_dict() for plan in plans.values()]
    guessers = [layer["predictor"] for layer in layers if "predictor" in layer]
    summary = {"config": config.to_dict(), "layers": layers, "mlps": len(layers)}
    if guessers:
        summary["predictor"] = {key: round(float(np.mean([g[key] for g in guessers])), 4)
                                for key in ("recall", "precision", "kept", "flops_percent_of_mlp")}
    return summary


def sparsify_model(model: str | Path, out_dir: str | Path, config: SparsityConfig, profile_dir: str | Path, *,
                   overwrite: bool = False) -> dict:
    """Rewrite ``model`` into ``out_dir``; returns the manifest (also written as ``manifest.json``)."""
    from accullm_export.build.quantize import check_loads, check_side_files, copy_side_files
    from accullm_export.calibration.profile import load_profile
    from accullm_export.graph.io import load_onnx
    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.passes import skip_sparse_neurons
    from accullm_export.graph.pipeline import run_passes

    check_output(out_dir, MANIFEST_KIND, overwrite, protected=[model, profile_dir])
    model_path = Path(model) / "model.onnx" if Path(model).is_dir() else Path(model)
    if not model_path.is_file():
        raise UserError(f"{model} is not an ONNX model or an exported model folder")
    header = load_onnx(model_path, load_external_data=False)  # external-data locations checked before hashing
    refuse_sparse(header, model_path)
    check_side_files(model_path.parent)
    profile = load_profile(profile_dir, model_path)
    graph, source = load_graph(model_path)
    plans = sparsity_plans(model_path, graph, profile, config)
    reports, notes = [], []
    if config.active:
        pass_config = skip_sparse_neurons.Config(plans=plans, dense_first=config.dense_first)
        graph, reports, _ = run_passes(graph, [("skip_sparse_neurons", pass_config)])
        notes = [note for report in reports for note in report.notes]
    else:
        notes.append("sparsity 0: every MLP left dense (the output is the input model, bit for bit)")
    with atomic_dir(out_dir, overwrite=overwrite, kind=MANIFEST_KIND, protected=[model, profile_dir]) as staging:
        save_graph(graph, source, staging / "model.onnx", sparsity_metadata(config))
        copy_side_files(model_path.parent, staging)
        check_loads(staging / "model.onnx")
        manifest = {
            "kind": MANIFEST_KIND, "version": MANIFEST_VERSION,
            "source": {"path": str(model_path), "sha256": profile.manifest["model"]["sha256"]},
            "profile": {"path": str(profile.folder)},
            "sparsity": sparsity_summary(plans, config),
            "passes": [report.to_dict() for report in reports], "notes": notes,
            "versions": {"accullm_export": accullm_export.__version__, "onnx": onnx.__version__,
                         "numpy": np.__version__},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
