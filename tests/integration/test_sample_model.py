"""The real sample, SmolLM2-135M-Instruct: our runtime and onnxruntime-genai agree with transformers."""

from __future__ import annotations

import pytest

from tests.helpers.genai import genai_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Question: What is 12 + 7?\nAnswer:"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(hf folder, exported folder, tokenizer) for the sample model."""
    from accullm_export.models.checkpoint import resolve_checkpoint_folder
    from accullm_export.models.export import export_model
    from accullm_export.runtime.tokenizer import FolderTokenizer

    hf = resolve_checkpoint_folder("smollm2-135m")
    out = tmp_path_factory.mktemp("sample") / "smollm2"
    export_model("smollm2-135m", out)
    return hf, out, FolderTokenizer(out)


@pytest.fixture(scope="module")
def transformers_tokens(sample):
    torch = pytest.importorskip("torch", reason="the reference is transformers on torch ([export] extra)")
    import transformers

    hf, _, _ = sample
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
        expected.append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    return expected


def test_our_runtime_matches_transformers_greedy(sample, transformers_tokens):
    from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate

    _, folder, tokenizer = sample
    runner = OrtCausalLM.from_path(folder, device="cpu")
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=tuple(tokenizer.eos_token_ids))
    for prompt, (prompt_ids, expected) in zip(PROMPTS, transformers_tokens):
        assert tokenizer.encode(prompt) == prompt_ids
        assert generate(runner, [prompt_ids], config).tokens[0] == expected, prompt
    # all three prompts batched with left padding give the same tokens
    batched = generate(runner, [ids for ids, _ in transformers_tokens], config).tokens
    assert batched == [expected for _, expected in transformers_tokens]


def test_onnxruntime_genai_loads_our_folder_and_matches(sample, transformers_tokens):
    _, folder, tokenizer = sample
    model = _genai_model(folder)
    for prompt_ids, expected in transformers_tokens:
        produced = genai_greedy(model, prompt_ids, NEW_TOKENS)
        # onnxruntime-genai stops at EOS without appending it to the sequence; transformers keeps it
        if expected[-1] in tokenizer.eos_token_ids:
            expected = expected[:-1]
        assert produced == expected


def test_generate_cli_streams_text(sample, capsys):
    from accullm_export.cli.main import main

    _, folder, _ = sample
    assert main(["generate", str(folder), "The capital of France is", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The capital of France is Paris")
    assert "tokens/s" in captured.err


@pytest.fixture(scope="module")
def sample_profile(sample, tmp_path_factory):
    from accullm_export.calibration.run import CalibrationConfig, calibrate

    _, folder, _ = sample
    out = tmp_path_factory.mktemp("sample-profile") / "profile"
    calibrate(folder, out, CalibrationConfig(samples=8, seq_len=256))
    return out


def _mean_kl(reference, candidate, feeds) -> float:
    import numpy as np

    from accullm_export.runtime.session import create_session

    def log_probs(path):
        session = create_session(path / "model.onnx", device="cpu", optimization="basic")
        for feed in feeds:
            logits = session.run(["logits"], feed)[0][0].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            yield logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    return float(np.mean([(np.exp(r) * (r - c)).sum(-1).mean()
                          for r, c in zip(log_probs(reference), log_probs(candidate))]))


def _genai_model(folder):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is the [genai] extra")
    return og.Model(str(folder))


def test_quantized_sample_keeps_answers_and_the_branch_pays(sample, sample_profile, tmp_path):
    """On the real model: w4a16's FP16 outlier rows lower the KL on held-out text, and w8a8's per-group
    activation scales beat static per-tensor ones; w8a8 keeps a factual answer; the folders run in our runtime
    and in onnxruntime-genai, which agree."""
    from accullm_export.build.quantize import quantize_model
    from accullm_export.calibration.feeds import llm_feeds, text_windows
    from tests.helpers.recipes import make_recipe
    from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate

    _, folder, tokenizer = sample
    kl = {}
    for outliers in ("auto", 0):
        manifest = quantize_model(folder, tmp_path / f"w4-{outliers}", make_recipe(name="w4a16", policy="sensitivity",
                                                                              outliers=outliers), sample_profile)
        assert manifest["size"]["linear_bits_per_weight"] < 4.5
        windows, _ = text_windows(folder, "wiki:evaluation", 2, 128, seed=3)
        kl[outliers] = _mean_kl(folder, tmp_path / f"w4-{outliers}", llm_feeds(windows, folder / "model.onnx"))
    assert kl["auto"] < 0.9 * kl[0], kl
    for name, mode in (("w8", "static"), ("w8-g32", "dynamic")):  # one activation scale per tensor, or per 32
        quantize_model(folder, tmp_path / name, make_recipe(name="w8a8", activations=mode, policy="sensitivity"),
                       sample_profile)
        kl[name] = _mean_kl(folder, tmp_path / name, llm_feeds(windows, folder / "model.onnx"))
    assert kl["w8-g32"] < 0.5 * kl["w8"], kl
    prompt = tokenizer.encode("The capital of France is")
    config = GenerationConfig(max_new_tokens=4, eos_token_ids=tuple(tokenizer.eos_token_ids))
    for name in ("w8", "w8-g32", "w4-auto"):
        ours = generate(OrtCausalLM.from_path(tmp_path / name, device="cpu"), [prompt], config).tokens[0]
        assert genai_greedy(_genai_model(tmp_path / name), prompt, 4) == ours, name
        if name.startswith("w8"):
            assert "Paris" in tokenizer.decode(ours)
