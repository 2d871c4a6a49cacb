"""ONNX logits of exported tiny decoders equal transformers' (fp32, max abs diff 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

from accullm_export.runtime import OrtCausalLM
from accullm_export.runtime.base import position_ids_from_mask
from tests.helpers.models import TINY_ARCHITECTURES, load_torch_model

torch = pytest.importorskip("torch", reason="parity tests compare against torch (the [export] extra)")

ATOL = 1e-4
ARCHS = sorted(TINY_ARCHITECTURES)
ATTENTION = ["fused", "decomposed"]


@pytest.fixture(params=ATTENTION)
def exports(request):
    """Both attention formulations: opset 23's fused ops and the opset-21 decomposition."""
    name = "tiny_exports" if request.param == "fused" else "tiny_decomposed_exports"
    return request.getfixturevalue(name)


def torch_logits(model, ids, mask=None):
    ids_t = torch.tensor(ids)
    mask = np.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(position_ids_from_mask(mask)))
    return out.logits.numpy()


@pytest.mark.parametrize("model_type", ARCHS)
def test_prefill_matches_torch(exports, model_type, rng):
    hf, onnx_dir = exports[model_type]
    ids = rng.integers(3, 256, size=(1, 12))
    ours = OrtCausalLM.from_path(onnx_dir, device="cpu").full_logits(ids)
    reference = torch_logits(load_torch_model(hf), ids)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < ATOL


@pytest.mark.parametrize("model_type", ARCHS)
def test_decode_through_kv_cache_matches_torch(exports, model_type, rng):
    """Prefill 6 tokens, then 8 single-token steps through the cache; each step's logits match torch."""
    hf, onnx_dir = exports[model_type]
    runner = OrtCausalLM.from_path(onnx_dir, device="cpu")
    ids = rng.integers(3, 256, size=(1, 14))
    reference = torch_logits(load_torch_model(hf), ids)
    mask = np.ones((1, 6), dtype=np.int64)
    logits, past = runner.forward(ids[:, :6], mask, np.arange(6)[None], runner.empty_cache(1))
    assert np.abs(logits - reference[:, :6]).max() < ATOL
    for step in range(6, 14):
        mask = np.ones((1, step + 1), dtype=np.int64)
        logits, past = runner.forward(ids[:, step:step + 1], mask, np.array([[step]]), past)
        assert past[0][0].shape[2] == step + 1
        assert np.abs(logits[:, 0] - reference[:, step]).max() < ATOL, f"step {step}"


@pytest.mark.parametrize("model_type", ARCHS)
def test_batch_two_with_left_padding_matches_torch(exports, model_type, rng):
    hf, onnx_dir = exports[model_type]
    runner = OrtCausalLM.from_path(onnx_dir, device="cpu")
    ids = rng.integers(3, 256, size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    ours = runner.full_logits(ids, mask)
    reference = torch_logits(load_torch_model(hf), ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - reference[real]).max() < ATOL
    # the padded row's real tokens give the same logits as that prompt alone
    alone = runner.full_logits(ids[1:, 4:])
    assert np.abs(alone[0] - ours[1, 4:]).max() < ATOL


def test_batched_decode_with_left_padding_matches_torch(exports, rng):
    hf, onnx_dir = exports["llama"]
    runner = OrtCausalLM.from_path(onnx_dir, device="cpu")
    ids = rng.integers(3, 256, size=(2, 12))
    ids[1, :3] = 0
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    reference = torch_logits(load_torch_model(hf), ids, mask)
    positions = position_ids_from_mask(mask)
    logits, past = runner.forward(ids[:, :8], mask[:, :8], positions[:, :8], runner.empty_cache(2))
    for step in range(8, 12):
        logits, past = runner.forward(ids[:, step:step + 1], mask[:, :step + 1], positions[:, step:step + 1], past)
        assert np.abs(logits[:, 0] - reference[:, step]).max() < ATOL


def test_sliding_window_is_active(exports, rng):
    """Mistral's window (5) must matter: a sequence longer than it differs from a windowless model."""
    hf, onnx_dir = exports["mistral"]
    runner = OrtCausalLM.from_path(onnx_dir, device="cpu")
    ids = rng.integers(3, 256, size=(1, 12))
    model = load_torch_model(hf)
    windowed = torch_logits(model, ids)
    model.config.sliding_window = None
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    unwindowed = torch_logits(model, ids)
    ours = runner.full_logits(ids)
    assert np.abs(windowed[:, 6:] - unwindowed[:, 6:]).max() > 1e-3
    assert np.abs(ours - windowed).max() < ATOL


@pytest.mark.parametrize("attention", ATTENTION)
def test_fp16_export_is_close(tiny_exports, tmp_path, rng, attention):
    from accullm_export.models.export import export_model

    hf, _ = tiny_exports["llama"]
    export_model(str(hf), tmp_path / "fp16", dtype="fp16", attention=attention)
    runner = OrtCausalLM.from_path(tmp_path / "fp16", device="cpu")
    assert runner.layout.kv_dtype == np.float16
    ids = rng.integers(3, 256, size=(1, 12))
    ours = runner.full_logits(ids)
    reference = torch_logits(load_torch_model(hf), ids)
    assert ours.dtype == np.float32
    assert np.abs(ours - reference).max() < 2e-2
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


def test_attention_formulations_and_opsets(tiny_exports, tiny_decomposed_exports):
    import onnx

    for exports, opset, op in ((tiny_exports, 23, "Attention"), (tiny_decomposed_exports, 21, "Softmax")):
        model = onnx.load(str(exports["llama"][1] / "model.onnx"), load_external_data=False)
        assert {o.domain: o.version for o in model.opset_import}[""] == opset
        assert sum(node.op_type == op for node in model.graph.node) == 2  # one per layer
