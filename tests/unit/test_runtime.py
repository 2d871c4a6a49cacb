"""Generation loop, sampling and streaming detokenization."""

from __future__ import annotations

import numpy as np
import pytest

from accullm_export.errors import UserError
from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate
from accullm_export.runtime.generation import left_pad, sample_token
from tests.helpers.models import load_torch_model

torch = pytest.importorskip("torch", reason="greedy references come from torch (the [export] extra)")


def torch_greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_greedy_generation_matches_torch_for_a_batch(tiny_exports):
    hf, folder = tiny_exports["qwen3"]
    runner = OrtCausalLM.from_path(folder, device="cpu")
    model = load_torch_model(hf)
    prompts = [[5, 17, 99, 3, 44, 8], [7, 200, 31]]
    result = generate(runner, prompts, GenerationConfig(max_new_tokens=12))
    for prompt, tokens in zip(prompts, result.tokens):
        assert tokens == torch_greedy(model, prompt, 12)
    assert result.decode_steps == 11 and result.decode_tokens_per_second > 0


def test_generation_stops_at_eos(tiny_exports):
    _, folder = tiny_exports["llama"]
    runner = OrtCausalLM.from_path(folder, device="cpu")
    free = generate(runner, [[5, 6, 7]], GenerationConfig(max_new_tokens=10)).tokens[0]
    stop = free[3]
    stopped = generate(runner, [[5, 6, 7]], GenerationConfig(max_new_tokens=10, eos_token_ids=(stop,))).tokens[0]
    assert stopped == free[: free.index(stop) + 1]


def test_sampling_is_reproducible_with_a_seed(tiny_exports):
    _, folder = tiny_exports["llama"]
    runner = OrtCausalLM.from_path(folder, device="cpu")
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)
    first = generate(runner, [[5, 6, 7]], config).tokens
    assert first == generate(runner, [[5, 6, 7]], config).tokens
    other = generate(runner, [[5, 6, 7]], GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5,
                                                          seed=8)).tokens
    assert first != other


def test_top_k_one_is_greedy_and_top_p_truncates():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    assert all(sample_token(logits, GenerationConfig(do_sample=True, top_k=1), rng) == 1 for _ in range(20))
    # probabilities ~ [.02,.49,.07,.42]: top_p 0.8 keeps exactly tokens 1 and 3
    drawn = {sample_token(logits, GenerationConfig(do_sample=True, top_p=0.8), rng) for _ in range(200)}
    assert drawn == {1, 3}
    # a top-k beyond the vocabulary cuts nothing: every token stays drawable
    drawn = {sample_token(logits, GenerationConfig(do_sample=True, top_k=1000), rng) for _ in range(400)}
    assert drawn == {0, 1, 2, 3}


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=0), dict(top_k=-1), dict(top_p=0.0),
                                 dict(top_p=1.5)])
def test_bad_generation_options(bad):
    with pytest.raises(UserError):
        GenerationConfig(**bad)


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stream_decoder_holds_back_partial_characters(tmp_path):
    from accullm_export.runtime.tokenizer import FolderTokenizer, StreamDecoder
    from tests.helpers.models import write_byte_tokenizer

    # a byte-level BPE with no merges: "é" is two byte tokens, so the first alone is an incomplete character
    write_byte_tokenizer(tmp_path)
    wrapped = FolderTokenizer(tmp_path)
    ids = wrapped.encode("aé!")
    assert len(ids) == 4
    decoder = StreamDecoder(wrapped)
    pieces = [decoder.push(i) for i in ids]
    assert pieces == ["a", "", "é", "!"]


def test_sequences_over_the_maximum_positions_are_a_clear_error(tiny_exports):
    _, folder = tiny_exports["llama"]
    runner = OrtCausalLM.from_path(folder, device="cpu")
    assert runner.layout.max_positions == 1024
    with pytest.raises(UserError, match="exceed the model's maximum of 1024 positions"):
        runner.full_logits(np.ones((1, 1025), dtype=np.int64))


def test_statistics_sessions_run_without_weight_prepacking(tmp_path):
    """ONNX Runtime's prepacked MatMul weights are a second copy: the statistics sessions and any session with
    shared weights turn them off; a plain session keeps ONNX Runtime's default, and all give the same output."""
    from accullm_export.runtime.intermediates import IntermediateReader
    from accullm_export.runtime.session import create_session
    from tests.helpers.graphs import make_mlp

    path = tmp_path / "mlp.onnx"
    make_mlp(path)
    feed = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}

    def prepacking_off(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # never set: ONNX Runtime's default, prepacking on
            return False

    plain = create_session(path, device="cpu")
    tap = IntermediateReader(path).open(["y"])
    assert not prepacking_off(plain) and prepacking_off(tap.session)
    assert prepacking_off(create_session(path, device="cpu", prepack=False))
    np.testing.assert_array_equal(tap.run(feed)["y"], plain.run(["y"], feed)[0])


def test_validation_runs_both_models_lean_with_the_same_logits(tiny_exports):
    """validate holds two models in one process: each session keeps no prepacked weight copies and no per-shape
    memory pattern (the arena would keep each shape's block), and computes exactly what a default session does."""
    from accullm_export.validate.llm import load_pair

    _, folder = tiny_exports["llama"]
    ref, cand = load_pair(folder, folder, "basic")
    for runner in (ref, cand):
        options = runner.session.get_session_options()
        assert not options.enable_mem_pattern
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
    default = OrtCausalLM.from_path(folder, device="cpu", optimization="basic")
    assert default.session.get_session_options().enable_mem_pattern
    tokens = np.random.default_rng(0).integers(0, 200, (1, 40))
    for length in (40, 17, 40):  # a shape again after another: what a memory pattern would have served
        np.testing.assert_array_equal(ref.full_logits(tokens[:, :length]), default.full_logits(tokens[:, :length]))
    prompts = [[5, 17, 99, 3, 44, 8]]
    config = GenerationConfig(max_new_tokens=8)
    assert generate(ref, prompts, config).tokens == generate(default, prompts, config).tokens
