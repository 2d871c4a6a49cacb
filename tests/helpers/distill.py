"""Planted-outlier exports of the tiny architectures, plain and distilled builds of them, and the check that
distillation lowered the KL. Torch is needed by the builds, not by this module: callers skip without it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from accullm_export.build.quantize import quantize_model
from accullm_export.calibration.outliers import OutlierPolicy
from accullm_export.calibration.run import CalibrationConfig, calibrate
from accullm_export.models.export import export_model
from tests.helpers.recipes import make_recipe
from tests.helpers.emulation import mean_kl
from tests.helpers.graphs import ort_logits_for_ids
from tests.helpers.models import SAMPLES, SEQ_LEN, TEXT, planted_checkpoint

DISTILL_W4 = dict(name="w4a16", block_size=16, policy="ratio", embeddings="fp32")


def rounded_layers(weights, seed=5, block=8):
    """Every projection and the LM head of ``weights`` (a tiny export's graph_weights) as a training.distill
    BlockScaled: rounded to INT4 blocks of ``block`` with noise of a third of a step, so their scales have
    something to learn."""
    from accullm_export.training.distill import BlockScaled

    rng = np.random.default_rng(seed)
    layers = []
    for name in [name for name in weights if name.endswith("proj.weight") or name == "lm_head.weight"]:
        weight = weights[name].T  # [in, out]
        scales = (np.abs(weight).reshape(-1, block, weight.shape[1]).max(axis=1) / 7 + 1e-3).astype(np.float32)
        values = np.clip(np.rint(weight / np.repeat(scales, block, axis=0) + rng.normal(0, 0.3, weight.shape)),
                         -8, 7).astype(np.int8)
        layers.append(BlockScaled(name.removesuffix(".weight"), values, scales, block_size=block))
    return layers


def stored_initializers(path):
    """The initializers of the model in folder ``path``."""
    model = onnx.load(str(path / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_size_and_lower_kl(source, text, trained, plain):
    """The trained folder's file is as large as the plain one's, and ONNX Runtime on the calibration text
    measures a lower KL to the source model for it."""
    assert (plain / "model.onnx.data").stat().st_size == (trained / "model.onnx.data").stat().st_size
    ids = np.asarray([list(text.read_text().encode())[:60]]) % 250 + 3
    reference = ort_logits_for_ids(source, ids)
    assert mean_kl(reference, ort_logits_for_ids(trained, ids)) < mean_kl(reference, ort_logits_for_ids(plain, ids))


def plain_and_trained(planted_model, profile, tmp_path, learning_rate=2e-2, base=DISTILL_W4, **fields):
    """A plain build of recipe ``base`` and one distilled for 40 steps with ``fields``: (distill note, plain
    constants, trained constants)."""
    folder, _ = planted_model
    quantize_model(folder, tmp_path / "plain", make_recipe(**base), profile)
    trained = make_recipe(**base, distill_steps=40, distill_lr=learning_rate, distill_samples=6, **fields)
    manifest = quantize_model(folder, tmp_path / "trained", trained, profile)
    note = next(note for note in manifest["notes"] if note.startswith("distill_scales"))
    return note, stored_initializers(tmp_path / "plain"), stored_initializers(tmp_path / "trained")


def planted_export(root, model_type, seed=3):
    """A tiny ``model_type`` decoder whose input and post-attention RMSNorm gains scale channels ``PLANTED`` by 100
    (so q/k/v and gate/up read outlier channels, as in the shared planted Llama), exported under ``root`` with its
    calibration text and profile: (export folder, text path, profile folder)."""
    hf = planted_checkpoint(root / "hf", model_type, seed=seed)
    export_model(str(hf), root / "onnx")
    text = root / "text.txt"
    text.write_text(TEXT)
    calibrate(root / "onnx", root / "profile", CalibrationConfig(source=str(text), samples=SAMPLES, seq_len=SEQ_LEN,
                                                                policy=OutlierPolicy(name="ratio", k=2, ratio=20.0)))
    return root / "onnx", text, root / "profile"
