"""ONNX logits of exported tiny decoders equal transformers' (fp32, max abs diff 1e-4), and so does greedy
generation through the KV cache, past every sliding window."""

from __future__ import annotations

import numpy as np
import pytest

from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate
from accullm_export.runtime.base import position_ids_from_mask
from tests.helpers.models import SLIDING_WINDOWS, TINY_ARCHITECTURES, load_torch_model, make_tiny_checkpoint

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


@pytest.mark.parametrize("model_type", sorted(SLIDING_WINDOWS))
def test_sliding_window_is_active(exports, model_type, rng):
    """The window (4 to 6 tokens) must matter: a sequence longer than it differs from a windowless model."""
    hf, onnx_dir = exports[model_type]
    runner = OrtCausalLM.from_path(onnx_dir, device="cpu")
    ids = rng.integers(3, 256, size=(1, 12))
    model = load_torch_model(hf)
    windowed = torch_logits(model, ids)
    model.config.sliding_window = 10_000  # longer than the sequence; keeps Gemma's layer types and ropes
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    unwindowed = torch_logits(model, ids)
    ours = runner.full_logits(ids)
    assert np.abs(windowed[:, 6:] - unwindowed[:, 6:]).max() > 1e-3
    assert np.abs(ours - windowed).max() < ATOL


def torch_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type", ARCHS)
def test_greedy_generation_past_the_window_matches_torch(exports, model_type):
    """A left-padded batch of two prompts, 14 new tokens each: every position past the longest window (6)."""
    hf, onnx_dir = exports[model_type]
    model = load_torch_model(hf)
    prompts = [[5, 17, 99, 3, 44, 8], [7, 200, 31]]
    result = generate(OrtCausalLM.from_path(onnx_dir, device="cpu"), prompts, GenerationConfig(max_new_tokens=14))
    for prompt, tokens in zip(prompts, result.tokens):
        assert tokens == torch_greedy(model, prompt, 14)


def test_gemma_traits_matter(exports, rng):
    """Gemma 2's two soft-caps and Gemma 3's local rope base change the logits, and the export follows each."""
    ids = rng.integers(3, 256, size=(1, 12))
    hf, onnx_dir = exports["gemma2"]
    model = load_torch_model(hf)
    reference = torch_logits(model, ids)
    assert np.abs(OrtCausalLM.from_path(onnx_dir, device="cpu").full_logits(ids) - reference).max() < ATOL
    model.config.final_logit_softcapping = None
    assert np.abs(torch_logits(model, ids) - reference).max() > 1e-2
    model.config.final_logit_softcapping = TINY_ARCHITECTURES["gemma2"][2]["final_logit_softcapping"]
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert np.abs(torch_logits(model, ids) - reference).max() > 1e-2
    hf, onnx_dir = exports["gemma3_text"]
    model = load_torch_model(hf)
    reference = torch_logits(model, ids)
    rotary = model.model.rotary_emb
    rotary.sliding_attention_inv_freq = rotary.full_attention_inv_freq.clone()
    assert np.abs(torch_logits(model, ids) - reference).max() > 1e-2


@pytest.mark.parametrize("attention", ATTENTION)
def test_llama3_rope_scaling_matches_torch(tmp_path, rng, attention):
    """Llama 3.1's frequency-dependent rope scaling, with bands that fall on both sides of the tiny head's
    wavelengths, over 40 positions."""
    from accullm_export.models.export import export_model

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = make_tiny_checkpoint(tmp_path / "hf", "llama", rope_parameters=rope)
    assert load_torch_model(hf).config.rope_parameters["rope_type"] == "llama3"
    export_model(str(hf), tmp_path / "onnx", attention=attention)
    ids = rng.integers(3, 256, size=(1, 40))
    ours = OrtCausalLM.from_path(tmp_path / "onnx", device="cpu").full_logits(ids)
    assert np.abs(ours - torch_logits(load_torch_model(hf), ids)).max() < ATOL


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("attention", ATTENTION)
def test_fp16_export_is_close(tiny_exports, tmp_path, rng, attention, model_type):
    from accullm_export.models.export import export_model

    hf, _ = tiny_exports[model_type]
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


def test_gemma3_layers_read_their_own_rope_and_mask(tiny_exports):
    """The local layer 0 and the global layer 1 read different rotary caches and masks; the Attention carries
    Gemma's scale (1/sqrt(query_pre_attn_scalar)), and Gemma 2's its soft-cap."""
    import onnx
    from onnx import helper

    def attention_nodes(model_type):
        model = onnx.load(str(tiny_exports[model_type][1] / "model.onnx"), load_external_data=False)
        nodes = {node.name: node for node in model.graph.node}
        return [(node, {a.name: helper.get_attribute_value(a) for a in node.attribute},
                 nodes[f"/model/layers.{i}/self_attn/q_rotary/RotaryEmbedding"])
                for i in range(2) for node in [nodes[f"/model/layers.{i}/self_attn/Attention"]]]

    (local, local_attrs, local_rotary), (full, full_attrs, full_rotary) = attention_nodes("gemma3_text")
    assert local.input[3] != full.input[3]
    assert local_rotary.input[1:3] != full_rotary.input[1:3]
    assert local_attrs["scale"] == pytest.approx(128 ** -0.5) == full_attrs["scale"]
    assert "softcap" not in local_attrs
    (_, gemma2_attrs, _), _ = attention_nodes("gemma2")
    assert gemma2_attrs["softcap"] == pytest.approx(2.0)
