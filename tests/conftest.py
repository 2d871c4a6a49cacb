"""Shared fixtures: tiny random-init decoders built in code (fixed seeds) and their ONNX exports."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.models import SAMPLES, SEQ_LEN, TEXT, export_tiny, planted_checkpoint


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """model_type -> (hf folder, exported folder), default (fused) attention, built once per session."""
    return export_tiny(tmp_path_factory.mktemp("tiny"), "fused")


@pytest.fixture(scope="session")
def tiny_decomposed_exports(tmp_path_factory):
    """The same tiny models exported with decomposed (opset 21) attention."""
    return export_tiny(tmp_path_factory.mktemp("tiny-decomposed"), "decomposed")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def planted_model(tmp_path_factory):
    """A tiny Llama whose RMSNorm weights scale channels 5 and 40 by 100: q/k/v and gate/up inputs get outliers."""
    from accullm_export.models.export import export_model

    root = tmp_path_factory.mktemp("planted")
    hf = planted_checkpoint(root / "hf", "llama", seed=3)
    export_model(str(hf), root / "onnx")
    (root / "text.txt").write_text(TEXT)
    return root / "onnx", root / "text.txt"


@pytest.fixture(scope="session")
def profile(planted_model, tmp_path_factory):
    from accullm_export.calibration.outliers import OutlierPolicy
    from accullm_export.calibration.run import CalibrationConfig, calibrate

    folder, text = planted_model
    out = tmp_path_factory.mktemp("profile") / "p"
    config = CalibrationConfig(source=str(text), samples=SAMPLES, seq_len=SEQ_LEN,
                               policy=OutlierPolicy(name="ratio", k=2, ratio=20.0))
    calibrate(folder, out, config)
    return out


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    """An existing, empty conversion cache (``ACCULLM_CACHE``): a refused GGUF must leave nothing in it."""
    folder = tmp_path / "cache"
    (folder / "gguf").mkdir(parents=True)
    monkeypatch.setenv("ACCULLM_CACHE", str(folder))
    return folder
