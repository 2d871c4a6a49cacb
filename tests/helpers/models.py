"""Tiny random-init decoders built in code (fixed seeds), their byte-level tokenizer, and the calibration text
and planted outlier channels that the session fixtures in tests/conftest.py use."""

from __future__ import annotations

from pathlib import Path

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
    # windowed layer 0, global layer 1; soft-capping strong enough to matter at this initializer range
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, initializer_range=0.1)),
    # head_dim 256 as in the real models; local layers' own rope base, linear scaling on the global layer
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=256, sliding_window=4, query_pre_attn_scalar=128, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, sliding_window=6)),
}
SLIDING_WINDOWS = {model_type: extra["sliding_window"] for model_type, (_, _, extra) in TINY_ARCHITECTURES.items()
                   if extra.get("sliding_window")}

# A tiny Llama with planted outlier channels, and its calibration profile (shared by calibration and quantize tests)
PLANTED = [5, 40]
SAMPLES, SEQ_LEN = 6, 40

# Calibration and evaluation text: plain English, repeated so that a few windows fit
TEXT = ("The river ran north past the old stone bridge, and the market opened before dawn. "
        "Seven candles burned in the window of the copper shop. Winter came early that year.\n\n"
        "In the garden, a rabbit watched the ladder lean against the orange wall. The engine of the harbor "
        "ferry coughed twice and then fell silent, while the music from the square grew louder.\n\n") * 6


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


def export_tiny(root: Path, attention: str) -> dict:
    """Every tiny architecture saved and exported under ``root``: model_type -> (hf folder, exported folder)."""
    from accullm_export.models.export import export_model

    made = {}
    for model_type in TINY_ARCHITECTURES:
        hf = make_tiny_checkpoint(root / f"{model_type}-hf", model_type)
        export_model(str(hf), root / f"{model_type}-onnx", attention=attention)
        made[model_type] = (hf, root / f"{model_type}-onnx")
    return made


def planted_checkpoint(folder, model_type: str = "llama", seed: int = 3):
    """``make_tiny_checkpoint`` with the input and post-attention RMSNorm gains scaling channels ``PLANTED`` by 100,
    so that q/k/v and gate/up read outlier channels."""
    from safetensors.numpy import load_file, save_file

    hf = make_tiny_checkpoint(folder, model_type, seed=seed)
    tensors = load_file(str(hf / "model.safetensors"))
    for name in list(tensors):
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            tensors[name] = tensors[name].copy()
            tensors[name][PLANTED] *= 100.0
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return hf
