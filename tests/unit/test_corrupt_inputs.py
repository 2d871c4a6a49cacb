"""Corrupt, truncated and foreign files, broken data-loader scripts, binary text and a --mode that does not fit.

Every case asserts the contract: exit code 2, one stderr line naming the problem, no traceback, nothing left behind
(no output folder, no staging folder, no temp file: the tree under tmp_path is as it was before the command), and a
canary file outside the inputs untouched. Every malformed file is generated here, from the tiny models.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.graphs import make_mlp
from tests.helpers.models import make_tiny_checkpoint
from tests.helpers.recipes import make_recipe, write_config

CANARY = b"canary: a file beside the inputs; no command may change it\n"


@pytest.fixture(autouse=True)
def canary(tmp_path):
    path = tmp_path / "outside" / "canary.bin"
    path.parent.mkdir()
    path.write_bytes(CANARY)
    yield path
    assert path.read_bytes() == CANARY


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder (config.json, safetensors, tokenizer files)."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("corrupt") / "hf", "llama", seed=1)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "\u0002"}))
    return folder


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def refused(capsys, root: Path, argv: list[str], *needles: str) -> str:
    """Run the command; assert the contract (exit 2, one line holding every needle, nothing new under ``root``)."""
    before = tree(root)
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, needles[0])
    line = next(line for line in err.splitlines() if line.strip() and not line.startswith(("I ", "W ")))
    assert all(needle in line for needle in needles), err
    assert tree(root) == before, f"left behind: {sorted(tree(root) - before)}"
    return line


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    return copy


# ---------------------------------------------------------------------------------------------------- GGUF
def gguf_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv_string(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)


def kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", 4, value)


EMBED = np.zeros((4, 8), np.float32).tobytes()


def gguf_bytes(*, magic=b"GGUF", version=3, tensors=None, kvs=None, tensor_count=None, kv_count=None,
               alignment=32, extra_kvs=()) -> bytes:
    """A GGUF file written field by field: tensors are (name, dims, ggml type, data[, offset])."""
    tensors = [("token_embd.weight", [8, 4], 0, EMBED)] if tensors is None else tensors
    kvs = [kv_string("general.architecture", "llama")] if kvs is None else kvs
    kvs = [*kvs, *extra_kvs]
    head = magic + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                               len(kvs) if kv_count is None else kv_count) + b"".join(kvs)
    data = b""
    for name, dims, ggml_type, raw, *offset in tensors:
        head += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", ggml_type, offset[0] if offset else len(data))
        data += raw + b"\0" * (-len(raw) % alignment)
    return head + b"\0" * (-len(head) % alignment) + data


GGUF_FILES = {
    "bad magic": (lambda: gguf_bytes(magic=b"GGUX"), "does not start with the GGUF magic"),
    "zero bytes": (lambda: b"", "does not start with the GGUF magic"),
    "magic only": (lambda: b"GGUF", "not a valid GGUF file"),
    "unknown version": (lambda: gguf_bytes(version=9), "not a valid GGUF file"),
    "truncated header": (lambda: gguf_bytes()[:20], "not a valid GGUF file"),
    "truncated key-value data": (lambda: gguf_bytes()[:40], "not a valid GGUF file"),
    "truncated tensor data": (lambda: gguf_bytes()[:-60], "not a valid GGUF file"),
    "absurd tensor count": (lambda: gguf_bytes(tensor_count=2**62), "not a valid GGUF file"),
    "absurd key-value count": (lambda: gguf_bytes(kv_count=2**62), "not a valid GGUF file"),
    "absurd dims": (lambda: gguf_bytes(tensors=[("token_embd.weight", [2**40, 2**40], 0, EMBED)]),
                    "not a valid GGUF file"),
    "dims overflowing 64 bits": (lambda: gguf_bytes(tensors=[("token_embd.weight", [2**32, 2**32], 0, EMBED)]),
                                 "not a valid GGUF file"),
    "absurd dim count": (lambda: gguf_bytes(tensors=[("token_embd.weight", [8] * 200, 0, EMBED)]),
                         "not a valid GGUF file"),
    "offset past the end": (lambda: gguf_bytes(tensors=[("token_embd.weight", [8, 4], 0, EMBED, 2**40)]),
                            "not a valid GGUF file"),
    "misaligned offset": (lambda: gguf_bytes(tensors=[("token_embd.weight", [8, 4], 0, EMBED + b"\0" * 32, 4)]),
                          "not aligned to 32 bytes"),
    "unknown quant type": (lambda: gguf_bytes(tensors=[("token_embd.weight", [8, 4], 250, EMBED)]),
                           "not a valid GGUF file"),
    "alignment not a power of two": (lambda: gguf_bytes(extra_kvs=[kv_u32("general.alignment", 3)]),
                                     "not a valid GGUF file"),
    "alignment zero": (lambda: gguf_bytes(extra_kvs=[kv_u32("general.alignment", 0)]), "not a valid GGUF file"),
    "alignment as a string": (lambda: gguf_bytes(extra_kvs=[kv_string("general.alignment", "32")]),
                              "not a valid GGUF file"),
    "alignment the data does not follow": (lambda: gguf_bytes(extra_kvs=[kv_u32("general.alignment", 64)]),
                                           "GGUF"),
    "absurd string length": (lambda: gguf_bytes(kvs=[struct.pack("<Q", 2**60) + b"general.architecture"]),
                             "not a valid GGUF file"),
    "unknown value type": (lambda: gguf_bytes(kvs=[gguf_string("general.architecture") + struct.pack("<I", 77)
                                                    + gguf_string("llama")]), "not a valid GGUF file"),
    "architecture not a string": (lambda: gguf_bytes(kvs=[kv_u32("general.architecture", 5)]),
                                  "unsupported GGUF architecture 5"),
    "no architecture": (lambda: gguf_bytes(kvs=[]), "no general.architecture field"),
    "duplicate tensor": (lambda: gguf_bytes(tensors=[("a", [8, 4], 0, EMBED), ("a", [8, 4], 0, EMBED)]),
                         "not a valid GGUF file"),
    "tensor name not UTF-8": (lambda: gguf_bytes(tensors=[(b"\xff\xfeken_embd".decode("latin-1"), [8, 4], 0,
                                                            EMBED)]).replace("ÿþ".encode(), b"\xff\xfe"),
                              "not a valid GGUF file"),
    "no tensors": (lambda: gguf_bytes(tensors=[]), "no tensors"),
}


@pytest.mark.parametrize("case", sorted(GGUF_FILES))
def test_a_corrupt_gguf_file_is_refused(case, gguf_cache, tmp_path, capsys):
    pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package ([export] extra)")
    make, needle = GGUF_FILES[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(make())
    refused(capsys, tmp_path, ["export", str(path), "-o", str(tmp_path / "out")], needle, "model.gguf")


def write_tiny_gguf(path: Path, *, drop=(), metadata=None, shapes=None) -> Path:
    """A tiny Llama GGUF (2 blocks, hidden 64) that transformers converts; ``drop``, ``metadata`` and ``shapes``
    remove or change a metadata entry or a tensor."""
    gguf = pytest.importorskip("gguf", reason="writing GGUF files needs the gguf package ([export] extra)")
    pytest.importorskip("transformers", reason="converting GGUF files needs transformers ([export] extra)")
    writer = gguf.GGUFWriter(str(path), "llama")
    hidden, inner, vocab, layers, heads, kv_heads = 64, 128, 256, 2, 4, 2
    values = {"context_length": 128, "embedding_length": hidden, "block_count": layers,
              "feed_forward_length": inner, "head_count": heads, "head_count_kv": kv_heads,
              "layer_norm_rms_eps": 1e-6, "rope_dimension_count": hidden // heads, **(metadata or {})}
    for key, value in values.items():
        if key not in drop:
            getattr(writer, f"add_{key}")(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([bytes([i]).decode("latin-1") for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        tensors |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                    f"blk.{i}.attn_k.weight": (kv_heads * 16, hidden),
                    f"blk.{i}.attn_v.weight": (kv_heads * 16, hidden),
                    f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                    f"blk.{i}.ffn_gate.weight": (inner, hidden), f"blk.{i}.ffn_up.weight": (inner, hidden),
                    f"blk.{i}.ffn_down.weight": (hidden, inner)}
    rng = np.random.default_rng(0)
    for name, shape in {**tensors, **(shapes or {})}.items():
        if name not in drop:
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_tiny_gguf_file_converts_and_exports(gguf_cache, tmp_path, capsys):
    """The control for the cases below: unchanged, the generated GGUF file exports."""
    path = write_tiny_gguf(tmp_path / "model.gguf")
    code, _, err = run_cli(capsys, "export", str(path), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "model.onnx").is_file()


GGUF_CONTENT = {
    "a missing tensor": (dict(drop=["blk.1.ffn_down.weight"]), "lacks 1 weight(s)"),
    "more blocks than tensors": (dict(metadata={"block_count": 5}), "lacks 27 weight(s)"),
    "no block count": (dict(drop=["block_count"]), "has no llama.block_count field"),
    "a tensor of the wrong shape": (dict(shapes={"blk.0.attn_q.weight": (32, 64)}),
                                    "but the metadata calls for [64, 64]"),
    "no embedding length": (dict(drop=["embedding_length"]), "has no llama.embedding_length field"),
    "zero heads": (dict(metadata={"head_count": 0}), "llama.attention.head_count must be a positive integer"),
    "heads not dividing the width": (dict(metadata={"head_count": 3}),
                                     "head_count (3) is not a multiple of llama.attention.head_count_kv (2)"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CONTENT))
def test_a_gguf_file_whose_content_contradicts_itself_is_refused(case, gguf_cache, tmp_path, capsys):
    changes, needle = GGUF_CONTENT[case]
    path = write_tiny_gguf(tmp_path / "model.gguf", **changes)
    refused(capsys, tmp_path, ["export", str(path), "-o", str(tmp_path / "out")], needle, "model.gguf")


# -------------------------------------------------------------------------------------------- safetensors
def safetensors_parts(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def with_header(header, body: bytes, length: int | None = None) -> bytes:
    data = json.dumps(header).encode()
    return struct.pack("<Q", len(data) if length is None else length) + data + body


WEIGHT = "model.layers.0.mlp.down_proj.weight"


def entry_changed(**changes):
    def change(header, body):
        header = json.loads(json.dumps(header))
        for key, value in changes.items():
            if value is None:
                header[WEIGHT].pop(key)
            else:
                header[WEIGHT][key] = value
        return with_header(header, body)
    return change


SAFETENSORS = {
    "zero bytes": (lambda h, b: b"", "not a valid safetensors file"),
    "shorter than its length field": (lambda h, b: b"\x10\x00\x00", "not a valid safetensors file"),
    "header length past the end": (lambda h, b: struct.pack("<Q", 2**63) + b, "header length"),
    "header length zero": (lambda h, b: with_header(h, b, length=0), "header length 0"),
    "header not JSON": (lambda h, b: struct.pack("<Q", 10) + b"not json!!" + b, "not a valid safetensors file"),
    "header not UTF-8": (lambda h, b: struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc" + b, "not a valid safetensors"),
    "header a list": (lambda h, b: with_header([1, 2], b), "header is not a JSON object"),
    "entry not an object": (lambda h, b: with_header({**h, WEIGHT: 5}, b), "not a JSON object"),
    "body truncated": (lambda h, b: with_header(h, b[:len(b) // 2]), "is truncated"),
    "offsets past the end": (entry_changed(data_offsets=[0, 10**12]), "is truncated"),
    "offsets reversed": (entry_changed(data_offsets=[100, 50]), "data_offsets [100, 50]"),
    "negative offset": (entry_changed(data_offsets=[-100, 50]), "data_offsets [-100, 50]"),
    "offsets a string": (entry_changed(data_offsets="x"), "data_offsets 'x'"),
    "offsets missing": (entry_changed(data_offsets=None), "data_offsets None"),
    "offsets of three": (entry_changed(data_offsets=[0, 1, 2]), "data_offsets [0, 1, 2]"),
    "unknown dtype": (entry_changed(dtype="F99"), "unsupported dtype 'F99'"),
    "dtype missing": (entry_changed(dtype=None), "unsupported dtype None"),
    "shape not the bytes": (entry_changed(shape=[64, 64]), "spans 32768 bytes"),
    "dtype not the bytes": (entry_changed(dtype="F16"), "spans 32768 bytes"),
    "shape missing": (entry_changed(shape=None), "has shape None"),
    "shape a string": (entry_changed(shape="x"), "has shape 'x'"),
    "negative dim": (entry_changed(shape=[-1, 128]), "has shape [-1, 128]"),
    "fractional dim": (entry_changed(shape=[64.5, 128]), "has shape [64.5, 128]"),
    "integer weights": (entry_changed(dtype="I32"), "weights must be floating point"),
    "shape config.json does not imply": (entry_changed(shape=[128, 64]), "but config.json implies [64, 128]"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS))
def test_a_corrupt_safetensors_file_is_refused(case, hf_folder, tmp_path, capsys):
    folder = copy_of(hf_folder, tmp_path)
    make, needle = SAFETENSORS[case]
    (folder / "model.safetensors").write_bytes(make(*safetensors_parts(folder)))
    refused(capsys, tmp_path, ["export", str(folder), "-o", str(tmp_path / "out")], needle)


def test_a_folder_named_like_a_weights_file_is_refused(hf_folder, tmp_path, capsys):
    folder = copy_of(hf_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    refused(capsys, tmp_path, ["export", str(folder), "-o", str(tmp_path / "out")], "cannot read it",
            "model.safetensors")


# ------------------------------------------------------------------------------------ JSON files of a folder
BROKEN_JSON = {
    "truncated": lambda data: data[: len(data) // 2],
    "not JSON": lambda data: b"not json at all",
    "a list": lambda data: b"[1, 2]",
    "NUL bytes": lambda data: b"\0" * 16,
    "empty": lambda data: b"",
    "invalid UTF-8": lambda data: b"\xff" + data,
}


def write_broken(path: Path, how: str) -> None:
    path.write_bytes(BROKEN_JSON[how](path.read_bytes()))


@pytest.mark.parametrize("how", sorted(BROKEN_JSON))
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json", "special_tokens_map.json"])
def test_export_refuses_a_broken_json_file(name, how, hf_folder, tmp_path, capsys):
    folder = copy_of(hf_folder, tmp_path)
    write_broken(folder / name, how)
    needle = "not a JSON object" if how == "a list" else "not readable JSON"
    refused(capsys, tmp_path, ["export", str(folder), "-o", str(tmp_path / "out")], needle, name)


CONFIG_VALUES = {
    "hidden_size missing": ({"hidden_size": None}, "no hidden_size entry"),
    "vocab_size missing": ({"vocab_size": None}, "no vocab_size entry"),
    "num_attention_heads missing": ({"num_attention_heads": None}, "no num_attention_heads entry"),
    "num_hidden_layers missing": ({"num_hidden_layers": None}, "no num_hidden_layers entry"),
    "intermediate_size missing": ({"intermediate_size": None}, "no intermediate_size entry"),
    "model_type missing": ({"model_type": None}, "unsupported architecture"),
    "model_type a list": ({"model_type": ["llama"]}, "unsupported architecture"),
    "hidden_size a string": ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
    "hidden_size a list": ({"hidden_size": [64]}, "hidden_size must be a positive integer"),
    "hidden_size zero": ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    "hidden_size negative": ({"hidden_size": -64}, "hidden_size must be a positive integer"),
    "hidden_size true": ({"hidden_size": True}, "hidden_size must be a positive integer"),
    "hidden_size off the weights": ({"hidden_size": 63}, "but config.json implies"),
    "vocab_size fractional": ({"vocab_size": 1.5}, "vocab_size must be a positive integer"),
    "vocab_size off the weights": ({"vocab_size": 300}, "but config.json implies [300, 64]"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    "kv heads not dividing heads": ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads (3)"),
    "head_dim off the weights": ({"head_dim": 7}, "but config.json implies [28, 64]"),
    "width not a multiple of heads": ({"head_dim": None, "num_attention_heads": 5}, "not a multiple"),
    "intermediate_size off the weights": ({"intermediate_size": 100}, "but config.json implies"),
    "fewer layers than the weights": ({"num_hidden_layers": 1}, "holds weights of layer 1"),
    "more layers than the weights": ({"num_hidden_layers": 3}, "missing tensor"),
    "rms_norm_eps a string": ({"rms_norm_eps": "x"}, "rms_norm_eps must be a finite positive number"),
    "rms_norm_eps negative": ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite positive number"),
    "rope_theta a string": ({"rope_parameters": {"rope_theta": "abc", "rope_type": "default"}},
                            "rope_theta must be a finite positive number"),
    "rope_parameters a string": ({"rope_parameters": "x"}, "rope_parameters must be a JSON object"),
    "rope type unknown": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "unsupported rope type"),
    "rope type a list": ({"rope_parameters": {"rope_type": ["linear"]}}, "unsupported rope type"),
    "linear rope without factor": ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}},
                                   "are incomplete or not numbers"),
    "linear rope of factor zero": ({"rope_parameters": {"rope_type": "linear", "factor": 0, "rope_theta": 1e4}},
                                   "rope type 'linear'"),
    "max_position_embeddings a string": ({"max_position_embeddings": "x"}, "max_position_embeddings must be"),
    "eos_token_id a string": ({"eos_token_id": "x"}, "eos_token_id must be a token id"),
    "eos_token_id negative": ({"eos_token_id": [2, -1]}, "eos_token_id must be a token id"),
    "hidden_act a list": ({"hidden_act": ["silu"]}, "unsupported hidden_act"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_VALUES))
def test_export_refuses_config_values_of_the_wrong_type_or_size(case, hf_folder, tmp_path, capsys):
    folder = copy_of(hf_folder, tmp_path)
    changes, needle = CONFIG_VALUES[case]
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    refused(capsys, tmp_path, ["export", str(folder), "-o", str(tmp_path / "out")], needle)


def exported_commands(folder: str, out: str, text: str) -> dict[str, list[str]]:
    return {"generate": ["generate", folder, "hello", "--max-new-tokens", "2"],
            "calibrate": ["calibrate", folder, "-o", out, "--calib", text, "--samples", "2", "--seq-len", "16"],
            "validate": ["validate", folder, folder, "--windows", "1", "--seq-len", "16", "--text", text,
                         "--num-prompts", "1", "--new-tokens", "2", "--probes-per-task", "0", "--report", out]}


@pytest.mark.parametrize("how", ["truncated", "not JSON", "a list", "NUL bytes", "empty"])
@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "genai_config.json"])
@pytest.mark.parametrize("command", ["generate", "calibrate", "validate"])
def test_an_exported_folder_with_a_broken_json_file_is_refused(command, name, how, planted_model, tmp_path, capsys):
    folder = copy_of(planted_model[0], tmp_path)
    write_broken(folder / name, how)
    argv = exported_commands(str(folder), str(tmp_path / "out"), str(planted_model[1]))[command]
    needle = "not a readable tokenizer" if name == "tokenizer.json" else (
        "not a JSON object" if how == "a list" else "not readable JSON")
    refused(capsys, tmp_path, argv, needle, name)


EXPORTED_VALUES = {
    "context length a string": ("config.json", ("max_position_embeddings",), "x", "max_position_embeddings must"),
    "context length zero": ("config.json", ("max_position_embeddings",), 0, "max_position_embeddings must"),
    "eos id a string": ("genai_config.json", ("model", "eos_token_id"), "x", "eos_token_id must be a token id"),
    "eos ids with a float": ("genai_config.json", ("model", "eos_token_id"), [2, 2.5], "eos_token_id must be"),
}


@pytest.mark.parametrize("case", sorted(EXPORTED_VALUES))
@pytest.mark.parametrize("command", ["calibrate", "validate"])
def test_an_exported_folder_with_wrong_config_values_is_refused(command, case, planted_model, tmp_path, capsys):
    folder = copy_of(planted_model[0], tmp_path)
    name, keys, value, needle = EXPORTED_VALUES[case]
    document = json.loads((folder / name).read_text())
    inner = document
    for key in keys[:-1]:
        inner = inner.setdefault(key, {})
    inner[keys[-1]] = value
    (folder / name).write_text(json.dumps(document))
    argv = exported_commands(str(folder), str(tmp_path / "out"), str(planted_model[1]))[command]
    refused(capsys, tmp_path, argv, needle, name)


# ------------------------------------------------------------------------------------------------- ONNX
ONNX_COMMANDS = {
    "inspect": lambda m, p, o, t: ["inspect", m],
    "calibrate": lambda m, p, o, t: ["calibrate", m, "-o", o, "--calib", t, "--samples", "2", "--seq-len", "16"],
    "quantize": lambda m, p, o, t: ["quantize", m, "--preset", "w4a16-fast", "--block-size", "16", "--profile", p,
                                    "-o", o],
    "sparsify": lambda m, p, o, t: ["sparsify", m, "--profile", p, "--sparsity", "0.5", "-o", o],
    "generate": lambda m, p, o, t: ["generate", m, "hello", "--max-new-tokens", "2"],
    "validate": lambda m, p, o, t: ["validate", m, m, "--windows", "1", "--seq-len", "16", "--text", t,
                                    "--report", o],
    "build": lambda m, p, o, t: ["build", m, "--target", "cpu", "-o", o, "--calib", t],
}
BROKEN_ONNX = {
    "truncated": lambda data: data[: len(data) // 2],
    "zero bytes": lambda data: b"",
    "garbage": lambda data: b"\x08\xff" * 100,
    "text": lambda data: b"hello, not a model\n",
}


@pytest.mark.parametrize("how", sorted(BROKEN_ONNX))
@pytest.mark.parametrize("command", sorted(ONNX_COMMANDS))
def test_a_broken_onnx_file_is_refused(command, how, planted_model, profile, tmp_path, capsys):
    folder = copy_of(planted_model[0], tmp_path)
    model = folder / "model.onnx"
    model.write_bytes(BROKEN_ONNX[how](model.read_bytes()))
    argv = ONNX_COMMANDS[command](str(model), str(profile), str(tmp_path / "out"), str(planted_model[1]))
    needle = "ONNX Runtime cannot load" if command == "generate" else "not a valid ONNX model"
    refused(capsys, tmp_path, argv, needle, "model.onnx")


@pytest.mark.parametrize("command", sorted(ONNX_COMMANDS))
def test_a_folder_named_model_onnx_is_refused(command, planted_model, profile, tmp_path, capsys):
    folder = copy_of(planted_model[0], tmp_path)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").mkdir()
    argv = ONNX_COMMANDS[command](str(folder / "model.onnx"), str(profile), str(tmp_path / "out"),
                                  str(planted_model[1]))
    refused(capsys, tmp_path, argv, "model.onnx")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a file whatever its mode")
@pytest.mark.parametrize("command", ["inspect", "calibrate", "quantize", "generate", "validate"])
def test_an_unreadable_onnx_file_is_refused(command, planted_model, profile, tmp_path, capsys):
    folder = copy_of(planted_model[0], tmp_path)
    (folder / "model.onnx").chmod(0)
    argv = ONNX_COMMANDS[command](str(folder / "model.onnx"), str(profile), str(tmp_path / "out"),
                                  str(planted_model[1]))
    refused(capsys, tmp_path, argv, "model.onnx")


# ----------------------------------------------------------------------------------- profile and its .npz
def npz(arrays: dict, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=allow_pickle, **arrays)
    return buffer.getvalue()


def statistics_changed(change):
    def make(profile: Path) -> bytes:
        with np.load(profile / "statistics.npz") as archive:
            arrays = {key: archive[key] for key in archive.files}
        change(arrays)
        return npz(arrays, allow_pickle=True)
    return make


def set_histograms(value):
    return statistics_changed(lambda a: [a.__setitem__(k, value(a[k])) for k in list(a)
                                         if k.endswith("magnitude_histogram")])


STATISTICS = {
    "truncated": (lambda p: (p / "statistics.npz").read_bytes()[:200], "unreadable arrays"),
    "zero bytes": (lambda p: b"", "not an .npz archive"),
    "not a zip": (lambda p: b"hello world" * 10, "not an .npz archive"),
    "a bare .npy": (lambda p: b"\x93NUMPY" + b"\0" * 50, "not an .npz archive"),
    "absmax missing": (statistics_changed(lambda a: a.pop("0.absmax")), "lacks absmax"),
    "second moment missing": (statistics_changed(lambda a: a.pop("3.second_moment")), "lacks second_moment"),
    "absmax of strings": (statistics_changed(lambda a: a.__setitem__("0.absmax", np.array(["x"] * 64))),
                          "absmax of input"),
    "absmax too short": (statistics_changed(lambda a: a.__setitem__("0.absmax", np.ones(3, np.float32))),
                         "is float32 [3]"),
    "absmax of two dims": (statistics_changed(lambda a: a.__setitem__("0.absmax", np.ones((64, 2), np.float32))),
                           "is float32 [64, 2]"),
    "absmax NaN": (statistics_changed(lambda a: a.__setitem__("0.absmax", np.full(64, np.nan, np.float32))),
                   "finite, non-negative numbers"),
    "absmax negative": (statistics_changed(lambda a: a.__setitem__("0.p999", -np.ones(64, np.float32))),
                        "p999 of input"),
    "absmax complex": (statistics_changed(lambda a: a.__setitem__("0.absmax", np.ones(64, np.complex64))),
                       "is complex64 [64]"),
    "object array": (statistics_changed(lambda a: a.__setitem__("0.absmax", np.array([{"x": 1}] * 64))),
                     "pickled object array"),
    "histogram too short": (set_histograms(lambda h: np.ones(3, np.int64)), "magnitude histogram"),
    "histogram of NaN": (set_histograms(lambda h: np.full(h.shape, np.nan)), "magnitude histogram"),
    "histogram negative": (set_histograms(lambda h: -np.ones_like(h)), "magnitude histogram"),
}


@pytest.mark.parametrize("case", sorted(STATISTICS))
@pytest.mark.parametrize("command", ["quantize", "sparsify"])
def test_a_corrupt_statistics_file_is_refused(command, case, planted_model, profile, tmp_path, capsys):
    copy = copy_of(profile, tmp_path, "profile")
    make, needle = STATISTICS[case]
    (copy / "statistics.npz").write_bytes(make(profile))
    argv = ONNX_COMMANDS[command](str(planted_model[0]), str(copy), str(tmp_path / "out"), "")
    refused(capsys, tmp_path, argv, needle)


def manifest_changed(change):
    def make(manifest: dict) -> str:
        manifest = json.loads(json.dumps(manifest))
        change(manifest)
        return json.dumps(manifest)
    return make


def first_layer(**changes):
    return manifest_changed(lambda m: [m["layers"][0].pop(k) if v is None else m["layers"][0].__setitem__(k, v)
                                       for k, v in changes.items()])


MANIFESTS = {
    "truncated": (lambda m: json.dumps(m)[:100], "not readable JSON"),
    "not JSON": (lambda m: "manifest", "not readable JSON"),
    "NUL bytes": (lambda m: "\0" * 8, "not readable JSON"),
    "a list": (lambda m: "[]", "not a JSON object"),
    "another kind": (manifest_changed(lambda m: m.__setitem__("kind", "accullm-export/bundle")), "not a version-1"),
    "no layers": (manifest_changed(lambda m: m.pop("layers")), "layers are not a list"),
    "layers a string": (manifest_changed(lambda m: m.__setitem__("layers", "x")), "layers are not a list"),
    "no inputs": (manifest_changed(lambda m: m.pop("inputs")), "inputs are not a list"),
    "input channels negative": (manifest_changed(lambda m: m["inputs"][0].__setitem__("channels", -1)),
                                "inputs are not a list"),
    "no model": (manifest_changed(lambda m: m.pop("model")), "model entry"),
    "model hash a number": (manifest_changed(lambda m: m["model"].__setitem__("sha256", 5)), "model entry"),
    "policy a string": (manifest_changed(lambda m: m.__setitem__("policy", "x")), "policy entry"),
    "sparsity a list": (manifest_changed(lambda m: m.__setitem__("sparsity", [])), "sparsity entry"),
    "input index out of range": (first_layer(input_index=99), "input_index 99"),
    "input index a string": (first_layer(input_index="0"), "input_index '0'"),
    "in_features off the input": (first_layer(in_features=7), "in_features 7"),
    "outliers a string": (first_layer(outliers="abc"), "outlier channels"),
    "outlier channel out of range": (first_layer(outliers=[10**6]), "outlier channels"),
    "candidates missing": (first_layer(candidates=None), "outlier channels"),
    "node name missing": (first_layer(node=None), "lacks its node"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_a_corrupt_profile_manifest_is_refused(case, planted_model, profile, tmp_path, capsys):
    copy = copy_of(profile, tmp_path, "profile")
    make, needle = MANIFESTS[case]
    (copy / "manifest.json").write_text(make(json.loads((profile / "manifest.json").read_text())))
    argv = ONNX_COMMANDS["quantize"](str(planted_model[0]), str(copy), str(tmp_path / "out"), "")
    refused(capsys, tmp_path, argv, needle)


FEEDS_FILES = {
    "truncated zip": (lambda data: data[: len(data) // 2], "unreadable arrays"),
    "not a zip": (lambda data: b"not a zip" * 8, "not an .npz archive"),
    "windows missing": (lambda data: npz({"tokens": np.ones((2, 8), np.int64)}), "token windows"),
    "windows of one dim": (lambda data: npz({"windows": np.ones(16, np.int64)}), "token windows"),
    "windows of floats": (lambda data: npz({"windows": np.ones((2, 8), np.float32)}), "token windows"),
    "negative token ids": (lambda data: npz({"windows": -np.ones((2, 8), np.int64)}), "token windows"),
    "token ids past the vocabulary": (lambda data: npz({"windows": np.full((2, 8), 999, np.int64)}),
                                      "token ids outside [0, 256)"),
    "windows of one token": (lambda data: npz({"windows": np.ones((2, 1), np.int64)}), "token windows"),
    "object windows": (lambda data: npz({"windows": np.array([{"a": 1}], dtype=object)}, allow_pickle=True),
                       "pickled object array"),
}


@pytest.mark.parametrize("case", sorted(FEEDS_FILES))
def test_corrupt_stored_calibration_inputs_are_refused(case, planted_model, profile, tmp_path, capsys):
    """feeds.npz with a matching hash (so its content, not the hash check, is what is refused), read by GPTQ."""
    copy = copy_of(profile, tmp_path, "profile")
    make, needle = FEEDS_FILES[case]
    data = make((copy / "feeds.npz").read_bytes())
    (copy / "feeds.npz").write_bytes(data)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["feeds"]["sha256"] = hashlib.sha256(data).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    config = write_config(tmp_path / "gptq.toml", make_recipe("w4a16", gptq=True, gptq_samples=2))
    refused(capsys, tmp_path, ["quantize", str(planted_model[0]), "--config", config, "--block-size", "16",
                               "--profile", str(copy), "-o", str(tmp_path / "out")], needle, "feeds.npz")


@pytest.mark.parametrize("case", ["an array missing", "another dtype", "another shape", "NaN"])
def test_stored_script_feeds_that_do_not_fit_the_model_are_refused(case, tmp_path):
    from accullm_export.calibration.profile import FEEDS, load_profile
    from accullm_export.calibration.run import CalibrationConfig, calibrate, profile_feeds
    from accullm_export.errors import UserError

    model = make_mlp(tmp_path / "mlp.onnx")
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n\ndef load_data():\n    return [{'x': np.ones((4, 8), np.float32)}] * 2\n")
    calibrate(model, tmp_path / "p", CalibrationConfig(source=str(script)))
    arrays = {"0.0": np.ones((4, 8), np.float32), "1.0": np.ones((4, 8), np.float32)}
    arrays["1.0"] = {"an array missing": None, "another dtype": np.ones((4, 8), np.int32),
                     "another shape": np.ones((4, 3), np.float32),
                     "NaN": np.full((4, 8), np.nan, np.float32)}[case]
    data = npz({key: value for key, value in arrays.items() if value is not None})
    (tmp_path / "p" / FEEDS).write_bytes(data)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    manifest["feeds"]["sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(manifest))
    needle = "a stored calibration batch has no arrays" if case == "an array missing" else "feeds.npz: feed 2"
    with pytest.raises(UserError, match=re.escape(needle)) as raised:
        profile_feeds(model, load_profile(tmp_path / "p"), 2)
    assert "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------ data-loader scripts
NP = "import numpy as np\n\n"
SCRIPTS = {
    "raises": ("def load_data():\n    raise RuntimeError('no data today')\n", "raised RuntimeError: no data today"),
    "raises a multi-line error": ("def load_data():\n    raise ValueError('first\\nsecond')\n", "raised ValueError"),
    "raises at import": ("raise ImportError('missing module')\n", "raised ImportError: missing module"),
    "raises midway": (NP + "def load_data():\n    yield {'x': np.ones((2, 8), np.float32)}\n"
                           "    raise OSError('disk gone')\n", "raised OSError: disk gone"),
    "a syntax error": ("def load_data(:\n", "raised SyntaxError"),
    "binary": (b"\x00\xff\xfe" * 10, "raised SyntaxError"),
    "calls sys.exit": ("import sys\n\ndef load_data():\n    sys.exit(3)\n", "called sys.exit(3)"),
    "calls sys.exit(0)": ("import sys\n\ndef load_data():\n    sys.exit(0)\n", "called sys.exit(0)"),
    "calls sys.exit at import": ("import sys\nsys.exit('bye')\n", "called sys.exit('bye')"),
    "calls exit()": ("def load_data():\n    raise SystemExit\n", "called sys.exit(None)"),
    "no load_data": ("x = 1\n", "defines no load_data() function"),
    "load_data not callable": ("load_data = 5\n", "load_data is of type int, not a function"),
    "load_data takes arguments": ("def load_data(path):\n    return []\n", "missing 1 required positional"),
    "returns None": ("def load_data():\n    return None\n", "returned a value of type NoneType"),
    "returns an int": ("def load_data():\n    return 5\n", "returned a value of type int"),
    "returns a string": ("def load_data():\n    return 'x'\n", "returned a value of type str"),
    "returns one dict": (NP + "def load_data():\n    return {'x': np.ones((2, 8), np.float32)}\n",
                         "returned a value of type dict"),
    "returns an empty list": ("def load_data():\n    return []\n", "yielded nothing"),
    "yields nothing": ("def load_data():\n    yield from ()\n", "yielded nothing"),
    "yields ints": ("def load_data():\n    return [1, 2]\n", "feed 1 is of type int"),
    "yields an empty dict": ("def load_data():\n    yield {}\n", "feed 1 is an empty dict"),
    "a name the model lacks": (NP + "def load_data():\n    yield {'y': np.ones((2, 8), np.float32)}\n",
                               "feed 1 has input 'y'"),
    "an extra name": (NP + "def load_data():\n    yield {'x': np.ones((2, 8), np.float32), 'z': np.ones(3)}\n",
                      "feed 1 has input 'z'"),
    "a key that is not a string": (NP + "def load_data():\n    yield {1: np.ones((2, 8), np.float32)}\n",
                                   "has the key 1"),
    "integers for floats": (NP + "def load_data():\n    yield {'x': np.ones((2, 8), np.int64)}\n",
                            "input 'x' is int64"),
    "booleans for floats": (NP + "def load_data():\n    yield {'x': np.ones((2, 8), bool)}\n", "input 'x' is bool"),
    "strings": (NP + "def load_data():\n    yield {'x': np.array([['a'] * 8] * 2)}\n", "holds <U1 values"),
    "complex numbers": (NP + "def load_data():\n    yield {'x': np.ones((2, 8), np.complex64)}\n",
                        "holds complex64 values"),
    "Python objects": (NP + "def load_data():\n    yield {'x': np.array([object()] * 8, dtype=object)}\n",
                       "holds Python objects"),
    "a plain object": ("def load_data():\n    yield {'x': object()}\n", "is of type object"),
    "a list": ("def load_data():\n    yield {'x': [[1.0] * 8] * 2}\n", "is of type list"),
    "a NumPy scalar": (NP + "def load_data():\n    yield {'x': np.float32(1)}\n", "is of type float32"),
    "the wrong width": (NP + "def load_data():\n    yield {'x': np.ones((2, 5), np.float32)}\n",
                        "has shape [2, 5]"),
    "the wrong rank": (NP + "def load_data():\n    yield {'x': np.ones((2, 8, 1), np.float32)}\n",
                       "has shape [2, 8, 1]"),
    "no rows": (NP + "def load_data():\n    yield {'x': np.ones((0, 8), np.float32)}\n", "is empty"),
    "NaN": (NP + "def load_data():\n    yield {'x': np.full((2, 8), np.nan, np.float32)}\n", "NaN or infinite"),
    "infinity": (NP + "def load_data():\n    yield {'x': np.full((2, 8), -np.inf, np.float32)}\n",
                 "NaN or infinite"),
    "NaN in a later feed": (NP + "def load_data():\n    yield {'x': np.ones((2, 8), np.float32)}\n"
                                 "    yield {'x': np.full((2, 8), np.nan, np.float32)}\n", "feed 2"),
}


@pytest.mark.parametrize("case", sorted(SCRIPTS))
@pytest.mark.parametrize("command", ["calibrate", "validate"])
def test_a_broken_data_loader_script_is_refused(command, case, tmp_path, capsys):
    model = str(make_mlp(tmp_path / "mlp.onnx"))
    source, needle = SCRIPTS[case]
    script = tmp_path / "loader.py"
    script.write_bytes(source if isinstance(source, bytes) else source.encode())
    out = str(tmp_path / "out")
    argv = (["calibrate", model, "-o", out, "--calib", str(script)] if command == "calibrate"
            else ["validate", model, model, "--data-loader", str(script), "--report", out])
    refused(capsys, tmp_path, argv, needle, "loader.py")


@pytest.mark.parametrize("case", ["a name the model lacks", "integers for floats", "NaN"])
def test_a_decoder_fed_a_script_that_does_not_fit_it_is_refused(case, planted_model, tmp_path, capsys):
    script = tmp_path / "loader.py"
    script.write_text(SCRIPTS[case][0])
    refused(capsys, tmp_path, ["calibrate", str(planted_model[0]), "-o", str(tmp_path / "out"), "--calib",
                               str(script)], "loader.py", "feed 1")


@pytest.mark.parametrize("ids", ["np.full((1, 8), 256)", "-np.ones((1, 8), np.int64)"])
def test_a_script_yielding_token_ids_out_of_range_is_refused(ids, planted_model, tmp_path, capsys):
    from accullm_export.calibration.feeds import llm_feeds

    template = llm_feeds(np.ones((1, 8), np.int64), planted_model[0] / "model.onnx")[0]
    np.savez(tmp_path / "template.npz", **template)
    script = tmp_path / "loader.py"
    script.write_text(NP + f"def load_data():\n    feed = dict(np.load({str(tmp_path / 'template.npz')!r}))\n"
                           f"    feed['input_ids'] = {ids}.astype(np.int64)\n    yield feed\n")
    refused(capsys, tmp_path, ["calibrate", str(planted_model[0]), "-o", str(tmp_path / "out"), "--calib",
                               str(script)], "token ids outside [0, 256)", "loader.py")


# --------------------------------------------------------------------------------------------- text files
TEXT_FILES = {
    "NUL bytes.txt": (lambda text: text[:300] + b"\0\0" + text[300:], "binary file, not text"),
    "invalid UTF-8.txt": (lambda text: text[:300] + b"\xff\xfe\xc3" + text[300:], "cannot read it as UTF-8"),
    "UTF-16.txt": (lambda text: text.decode().encode("utf-16"), "binary file, not text"),
    "Latin-1.txt": (lambda text: "café crème".encode("latin-1") * 50, "cannot read it as UTF-8"),
    "empty.txt": (lambda text: b"", "holds no non-empty document"),
    "blank lines.txt": (lambda text: b"\n \n\t\n", "holds no non-empty document"),
    "random bytes.txt": (lambda text: bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8)),
                         "binary file, not text"),
    "NUL bytes.jsonl": (lambda text: b'{"text": "a"}\n\0\0\n', "binary file, not text"),
    "escaped NUL.jsonl": (lambda text: b'{"text": "a\\u0000b"}\n', "holds a NUL character"),
    "invalid UTF-8.jsonl": (lambda text: b'{"text": "\xff\xfe"}\n', "cannot read it as UTF-8"),
    "empty.jsonl": (lambda text: b"", "holds no non-empty document"),
    "not JSON.jsonl": (lambda text: b"plain text\n", "line 1: not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(TEXT_FILES))
@pytest.mark.parametrize("command", ["calibrate", "validate", "build"])
def test_a_binary_or_empty_text_source_is_refused(command, name, planted_model, tmp_path, capsys):
    make, needle = TEXT_FILES[name]
    path = tmp_path / name
    path.write_bytes(make(planted_model[1].read_bytes()))
    folder, out = str(planted_model[0]), str(tmp_path / "out")
    argv = {"calibrate": ["calibrate", folder, "-o", out, "--calib", str(path), "--samples", "2", "--seq-len", "16"],
            "validate": ["validate", folder, folder, "--text", str(path), "--windows", "1", "--seq-len", "16",
                         "--report", out],
            "build": ["build", folder, "--target", "cpu", "-o", out, "--calib", str(path), "--calib-samples", "2",
                      "--calib-seq-len", "16"]}[command]
    refused(capsys, tmp_path, argv, needle, name)


@pytest.mark.parametrize("name", [name for name in sorted(TEXT_FILES) if name.endswith(".txt")])
def test_a_binary_or_empty_prompts_file_is_refused(name, planted_model, tmp_path, capsys):
    make, needle = TEXT_FILES[name]
    path = tmp_path / name
    path.write_bytes(make(planted_model[1].read_bytes()))
    folder = str(planted_model[0])
    needle = "holds no prompts" if "no non-empty document" in needle else needle
    refused(capsys, tmp_path, ["validate", folder, folder, "--text", str(planted_model[1]), "--prompts", str(path),
                               "--windows", "1", "--seq-len", "16", "--num-prompts", "1", "--new-tokens", "2",
                               "--probes-per-task", "0", "--report", str(tmp_path / "out")], needle, name)


# ------------------------------------------------------------------------------------------------ --mode
@pytest.mark.parametrize("case", ["llm on two plain models", "llm with a plain candidate",
                                  "llm with a plain reference", "generic on decoders without a data loader",
                                  "llm with --bisect on plain models", "auto on a decoder and a plain model"])
def test_a_mode_that_does_not_fit_the_models_is_refused(case, planted_model, tmp_path, capsys):
    plain, decoder = str(make_mlp(tmp_path / "mlp.onnx")), str(planted_model[0])
    argv, needle = {
        "llm on two plain models": (["--mode", "llm", plain, plain], "--mode llm compares exported decoders"),
        "llm with a plain candidate": (["--mode", "llm", decoder, plain], "the candidate"),
        "llm with a plain reference": (["--mode", "llm", plain, decoder], "the reference"),
        "generic on decoders without a data loader": (["--mode", "generic", decoder, decoder], "--data-loader"),
        "llm with --bisect on plain models": (["--mode", "llm", "--bisect", plain, plain], "--mode llm"),
        "auto on a decoder and a plain model": ([decoder, plain], "different input names"),
    }[case]
    refused(capsys, tmp_path, ["validate", *argv, "--report", str(tmp_path / "out")], needle)


def test_an_empty_onnx_file_is_named_when_validate_picks_a_mode(planted_model, tmp_path, capsys):
    (tmp_path / "empty.onnx").write_bytes(b"")
    refused(capsys, tmp_path, ["validate", str(tmp_path / "empty.onnx"), str(planted_model[0])],
            "parses to an empty graph", "empty.onnx")
