"""GGUF files of Gemma 2, Gemma 3 and Phi-3: the conversion gives back the weights of the model a file was written
from, its export gives that model's logits, and metadata that disagrees with the tensors is refused with one line.

The files are written here from tiny random-init transformers models (the configs of tests/helpers/models.py) in
llama.cpp's layout, spelled out below independently of the kit and of transformers' loader: llama.cpp's tensor
names, Gemma's norm gains stored as (1 + w), Phi-3's fused qkv and gate_up projections stored as they are, and the
metadata keys its converter writes. A file cannot say everything a Hugging Face config can: llama.cpp scales Gemma's
queries by 1/sqrt(head width) below 27B and gives Gemma 3 five windowed layers, with rope base 10000, to each global
one, so the tiny models here follow those rules (``OVERRIDES``). One projection is Q8_0, and the reference model
holds its values as an independent NumPy Q8_0 decoder reads them, so every weight must match exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.models import load_torch_model, make_tiny_checkpoint

gguf = pytest.importorskip("gguf", reason="writing GGUF files needs the gguf package ([export] extra)")
torch = pytest.importorskip("torch", reason="the reference models need torch ([export] extra)")
pytest.importorskip("transformers", reason="converting GGUF files needs transformers ([export] extra)")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="reading the converted weights needs safetensors")

from accullm_export.cli.main import main  # noqa: E402
from accullm_export.models.gguf_convert import check_gguf, gguf_checkpoint_folder  # noqa: E402
from accullm_export.runtime import OrtCausalLM  # noqa: E402
from accullm_export.runtime.base import position_ids_from_mask  # noqa: E402

SLIDING, FULL = "sliding_attention", "full_attention"
ATOL = 1e-4
MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}  # GGUF architecture -> model_type
OVERRIDES = {
    "gemma2": dict(query_pre_attn_scalar=16),  # its head width
    "gemma3": dict(num_hidden_layers=6, layer_types=[SLIDING] * 5 + [FULL], query_pre_attn_scalar=256,
                   final_logit_softcapping=3.0,
                   rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                    FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}),
    "phi3": {},
}
# llama.cpp's names for the Hugging Face modules of one decoder layer
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
# Gemma's post_attention_layernorm normalizes the attention output; Phi-3's is the norm before the MLP
POST_ATTENTION_NORM = {"gemma2": "post_attention_norm", "gemma3": "post_attention_norm", "phi3": "ffn_norm"}
Q8_0_TENSOR = "model.layers.0.mlp.down_proj.weight"
# Gemma's norm gains go on a 2^-20 grid, where llama.cpp's w + 1 and the loader's - 1 are exact in float32
GAIN_GRID = 2.0 ** 20


# ------------------------------------------------------------------------------------------------ the models
def gguf_name(hf_name: str, architecture: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    names = {**LAYER_NAMES, "post_attention_layernorm": POST_ATTENTION_NORM[architecture]}
    return f"blk.{layer}.{names[module]}.{kind}"


def q8_0_values(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 as GGML lays it out: blocks of 34 bytes, an fp16 scale then 32 int8 values, each worth scale * int8."""
    grouped = blocks.reshape(blocks.shape[0], -1, 34)
    scale = np.ascontiguousarray(grouped[..., :2]).view("<f2").astype(np.float32)
    values = np.ascontiguousarray(grouped[..., 2:]).view(np.int8).astype(np.float32)
    return (scale * values).reshape(blocks.shape[0], -1)


def tiny_model(root: Path, architecture: str, **overrides):
    """(model, Q8_0 blocks of ``Q8_0_TENSOR``): a tiny random-init model holding exactly what its GGUF file holds."""
    folder = make_tiny_checkpoint(root / f"{architecture}-hf", MODEL_TYPES[architecture],
                                  **{**OVERRIDES[architecture], **overrides})
    model = load_torch_model(folder)
    state = model.state_dict()
    blocks = gguf.quants.quantize(state[Q8_0_TENSOR].numpy(), gguf.GGMLQuantizationType.Q8_0)
    with torch.no_grad():
        state[Q8_0_TENSOR].copy_(torch.from_numpy(q8_0_values(blocks)))
        if architecture.startswith("gemma"):
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(torch.round(param * GAIN_GRID) / GAIN_GRID)
    return model, blocks


def metadata_of(model, architecture: str) -> dict:
    """What llama.cpp's converter writes for this model, by GGUFWriter ``add_*`` suffix."""
    config = model.config
    values = {"block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
              "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
              "head_count": config.num_attention_heads, "head_count_kv": config.num_key_value_heads,
              "layer_norm_rms_eps": config.rms_norm_eps, "sliding_window": config.sliding_window}
    if architecture.startswith("gemma"):
        values |= {"key_length": config.head_dim, "value_length": config.head_dim}
    if architecture == "gemma2":
        values |= {"attn_logit_softcapping": config.attn_logit_softcapping,
                   "final_logit_softcapping": config.final_logit_softcapping}
    if architecture == "gemma3":
        full = config.rope_parameters[FULL]
        values |= {"final_logit_softcapping": config.final_logit_softcapping, "rope_freq_base": full["rope_theta"],
                   "rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": full["factor"]}
    if architecture == "phi3":
        values |= {"rope_freq_base": config.rope_parameters["rope_theta"],
                   "rope_dimension_count": config.hidden_size // config.num_attention_heads}
    return values


def write_gguf(path: Path, model, blocks: np.ndarray, architecture: str, *, metadata=None, drop=(),
               extra_tensors=None) -> Path:
    """The model as llama.cpp's converter writes it: F32 tensors but ``Q8_0_TENSOR``, a 256-token byte-level
    vocabulary. ``metadata`` overrides the converter's values and ``drop`` leaves some out, by ``add_*`` suffix."""
    from tokenizers import pre_tokenizers

    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in {**metadata_of(model, architecture), **(metadata or {})}.items():
        if key not in drop and value is not None:
            getattr(writer, f"add_{key}")(value)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())  # the tiny models' tokenizer (tests/helpers/models.py)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))  # no merges: the writer leaves an empty merge list out
    for role in ("bos", "eos", "pad"):
        getattr(writer, f"add_{role}_token_id")(getattr(model.config, f"{role}_token_id"))
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied head
        if name == Q8_0_TENSOR:
            writer.add_tensor(gguf_name(name, architecture), blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        values = value.numpy()
        if architecture.startswith("gemma") and name.endswith("norm.weight"):
            values = values + np.float32(1.0)  # Gemma's gain is 1 + w, and llama.cpp stores that sum
        writer.add_tensor(gguf_name(name, architecture), np.ascontiguousarray(values))
    for name, shape in (extra_tensors or {}).items():
        writer.add_tensor(name, np.ones(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """GGUF architecture -> (tiny model, its Q8_0 blocks)."""
    root = tmp_path_factory.mktemp("gguf-architectures-hf")
    return {architecture: tiny_model(root, architecture) for architecture in MODEL_TYPES}


@pytest.fixture(scope="module", params=sorted(MODEL_TYPES))
def converted(request, models, tmp_path_factory):
    """(architecture, reference model, converted folder, exported folder) of each architecture's GGUF file."""
    architecture = request.param
    model, blocks = models[architecture]
    root = tmp_path_factory.mktemp(f"gguf-{architecture}")
    path = write_gguf(root / f"tiny-{architecture}.gguf", model, blocks, architecture)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ACCULLM_CACHE", str(root / "cache"))
        folder = gguf_checkpoint_folder(path)
        assert main(["export", str(path), "-o", str(root / "onnx")]) == 0
    return architecture, model, folder, root / "onnx"


# ------------------------------------------------------------------------------------------------ conversion
def test_the_converted_weights_are_the_models(converted):
    architecture, model, folder, _ = converted
    weights = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    expected = {name: value.numpy() for name, value in model.state_dict().items()
                if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert sorted(weights) == sorted(expected)
    for name, value in expected.items():
        got = weights[name]
        assert got.dtype == np.float32 and got.shape == value.shape, name
        mismatched = np.flatnonzero(got.view(np.uint32) != value.view(np.uint32))
        assert mismatched.size == 0, f"{name}: {mismatched.size} values differ"


def test_the_reference_q8_0_decoder_matches_the_gguf_package():
    original = (0.1 * np.random.default_rng(0).standard_normal((8, 128))).astype(np.float32)
    blocks = gguf.quants.quantize(original, gguf.GGMLQuantizationType.Q8_0)
    decoded = q8_0_values(blocks)
    np.testing.assert_array_equal(decoded, gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0))
    assert not np.array_equal(decoded, original) and np.abs(decoded - original).max() < 1e-2


def test_gemma_norm_gains_are_stored_plus_one(models, tmp_path):
    model, blocks = models["gemma2"]
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "gemma2.gguf", model, blocks, "gemma2")))
    stored = next(tensor for tensor in reader.tensors if tensor.name == "blk.0.attn_norm.weight")
    gain = model.state_dict()["model.layers.0.input_layernorm.weight"].numpy()
    assert np.any(gain != 0)
    np.testing.assert_array_equal(np.asarray(stored.data), gain + np.float32(1.0))


def test_the_config_carries_what_the_file_says(converted):
    """The entries transformers' GGUF loader drops or misreads, as the model has them."""
    architecture, model, folder, _ = converted
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[architecture]
    keys = {"gemma2": ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window",
                       "layer_types"),
            "gemma3": ("final_logit_softcapping", "query_pre_attn_scalar", "sliding_window", "layer_types",
                       "rope_parameters"),
            "phi3": ("sliding_window",)}[architecture]
    for key in keys:
        assert config[key] == getattr(model.config, key), key


# ------------------------------------------------------------------------------------------------ export
def test_the_export_gives_the_models_logits(converted):
    """12 tokens: past every window (4 to 6), so the windowed layers differ from global ones."""
    _, model, _, onnx_dir = converted
    ids = np.random.default_rng(0).integers(3, 256, size=(1, 12))
    mask = np.ones_like(ids)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(position_ids_from_mask(mask))).logits.numpy()
    ours = OrtCausalLM.from_path(onnx_dir, device="cpu").full_logits(ids)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < ATOL


# ------------------------------------------------------------------------------------------------ llama.cpp's rules
LLAMA_CPP_RULES = {
    # the 27B models, told by their layer count, scale queries by 1/sqrt(hidden / heads): here 64 / 4, not 32
    "gemma2 of 46 layers": ("gemma2", dict(num_hidden_layers=46, head_dim=32), (), {"query_pre_attn_scalar": 16}),
    "gemma3 of 62 layers": ("gemma3", dict(num_hidden_layers=62, head_dim=32, layer_types=None), (),
                            {"query_pre_attn_scalar": 16}),
    "gemma2 without soft-caps or window": ("gemma2", {}, ("attn_logit_softcapping", "final_logit_softcapping",
                                                          "sliding_window"),
                                           {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                            "sliding_window": 4096}),
    "gemma3 without a window": ("gemma3", {}, ("sliding_window",), {"sliding_window": None, "layer_types": [FULL] * 6}),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CPP_RULES))
def test_what_the_metadata_leaves_out_is_read_as_llama_cpp_reads_it(case, tmp_path):
    """The config entries the checks rebuild (which the conversion writes into config.json, as
    test_the_config_carries_what_the_file_says shows); converting 46 or 62 layers would take transformers' loader
    far longer than the rest of this file."""
    architecture, overrides, drop, expected = LLAMA_CPP_RULES[case]
    model, blocks = tiny_model(tmp_path, architecture, **overrides)
    config = check_gguf(write_gguf(tmp_path / "model.gguf", model, blocks, architecture, drop=drop)).config
    assert {key: config[key] for key in expected} == expected


# ------------------------------------------------------------------------------------------------ refusals
REFUSALS = {
    "gemma2 with twice the heads": ("gemma2", dict(metadata={"head_count": 8}),
                                    ("blk.0.attn_q.weight has shape [64, 64], but the metadata calls for [128, 64]",)),
    "gemma2 with a negative soft-cap": ("gemma2", dict(metadata={"attn_logit_softcapping": -2.0}),
                                        ("gemma2.attn_logit_softcapping must be a finite positive number",)),
    "gemma3 with keys wider than values": ("gemma3", dict(metadata={"key_length": 128}),
                                           ("gemma3.attention.value_length (256) differs from the key width (128)",)),
    "gemma3 with a zero window": ("gemma3", dict(metadata={"sliding_window": 0}),
                                  ("gemma3.attention.sliding_window must be a positive integer, got 0",)),
    "gemma3 with a negative rope base": ("gemma3", dict(metadata={"rope_freq_base": -1.0}),
                                         ("gemma3.rope.freq_base must be a finite positive number",)),
    "phi3 with twice the heads": ("phi3", dict(metadata={"head_count": 8}),
                                  ("blk.0.attn_qkv.weight has shape [128, 64], but the metadata calls for [96, 64]",)),
    "phi3 with kv heads that do not divide the heads": ("phi3", dict(metadata={"head_count_kv": 3}),
                                                        ("phi3.attention.head_count (4) is not a multiple of "
                                                         "phi3.attention.head_count_kv (3)",)),
    "phi3 without its feed-forward width": ("phi3", dict(drop=("feed_forward_length",)),
                                            ("has no phi3.feed_forward_length field",)),
    "phi3 with rope over half of each head": ("phi3", dict(metadata={"rope_dimension_count": 8}),
                                              ("rope rotates 8 of the 16 dimensions",)),
    "phi3 with LongRoPE factors": ("phi3", dict(extra_tensors={"rope_factors_long.weight": (8,),
                                                               "rope_factors_short.weight": (8,)}),
                                   ("holds rope_factors_long.weight (LongRoPE factors",)),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_metadata_that_disagrees_is_refused(case, models, tmp_path, monkeypatch, capsys):
    architecture, changes, needles = REFUSALS[case]
    model, blocks = models[architecture]
    path = write_gguf(tmp_path / "model.gguf", model, blocks, architecture, **changes)
    (tmp_path / "cache" / "gguf").mkdir(parents=True)
    monkeypatch.setenv("ACCULLM_CACHE", str(tmp_path / "cache"))
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli(capsys, "export", str(path), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, needles[0])
    line = next(line for line in err.splitlines() if line.strip() and not line.startswith(("I ", "W ")))
    assert all(needle in line for needle in (*needles, "model.gguf")), line
    assert set(tmp_path.rglob("*")) == before, f"left behind: {sorted(set(tmp_path.rglob('*')) - before)}"
