"""Shared fixtures: tiny random-init decoders built in code (fixed seeds) and their ONNX exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# model_type -> (transformers class names, extra config) for the architectures the exporter supports
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=16)),
}


def make_tiny_checkpoint(folder: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Save a random-init tiny decoder as a Hugging Face folder; returns the folder."""
    torch = pytest.importorskip("torch", reason="tiny reference models need torch (the [export] extra)")
    transformers = pytest.importorskip("transformers", reason="tiny reference models need transformers")
    config_name, model_name, extra = TINY_ARCHITECTURES[model_type]
    config = getattr(transformers, config_name)(**{**TINY_BASE, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random-init biases and norm weights are trivial; make them informative
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    return folder


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer with no merges: exactly 256 tokens, matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(Path(folder) / "tokenizer.json"))


def load_torch_model(folder: Path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """model_type -> (hf folder, exported folder), default (fused) attention, built once per session."""
    return _export_tiny(tmp_path_factory.mktemp("tiny"), "fused")


@pytest.fixture(scope="session")
def tiny_decomposed_exports(tmp_path_factory):
    """The same tiny models exported with decomposed (opset 21) attention."""
    return _export_tiny(tmp_path_factory.mktemp("tiny-decomposed"), "decomposed")


def _export_tiny(root: Path, attention: str) -> dict:
    from accullm_export.models.export import export_model

    made = {}
    for model_type in TINY_ARCHITECTURES:
        hf = make_tiny_checkpoint(root / f"{model_type}-hf", model_type)
        export_model(str(hf), root / f"{model_type}-onnx", attention=attention)
        made[model_type] = (hf, root / f"{model_type}-onnx")
    return made


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# A tiny Llama with planted outlier channels, and its calibration profile (shared by calibration and quantize tests)
PLANTED = [5, 40]
SAMPLES, SEQ_LEN = 6, 40


@pytest.fixture(scope="session")
def planted_model(tmp_path_factory):
    """A tiny Llama whose RMSNorm weights scale channels 5 and 40 by 100: q/k/v and gate/up inputs get outliers."""
    from safetensors.numpy import load_file, save_file

    from accullm_export.models.export import export_model
    from tests.unit.test_validate import TEXT

    root = tmp_path_factory.mktemp("planted")
    hf = make_tiny_checkpoint(root / "hf", "llama", seed=3)
    tensors = load_file(str(hf / "model.safetensors"))
    for name in list(tensors):
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            tensors[name] = tensors[name].copy()
            tensors[name][PLANTED] *= 100.0
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
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
