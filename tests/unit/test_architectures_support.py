"""Which architectures export, how their config.json is read, what is refused, and that the new ones (Gemma 2,
Gemma 3, Phi-3) go through calibrate, quantize and validate and load in onnxruntime-genai."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from accullm_export.errors import UserError
from accullm_export.graph.linear import find_linear_layers
from accullm_export.models.architectures import SUPPORTED_ARCHITECTURES, decoder_config_from_hf
from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.genai import genai_greedy
from tests.helpers.models import TEXT, TINY_ARCHITECTURES, TINY_BASE, load_torch_model, make_tiny_checkpoint

NEW_ARCHITECTURES = ["gemma2", "gemma3_text", "phi3"]


def hub_config(model_type: str, **entries) -> dict:
    return {**TINY_BASE, "model_type": model_type, "num_hidden_layers": 6, **entries}


def test_every_architecture_has_a_tiny_model_and_a_genai_type():
    assert set(TINY_ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)


def test_gemma3_hub_config_without_layer_types():
    """The older config.json form: every sixth layer global (sliding_window_pattern), local layers on
    rope_local_base_freq with a plain rope, rope_scaling only on the global layers."""
    config = decoder_config_from_hf(hub_config(
        "gemma3_text", head_dim=256, sliding_window=512, sliding_window_pattern=6, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh"))
    windows = [config.layer(i).sliding_window for i in range(6)]
    assert windows == [512] * 5 + [None]
    local, full = config.layer(0), config.layer(5)
    assert (local.rope_theta, dict(local.rope_parameters)) == (10_000.0, {})
    assert full.rope_theta == 1_000_000.0 and full.rope_parameters["factor"] == 8.0
    expected = 1.0 / 1_000_000.0 ** (np.arange(0, 256, 2) / 256) / 8.0
    np.testing.assert_allclose(config.inv_freq(5), expected, rtol=1e-12)
    assert config.activation == "gelu_tanh" and config.query_scale == pytest.approx(1 / 16)
    assert config.traits.norm_gain_offset == 1.0 and config.traits.qk_norm and config.final_softcap is None


def test_gemma2_hub_config_alternates_windows_and_reads_soft_caps():
    config = decoder_config_from_hf(hub_config(
        "gemma2", head_dim=16, sliding_window=4096, hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=144, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0))
    assert [config.layer(i).sliding_window for i in range(6)] == [4096, None] * 3
    assert (config.attention_softcap, config.final_softcap) == (50.0, 30.0)
    assert config.query_scale == pytest.approx(1 / 12)


def test_phi3_mini_4k_config_windows_every_layer():
    config = decoder_config_from_hf(hub_config("phi3", sliding_window=2047, rope_scaling=None, hidden_act="silu"))
    assert {config.layer(i).sliding_window for i in range(6)} == {2047}
    assert config.traits.fused_projections and config.activation == "silu"


@pytest.mark.parametrize(("entries", "message"), [
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                             "long_factor": [2.0] * 8}}, "unsupported rope type 'longrope'"),
    ({"model_type": "phi3", "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
     "Phi-3 128k"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "not a causal decoder"),
    ({"model_type": "gemma2", "hidden_activation": "relu"}, "unsupported hidden_activation 'relu'"),
    ({"model_type": "gemma3_text", "layer_types": ["sliding_attention"]}, "layer_types must list 6 entries"),
])
def test_refused_options_say_why(entries, message):
    with pytest.raises(UserError, match=message):
        decoder_config_from_hf(hub_config(**entries)).check_rope()


def test_unsupported_model_type_exits_2_listing_the_supported(capsys, tmp_path):
    folder = tmp_path / "falcon"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    code, _, err = run_cli(capsys, "export", str(folder), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "unsupported architecture 'FalconForCausalLM'")
    for model_type in SUPPORTED_ARCHITECTURES:
        assert f"({model_type})" in err or model_type.capitalize() in err, model_type
    assert not (tmp_path / "out").exists()


def test_phi3_fused_projections_are_split_into_the_usual_layers(tiny_exports):
    """q/k/v and gate/up become separate MatMuls holding row slices of qkv_proj and gate_up_proj."""
    from safetensors.numpy import load_file

    hf, folder = tiny_exports["phi3"]
    stored = load_file(str(hf / "model.safetensors"))
    model = onnx.load(str(folder / "model.onnx"))
    weights = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    qkv = stored["model.layers.1.self_attn.qkv_proj.weight"]
    np.testing.assert_array_equal(weights["model.layers.1.self_attn.k_proj.MatMul.weight"], qkv[64:96].T)
    gate_up = stored["model.layers.1.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(weights["model.layers.1.mlp.up_proj.MatMul.weight"], gate_up[128:].T)
    names = {layer.node.rsplit("/", 2)[1] for layer in find_linear_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def test_a_fused_projection_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from accullm_export.models.checkpoint import load_checkpoint

    hf = make_tiny_checkpoint(tmp_path / "phi3", "phi3")
    tensors = load_file(str(hf / "model.safetensors"))
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = tensors["model.layers.0.self_attn.qkv_proj.weight"][:-16]
    save_file(tensors, str(hf / "model.safetensors"))
    with pytest.raises(UserError, match=r"qkv_proj.weight' has shape \[112, 64\], but config.json implies \[128, 64\]"):
        load_checkpoint(str(hf))


@pytest.mark.parametrize("model_type", NEW_ARCHITECTURES)
def test_down_projections_are_found_by_structure(tiny_exports, model_type):
    """SwiGLU and GeGLU down projections are found by what feeds them, whatever the nodes are called."""
    model = onnx.load(str(tiny_exports[model_type][1] / "model.onnx"), load_external_data=False)
    for index, node in enumerate(model.graph.node):
        node.name = f"n{index}"
    down = [layer for layer in find_linear_layers(model) if layer.is_mlp_down_projection]
    assert len(down) == 2 and {layer.in_features for layer in down} == {128}


@pytest.mark.parametrize("model_type", NEW_ARCHITECTURES)
def test_w4a16_fast_builds_and_validates(model_type, tmp_path):
    """export, calibrate, quantize (the w4a16-fast preset), validate on each new tiny architecture."""
    from accullm_export.build.pipeline import BuildOptions, build
    from accullm_export.recipes.presets import get_preset
    from accullm_export.runtime import OrtCausalLM

    hf = make_tiny_checkpoint(tmp_path / "hf", model_type)
    (tmp_path / "text.txt").write_text(TEXT)
    options = BuildOptions(target="cpu", recipe=get_preset("w4a16-fast").resolve("onnxruntime"),
                           calib=str(tmp_path / "text.txt"), calib_samples=4, calib_seq_len=40, validation_windows=2,
                           validation_seq_len=32, validation_prompts=1, gates={"max-kl": 0.05})
    manifest = build(str(hf), tmp_path / "out", options)
    assert manifest["status"] == "ok"
    assert [step["name"] for step in manifest["steps"]] == ["export", "calibrate", "quantize", "validate", "target"]
    assert all(gate["passed"] for gate in manifest["accuracy"]["gates"])
    quantized = json.loads((tmp_path / "out/model/manifest.json").read_text())
    assert {layer["precision"] for layer in quantized["layers"]} == {"int4"} and len(quantized["layers"]) == 15
    logits = OrtCausalLM.from_path(tmp_path / "out/model", device="cpu").full_logits(np.array([[5, 17, 99, 3]]))
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_onnxruntime_genai_generates_what_torch_does(tiny_exports, model_type):
    """onnxruntime-genai runs every exported folder unchanged, past the sliding windows."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is the [genai] extra")
    torch = pytest.importorskip("torch", reason="greedy references come from torch (the [export] extra)")
    hf, folder = tiny_exports[model_type]
    prompt, new_tokens = [7, 200, 31, 5, 17], 12
    produced = genai_greedy(og.Model(str(folder)), prompt, new_tokens)
    ids = torch.tensor([prompt])
    reference = load_torch_model(hf)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, reference(ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = ids[0, len(prompt):].tolist()
    assert produced == expected[:len(produced)] and len(produced) >= new_tokens - 1  # genai drops a final EOS


@pytest.mark.parametrize(("model_type", "fused_attention"), [("gemma2", 0), ("gemma3_text", 2), ("phi3", 2)])
def test_onnxruntime_fusions_keep_windows_ropes_and_scale(tiny_exports, tmp_path, model_type, fused_attention):
    """GroupQueryAttention takes each layer's own rotary caches, mask and scale (Gemma 2's soft-capped attention
    stays standard, with a note); the logits past the window, prefill and decode, do not move."""
    from collections import Counter

    from accullm_export.graph.ir import load_graph, save_graph
    from accullm_export.graph.pipeline import run_passes
    from accullm_export.runtime import OrtCausalLM

    folder = tiny_exports[model_type][1]
    graph, model = load_graph(folder / "model.onnx")
    graph, reports, _ = run_passes(graph, [("fuse_group_query_attention", None), ("fuse_skip_rms_norm", None)])
    (tmp_path / "fused").mkdir()
    save_graph(graph, model, tmp_path / "fused/model.onnx", {})
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "fused/model.onnx")).graph.node)
    notes = [note for report in reports for note in report.notes]
    assert ops["GroupQueryAttention"] == fused_attention and ops["Attention"] == 2 - fused_attention
    assert bool([note for note in notes if "softcap" in note]) == (fused_attention == 0)
    ids = np.random.default_rng(5).integers(3, 256, size=(1, 14))
    runs = []
    for path in (folder / "model.onnx", tmp_path / "fused/model.onnx"):
        runner = OrtCausalLM.from_path(path, device="cpu", optimization="basic")
        logits, cache = runner.forward(ids[:, :9], np.ones((1, 9), np.int64), np.arange(9)[None],
                                       runner.empty_cache(1))
        steps = [logits[0]]
        for step in range(9, 14):
            logits, cache = runner.forward(ids[:, step:step + 1], np.ones((1, step + 1), np.int64),
                                           np.array([[step]]), cache)
            steps.append(logits[0])
        runs.append(np.concatenate(steps))
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4, atol=1e-4)
