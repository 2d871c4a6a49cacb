"""GGUF input: every readable tensor type is dequantized bit for bit as ``gguf.quants.dequantize`` does, and the
metadata checks (architecture, rope, tokenizer, output weight) refuse what the conversion would misread.

The GGUF files are written here with ``gguf.GGUFWriter``: a tiny decoder (2 blocks, hidden 256, so that the
256-value K-quant blocks fit a row) whose tensors cover every type in ``READABLE_TYPES``. Types the ``gguf``
package can quantize are quantized from random data with it; the K-quants, which it cannot, are random block
bytes laid out as the GGML format says, with finite fp16 scales written where the format puts them. The reference
is the installed ``gguf`` package's ``dequantize`` plus, for Llama, the inverse of llama.cpp's q/k row permutation
written here in NumPy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import assert_user_error, run_cli

gguf = pytest.importorskip("gguf", reason="writing GGUF files needs the gguf package ([export] extra)")
pytest.importorskip("transformers", reason="converting GGUF files needs transformers ([export] extra)")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="reading the converted weights needs safetensors")

from accullm_export.models.gguf_convert import READABLE_TYPES, gguf_checkpoint_folder  # noqa: E402

T = gguf.GGMLQuantizationType
VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INNER, LAYERS = 272, 256, 4, 2, 64, 512, 2
# byte offsets of the fp16 fields (scales, minimums) inside one block of each type, from the GGML block layouts
FP16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
# which tensor holds which type: every readable type at least once, the issue's five on several tensors
TYPES = {
    "token_embd.weight": T.Q8_0, "output.weight": T.Q6_K,
    "blk.0.attn_q.weight": T.Q4_K, "blk.0.attn_k.weight": T.Q5_0, "blk.0.attn_v.weight": T.Q5_K,
    "blk.0.attn_output.weight": T.Q6_K, "blk.0.ffn_gate.weight": T.Q8_0, "blk.0.ffn_up.weight": T.Q4_1,
    "blk.0.ffn_down.weight": T.Q2_K,
    "blk.1.attn_q.weight": T.Q3_K, "blk.1.attn_k.weight": T.Q4_0, "blk.1.attn_v.weight": T.Q5_1,
    "blk.1.attn_output.weight": T.BF16, "blk.1.ffn_gate.weight": T.F16, "blk.1.ffn_up.weight": T.Q5_K,
    "blk.1.ffn_down.weight": T.Q4_K,
}
HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


# ------------------------------------------------------------------------------------------------ building files
def byte_level_tokens() -> list[str]:
    """GPT-2's 256 byte-level symbols (printable bytes as themselves, the others shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def shapes(architecture: str, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face (row-major) shapes of the tiny decoder's tensors, under their GGUF names."""
    result = {"token_embd.weight": (vocab_rows, HIDDEN), "output.weight": (vocab_rows, HIDDEN),
              "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        result |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
                   f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                   f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                   f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
                   f"blk.{i}.ffn_gate.weight": (INNER, HIDDEN), f"blk.{i}.ffn_up.weight": (INNER, HIDDEN),
                   f"blk.{i}.ffn_down.weight": (HIDDEN, INNER)}
        if architecture == "qwen2":
            result |= {f"blk.{i}.attn_q.bias": (HEADS * HEAD_DIM,), f"blk.{i}.attn_k.bias": (KV_HEADS * HEAD_DIM,),
                       f"blk.{i}.attn_v.bias": (KV_HEADS * HEAD_DIM,)}
    return result


def k_quant_blocks(rng: np.random.Generator, qtype, rows: int, cols: int) -> np.ndarray:
    """Random K-quant blocks (uint8, one row of blocks per weight row) with finite fp16 scales."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale = (rng.standard_normal((rows, cols // block_values, 1)) * 0.01).astype("<f2")
        raw[..., offset:offset + 2] = scale.view(np.uint8)
    return raw.reshape(rows, -1)


def add_tensor(writer, rng: np.random.Generator, name: str, shape: tuple[int, ...], qtype) -> None:
    values = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if qtype == T.F32:
        writer.add_tensor(name, values + np.float32(1.0) if name.endswith("norm.weight") else values)
    elif qtype == T.F16:
        writer.add_tensor(name, values.astype(np.float16))
    elif qtype in FP16_FIELDS:
        writer.add_tensor(name, k_quant_blocks(rng, qtype, *shape), raw_dtype=qtype)
    else:  # BF16 and the 32-value types: the gguf package quantizes them
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


def write_gguf(path: Path, architecture: str = "llama", *, types=None, metadata=None, drop=(), tokens: int = VOCAB,
               vocab_rows: int = VOCAB, tied: bool = False, extra_tensors=None, raw=None) -> Path:
    """A tiny decoder GGUF file. ``metadata`` maps a GGUFWriter ``add_*`` suffix (or a dotted key) to a value,
    ``drop`` removes metadata entries or tensors by the same names, ``raw`` maps a tensor name to (block bytes,
    type) written as they are."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), architecture)
    values = {"block_count": LAYERS, "context_length": 512, "embedding_length": HIDDEN, "feed_forward_length": INNER,
              "head_count": HEADS, "head_count_kv": KV_HEADS, "layer_norm_rms_eps": 1e-6, "rope_freq_base": 10000.0,
              "rope_dimension_count": HEAD_DIM, "tokenizer_model": "gpt2", "tokenizer_pre": "default",
              "bos_token_id": 0, "eos_token_id": 1, **(metadata or {})}
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    merges = [f"{letters[2 * i]} {letters[2 * i + 1]}" for i in range(tokens - 256)]
    vocabulary = (byte_level_tokens() + [merge.replace(" ", "") for merge in merges])[:tokens]
    for key, value in values.items():
        if key in drop:
            continue
        if "." in key:
            writer.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str)
                                 else gguf.GGUFValueType.FLOAT32 if isinstance(value, float)
                                 else gguf.GGUFValueType.UINT32)
        else:
            getattr(writer, f"add_{key}")(value)
    if "tokens" not in drop:
        writer.add_token_list(vocabulary)
        writer.add_token_types([1] * len(vocabulary))
        writer.add_token_merges(merges)
    types = TYPES if types is None else types
    for name, shape in {**shapes(architecture, vocab_rows), **(extra_tensors or {})}.items():
        if name in (raw or {}):
            writer.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        elif name not in drop and not (tied and name == "output.weight"):
            add_tensor(writer, rng, name, shape, types.get(name, T.F32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------------------ the reference
def hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, layer, module, kind = gguf_name.split(".")
        return f"model.layers.{layer}.{HF_NAMES[module]}.{kind}"
    return {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
            "output_norm.weight": "model.norm.weight"}[gguf_name]


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama q/k permutation, which interleaves the two rotary halves of each head's rows."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def reference(tensor, architecture: str) -> np.ndarray:
    values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if architecture == "llama" and ".attn_q." in tensor.name:
        return unpermute(values, HEADS)
    if architecture == "llama" and ".attn_k." in tensor.name:
        return unpermute(values, KV_HEADS)
    return values


def convert(path: Path, cache: Path, monkeypatch) -> tuple[Path, dict[str, np.ndarray]]:
    monkeypatch.setenv("ACCULLM_CACHE", str(cache))
    folder = gguf_checkpoint_folder(path)
    return folder, safetensors_numpy.load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def converted(request, tmp_path_factory):
    """(architecture, GGUF reader, converted weights) of the all-types file."""
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    path = write_gguf(root / "tiny.gguf", request.param)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _, weights = convert(path, root / "cache", monkeypatch)
    return request.param, gguf.GGUFReader(str(path)), weights


# ------------------------------------------------------------------------------------------------ the types
def test_every_readable_type_is_in_the_test_file():
    assert {qtype.name for qtype in TYPES.values()} | {"F32"} == set(READABLE_TYPES)


@pytest.mark.parametrize("type_name", READABLE_TYPES)
def test_each_type_is_dequantized_bit_for_bit(type_name, converted):
    architecture, reader, weights = converted
    tensors = [tensor for tensor in reader.tensors if tensor.tensor_type.name == type_name]
    assert tensors, f"no {type_name} tensor in the test file"
    for tensor in tensors:
        expected = reference(tensor, architecture)
        got = weights[hf_name(tensor.name)]
        assert got.dtype == np.float32 and got.shape == expected.shape, tensor.name
        assert np.all(np.isfinite(expected)) and np.any(expected != 0), f"{tensor.name}: degenerate test data"
        mismatched = np.flatnonzero(got.view(np.uint32) != expected.view(np.uint32))
        assert mismatched.size == 0, f"{tensor.name} ({type_name}): {mismatched.size} values differ"


def test_the_reference_permutation_is_the_inverse_of_llama_cpps():
    """llama.cpp's converter permutes q/k rows as below; the test's unpermute must undo exactly that."""
    rows = np.arange(HEADS * HEAD_DIM * 3, dtype=np.float32).reshape(HEADS * HEAD_DIM, 3)
    permuted = rows.reshape(HEADS, 2, HEAD_DIM // 2, 3).swapaxes(1, 2).reshape(rows.shape)
    assert not np.array_equal(permuted, rows)
    np.testing.assert_array_equal(unpermute(permuted, HEADS), rows)


def test_the_untied_output_weight_becomes_lm_head(converted, tmp_path):
    architecture, reader, weights = converted
    output = next(tensor for tensor in reader.tensors if tensor.name == "output.weight")
    np.testing.assert_array_equal(weights["lm_head.weight"], reference(output, architecture))
    assert not np.array_equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_a_missing_output_weight_means_tied(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tied.gguf", tied=True)
    folder, weights = convert(path, tmp_path / "cache", monkeypatch)
    assert "lm_head.weight" not in weights
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.slow
def test_the_sample_tensors_are_dequantized_bit_for_bit():
    """The sample's own Q8_0 embedding and Q4_1 projections (q permuted) in its cached conversion."""
    from accullm_export.errors import UserError
    from accullm_export.models.sample import sample_checkpoint_folder, sample_gguf_path

    try:
        path = sample_gguf_path("smollm2-135m")
    except UserError as exc:
        pytest.skip(f"the sample is not installed: {exc}")
    reader = gguf.GGUFReader(str(path))
    weights = safetensors_numpy.load_file(str(sample_checkpoint_folder("smollm2-135m") / "model.safetensors"))
    heads = int(reader.get_field("llama.attention.head_count").contents())
    checked = set()
    for tensor in reader.tensors:
        if tensor.name not in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_up.weight"):
            continue
        expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if ".attn_q." in tensor.name:
            expected = unpermute(expected, heads)
        np.testing.assert_array_equal(weights[hf_name(tensor.name)].view(np.uint32), expected.view(np.uint32))
        checked.add(tensor.tensor_type.name)
    assert checked == {"Q8_0", "Q4_1"}


# ------------------------------------------------------------------------------------------------ refusals
def refused(capsys, tmp_path: Path, path: Path, *needles: str) -> str:
    """Export ``path``: exit 2, one line holding every needle, nothing new under ``tmp_path``."""
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli(capsys, "export", str(path), "-o", str(tmp_path / "out"))
    assert_user_error(code, err, needles[0])
    line = next(line for line in err.splitlines() if line.strip() and not line.startswith(("I ", "W ")))
    assert all(needle in line for needle in needles), line
    assert set(tmp_path.rglob("*")) == before, f"left behind: {sorted(set(tmp_path.rglob('*')) - before)}"
    return line


@pytest.mark.parametrize("type_name", ["IQ4_NL", "MXFP4", "TQ2_0"])
def test_a_type_the_kit_cannot_read_is_refused(type_name, gguf_cache, tmp_path, capsys):
    qtype = T[type_name]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.random.default_rng(1).integers(0, 256, (INNER, HIDDEN // block_values * block_bytes), np.uint8)
    path = write_gguf(tmp_path / "model.gguf", types={}, raw={"blk.1.ffn_up.weight": (blocks, qtype)})
    refused(capsys, tmp_path, path, f"tensor blk.1.ffn_up.weight has type {type_name}", "cannot dequantize",
            "Q4_K")


METADATA_CASES = {
    "unsupported architecture": (dict(architecture="gpt2"), ("unsupported GGUF architecture 'gpt2'",
                                                             "supported: llama, mistral, qwen2, qwen3")),
    "negative rope base": (dict(metadata={"rope_freq_base": -1.0}), ("rope.freq_base must be a finite positive",)),
    "rope over half of each head": (dict(metadata={"rope_dimension_count": HEAD_DIM // 2}),
                                    ("rope rotates 32 of the 64 dimensions", "only full-head rope")),
    "yarn rope scaling": (dict(metadata={"llama.rope.scaling.type": "yarn"}), ("unsupported rope scaling 'yarn'",
                                                                         "supported: none, linear")),
    "linear rope scaling without a factor": (dict(metadata={"llama.rope.scaling.type": "linear"}),
                                             ("linear rope scaling needs a finite positive",)),
    "per-frequency rope factors": (dict(extra_tensors={"rope_freqs.weight": (HEAD_DIM // 2,)}),
                                   ("holds rope_freqs.weight",)),
    "no tokenizer": (dict(drop=["tokenizer_model"]), ("has no tokenizer",)),
    "no tokenizer vocabulary": (dict(drop=["tokens"]), ("has no tokenizer vocabulary",)),
    "more tokens than embedding rows": (dict(tokens=VOCAB, vocab_rows=VOCAB - 16),
                                        ("the tokenizer has 272 tokens, but token_embd.weight has only 256 rows",)),
    "vocab_size not the embedding's": (dict(metadata={"vocab_size": VOCAB + 1}),
                                       ("llama.vocab_size is 273, but token_embd.weight has 272 rows",)),
    "eos id outside the vocabulary": (dict(metadata={"eos_token_id": VOCAB}),
                                      ("tokenizer.ggml.eos_token_id is 272, outside the 272 tokens",)),
    "output weight not the embedding's shape": (dict(extra_tensors={"output.weight": (VOCAB - 16, HIDDEN)}),
                                                ("output.weight has shape [256, 256]", "must match the embedding")),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_metadata_the_conversion_would_misread_is_refused(case, gguf_cache, tmp_path, capsys):
    changes, needles = METADATA_CASES[case]
    path = write_gguf(tmp_path / "model.gguf", types={}, **changes)
    refused(capsys, tmp_path, path, *needles, "model.gguf")


def test_linear_rope_scaling_is_carried_into_the_config(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "linear.gguf", types={},
                      metadata={"llama.rope.scaling.type": "linear", "rope_scaling_factor": 4.0})
    folder, _ = convert(path, tmp_path / "cache", monkeypatch)
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "linear" and rope["factor"] == 4.0 and rope["rope_theta"] == 10000.0


def test_embedding_rows_beyond_the_tokenizer_set_the_vocab_size(tmp_path, monkeypatch):
    """Padding rows (more embedding rows than tokens, no vocab_size key) are kept: vocab_size is the row count."""
    path = write_gguf(tmp_path / "padded.gguf", types={}, tokens=VOCAB - 8)
    folder, weights = convert(path, tmp_path / "cache", monkeypatch)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == VOCAB
    assert weights["model.embed_tokens.weight"].shape == (VOCAB, HIDDEN)
