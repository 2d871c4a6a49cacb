"""Golden mode (speculative decoding): identical greedy output, the verifier's sampling distribution, fault safety
and the ``generate --golden`` command line, on tiny models built in code."""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest

from accullm_export.errors import BackendError, UserError
from accullm_export.runtime import CausalLMRunner, GenerationConfig, OrtCausalLM, generate
from accullm_export.runtime import speculative
from accullm_export.runtime.generation import sampling_distribution
from accullm_export.runtime.speculative import (ADAPTIVE_LIMIT, ADAPTIVE_START, SpeculativeDecoder, check_pair,
                                                first_divergence, next_draft_length, speculative_generate,
                                                verify_sampled)
from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.models import TEXT, make_tiny_checkpoint
from tests.helpers.recipes import make_recipe

# a larger initializer range than the default: random tiny models then produce varied text, not one repeated token
VARIED = dict(initializer_range=0.2)


@pytest.fixture(scope="module")
def golden_folders(tmp_path_factory):
    """verifier: a tiny Llama; w4a16: its INT4 quantization (a close draft); other: a differently seeded Llama of
    the same vocabulary and tokenizer (a bad draft)."""
    from accullm_export.build.quantize import quantize_model
    from accullm_export.calibration.run import CalibrationConfig, calibrate
    from accullm_export.models.export import export_model

    root = tmp_path_factory.mktemp("golden")
    folders = {}
    for name, seed in (("verifier", 3), ("other", 11)):
        export_model(str(make_tiny_checkpoint(root / f"{name}-hf", "llama", seed=seed, **VARIED)), root / name)
        folders[name] = root / name
    (root / "text.txt").write_text(TEXT)
    calibrate(folders["verifier"], root / "profile", CalibrationConfig(source=str(root / "text.txt"), samples=4,
                                                                       seq_len=32))
    quantize_model(folders["verifier"], root / "w4a16", make_recipe("w4a16", block_size=16, asymmetric=True),
                   root / "profile")
    folders["w4a16"] = root / "w4a16"
    return folders


@pytest.fixture(scope="module")
def runners(golden_folders):
    return {name: OrtCausalLM.from_path(folder, device="cpu") for name, folder in golden_folders.items()}


class FailingOnce(CausalLMRunner):
    """A runner whose ``fail_on``-th forward call raises (once); every other call runs ``inner``."""

    def __init__(self, inner: CausalLMRunner, fail_on: int):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.layout, self.folder = inner.layout, inner.folder

    def forward(self, input_ids, attention_mask, position_ids, past):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("device lost")
        return self.inner.forward(input_ids, attention_mask, position_ids, past)


class BiasedRunner(CausalLMRunner):
    """``inner`` with a fixed offset added to every logit row: a draft that disagrees with it in a known way."""

    def __init__(self, inner: CausalLMRunner, offset: np.ndarray):
        self.inner, self.offset = inner, offset.astype(np.float32)
        self.layout, self.folder = inner.layout, inner.folder

    def forward(self, input_ids, attention_mask, position_ids, past):
        logits, present = self.inner.forward(input_ids, attention_mask, position_ids, past)
        return logits + self.offset, present


def prompts_with_stops(verifier, count=24, new_tokens=64):
    """``count`` prompts of varied lengths; every other one with an EOS id that the verifier emits part-way
    (at its first token for one of them), so generation stops early there."""
    rng = np.random.default_rng(5)
    cases = []
    for index in range(count):
        prompt = rng.integers(3, 256, size=1 + (index * 7) % 40).tolist()
        eos = ()
        if index % 2:
            free = generate(verifier, [prompt], GenerationConfig(max_new_tokens=new_tokens)).tokens[0]
            eos = (free[(index // 2 * 5) % 40],)
        cases.append((prompt, GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=eos)))
    return cases


# ------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("draft_tokens", [1, 3, 8, None], ids=["k1", "k3", "k8", "adaptive"])
def test_greedy_output_is_the_verifiers_own(runners, draft_tokens):
    verifier = runners["verifier"]
    cases = prompts_with_stops(verifier)
    expected = [generate(verifier, [prompt], config).tokens[0] for prompt, config in cases]
    assert sum(len(tokens) < 64 for tokens in expected) >= 10
    rates = {}
    for draft_name in ("w4a16", "other"):
        draft, proposed, accepted = runners[draft_name], 0, 0
        for (prompt, config), tokens in zip(cases, expected):
            result = speculative_generate(draft, verifier, prompt, config, draft_tokens=draft_tokens)
            assert result.tokens == tokens, (draft_name, prompt,
                                             first_divergence(draft, verifier, prompt, result.tokens, tokens))
            assert result.draft_steps == result.proposed and result.accepted <= result.proposed
            assert result.proposed <= result.verifier_passes * (draft_tokens or ADAPTIVE_LIMIT)
            proposed, accepted = proposed + result.proposed, accepted + result.accepted
        rates[draft_name] = accepted / proposed
    # the unrelated model is a bad draft; the INT4 one agrees far more often
    assert rates["other"] < 0.05 and rates["w4a16"] > 0.1, rates


@pytest.mark.parametrize("draft_tokens", [1, 3, 8])
def test_a_draft_equal_to_the_verifier_is_always_accepted(golden_folders, runners, draft_tokens):
    verifier = runners["verifier"]
    twin = OrtCausalLM.from_path(golden_folders["verifier"], device="cpu")
    config = GenerationConfig(max_new_tokens=73)  # 72 after the prefill's token: a multiple of 2, 4 and 9
    result = speculative_generate(twin, verifier, [5, 17, 99, 3], config, draft_tokens=draft_tokens)
    assert result.tokens == generate(verifier, [[5, 17, 99, 3]], config).tokens[0]
    assert result.acceptance_rate == 1.0
    assert result.tokens_per_verifier_pass == draft_tokens + 1
    assert result.verifier_passes == 72 // (draft_tokens + 1)
    assert result.decode_tokens_per_second > 0


def test_adaptive_length_grows_with_full_acceptance(runners):
    verifier = runners["verifier"]
    decoder = SpeculativeDecoder(verifier, verifier, [5, 17, 99, 3], GenerationConfig(max_new_tokens=73))
    result = decoder.run()
    assert result.acceptance_rate == 1.0
    assert decoder.draft_tokens > ADAPTIVE_START
    assert result.tokens_per_verifier_pass > ADAPTIVE_START + 1


def test_next_draft_length():
    assert next_draft_length(4, proposed=4, accepted=4) == 5
    assert next_draft_length(ADAPTIVE_LIMIT, proposed=ADAPTIVE_LIMIT, accepted=ADAPTIVE_LIMIT) == ADAPTIVE_LIMIT
    assert next_draft_length(4, proposed=4, accepted=1) == 3
    assert next_draft_length(1, proposed=1, accepted=0) == 1
    assert next_draft_length(4, proposed=4, accepted=2) == 4
    assert next_draft_length(4, proposed=0, accepted=0) == 4  # a last pass that proposed nothing says nothing


def test_first_divergence_reports_both_models_margins(runners):
    verifier, draft = runners["verifier"], runners["w4a16"]
    prompt = [5, 17, 99, 3]
    reference = generate(verifier, [prompt], GenerationConfig(max_new_tokens=12)).tokens[0]
    assert first_divergence(draft, verifier, prompt, reference, reference) is None
    golden = reference[:5] + [(reference[5] + 1) % 256] + reference[6:]
    found = first_divergence(draft, verifier, prompt, golden, reference)
    assert found.position == 5 and found.golden_token == golden[5] and found.reference_token == reference[5]
    row = verifier.full_logits(np.array([prompt + reference[:5]]))[0, -1]
    top2 = np.argsort(row)[::-1][:2]
    assert found.verifier_top2 == (reference[5], int(top2[1]))
    assert found.verifier_margin == pytest.approx(float(row[top2[0]] - row[top2[1]]))
    assert found.draft_margin >= 0


# ------------------------------------------------------------------------------------------ sampling
def wilson_hilferty_p_value(statistic: float, dof: int) -> float:
    """Upper-tail p-value of a chi-square statistic (Wilson-Hilferty normal approximation)."""
    scale = 2.0 / (9.0 * dof)
    z = ((statistic / dof) ** (1.0 / 3.0) - (1.0 - scale)) / math.sqrt(scale)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def chi_square_p_value(observed: dict, expected: dict, draws: int) -> float:
    """Pearson's test of observed counts against expected probabilities; cells expecting fewer than 5 pooled."""
    cells = [(observed.get(key, 0), draws * p) for key, p in expected.items() if draws * p >= 5]
    pooled_observed = draws - sum(count for count, _ in cells)
    pooled_expected = draws - sum(mean for _, mean in cells)
    if pooled_expected > 0:
        cells.append((pooled_observed, pooled_expected))
    elif pooled_observed:
        return 0.0  # draws that the expected distribution rules out
    statistic = sum((count - mean) ** 2 / mean for count, mean in cells)
    return wilson_hilferty_p_value(statistic, len(cells) - 1)


def always_accept(verifier_probs, draft_probs, proposals, rng):
    """A wrong rule: keep every proposal (the output is then the draft's distribution)."""
    return len(proposals), int(rng.choice(verifier_probs.shape[-1], p=verifier_probs[len(proposals)]))


@pytest.mark.parametrize("rule, passes", [(verify_sampled, True), (always_accept, False)],
                         ids=["speculative-rule", "always-accept"])
def test_the_acceptance_rule_keeps_the_verifier_distribution(rule, passes):
    rng = np.random.default_rng(0)
    p = np.array([0.05, 0.30, 0.25, 0.0, 0.10, 0.30])
    q = np.array([0.20, 0.10, 0.25, 0.15, 0.25, 0.05])
    rows = np.stack([p, np.full(6, 1 / 6)])
    counts, draws = {}, 20000
    for _ in range(draws):
        proposal = int(rng.choice(6, p=q))
        accepted, following = rule(rows, q[None], [proposal], rng)
        token = proposal if accepted else following
        counts[token] = counts.get(token, 0) + 1
    p_value = chi_square_p_value(counts, dict(enumerate(p)), draws)
    assert (p_value > 1e-3) if passes else (p_value < 1e-12), p_value


def top_k_probabilities(row: np.ndarray, top_k: int) -> dict[int, float]:
    order = np.argsort(row)[::-1][:top_k]
    weights = np.exp(row[order].astype(np.float64) - row[order].max())
    return dict(zip(order.tolist(), (weights / weights.sum()).tolist()))


@pytest.mark.parametrize("rule, passes", [(verify_sampled, True), (always_accept, False)],
                         ids=["speculative-rule", "always-accept"])
def test_sampled_tokens_follow_the_verifiers_distribution(runners, monkeypatch, rule, passes):
    """Three sampled tokens (top-k 3, two proposals per pass) over many seeds: their joint distribution is the
    verifier's own, computed here from its logits; the same test fails when every proposal is kept."""
    monkeypatch.setattr(speculative, "verify_sampled", rule)
    verifier = runners["verifier"]
    draft = BiasedRunner(verifier, np.random.default_rng(2).normal(size=256) * 1.5)
    prompt, top_k, draws = [5, 17, 99, 3], 3, 3000
    expected = {}
    for first, p_first in top_k_probabilities(verifier.full_logits(np.array([prompt]))[0, -1], top_k).items():
        second_row = verifier.full_logits(np.array([prompt + [first]]))[0, -1]
        for second, p_second in top_k_probabilities(second_row, top_k).items():
            third_row = verifier.full_logits(np.array([prompt + [first, second]]))[0, -1]
            for third, p_third in top_k_probabilities(third_row, top_k).items():
                expected[(first, second, third)] = p_first * p_second * p_third
    counts, rejected = {}, 0
    for seed in range(draws):
        config = GenerationConfig(max_new_tokens=3, do_sample=True, top_k=top_k, seed=seed)
        result = speculative_generate(draft, verifier, prompt, config, draft_tokens=2)
        counts[tuple(result.tokens)] = counts.get(tuple(result.tokens), 0) + 1
        rejected += result.accepted < result.proposed
    if passes:  # the draft is different enough to exercise both branches of the rule
        assert 0.1 * draws < rejected < 0.9 * draws, rejected
    p_value = chi_square_p_value(counts, expected, draws)
    assert (p_value > 1e-3) if passes else (p_value < 1e-12), p_value


# ------------------------------------------------------------------------------------------ faults and limits
@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=40),
                                    GenerationConfig(max_new_tokens=40, do_sample=True, temperature=1.5, seed=3)],
                         ids=["greedy", "sampling"])
def test_a_failing_verifier_pass_keeps_the_state(runners, config):
    verifier, draft = runners["verifier"], runners["w4a16"]
    prompt = [9, 8, 7, 6, 5]
    expected = speculative_generate(draft, verifier, prompt, config, draft_tokens=3).tokens
    if not config.do_sample:
        assert expected == generate(verifier, [prompt], config).tokens[0]
    failing = FailingOnce(verifier, fail_on=3)  # the prefill, one verifier pass, then the failing one
    decoder = SpeculativeDecoder(draft, failing, prompt, config, draft_tokens=3)
    with pytest.raises(BackendError, match=r"the verifier failed on positions .*RuntimeError: device lost.* "
                                           r"stopped after \d+ new tokens"):
        decoder.run()
    assert decoder.verifier_passes == 1
    kept = list(decoder.tokens)
    assert 2 <= len(kept) <= 5 and kept == expected[:len(kept)]
    assert speculative.cache_length(decoder._verifier_cache) == len(prompt) + len(kept) - 1
    assert speculative.cache_length(decoder._draft_cache) <= len(prompt) + len(kept) - 1
    assert decoder.run().tokens == expected  # continuing from the kept state reproduces the uninterrupted output


def test_caches_hold_exactly_the_accepted_tokens_after_every_pass(runners):
    verifier, draft = runners["verifier"], runners["w4a16"]
    prompt = [9, 8, 7, 6, 5]
    decoder = SpeculativeDecoder(draft, verifier, prompt, GenerationConfig(max_new_tokens=40), draft_tokens=3)
    for _ in decoder:
        sequence = prompt + decoder.tokens
        lengths = {}
        for role, runner, cache in (("verifier", verifier, decoder._verifier_cache),
                                    ("draft", draft, decoder._draft_cache)):
            lengths[role] = speculative.cache_length(cache)
            ids = np.array([sequence[:lengths[role]]])
            _, fresh = runner.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], runner.empty_cache(1))
            for (key, value), (fresh_key, fresh_value) in zip(cache, fresh):
                np.testing.assert_allclose(key, fresh_key, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(value, fresh_value, rtol=1e-4, atol=1e-5)
        assert lengths["verifier"] == len(sequence) - 1
        assert len(sequence) - 2 <= lengths["draft"] <= len(sequence) - 1
    assert 0 < decoder.accepted < decoder.proposed  # proposals were both kept and refused


def test_requests_beyond_the_context_are_refused_before_running(runners):
    verifier = FailingOnce(runners["verifier"], fail_on=1)  # any forward call would raise
    assert verifier.layout.max_positions == 1024
    with pytest.raises(UserError, match="10 tokens plus 1015 new tokens exceed the draft's maximum of 1024"):
        speculative_generate(runners["w4a16"], verifier, list(range(3, 13)), GenerationConfig(max_new_tokens=1015))
    assert verifier.calls == 0
    assert len(speculative_generate(runners["w4a16"], runners["verifier"], list(range(3, 13)),
                                    GenerationConfig(max_new_tokens=8)).tokens) == 8


def test_different_vocabularies_and_bad_counts_are_refused(runners):
    verifier = runners["verifier"]
    wider = FailingOnce(verifier, fail_on=1)
    wider.layout = dataclasses.replace(verifier.layout, vocab_size=300)
    with pytest.raises(UserError, match=r"vocabulary \(300 tokens\) differs from the verifier's \(256\)"):
        speculative_generate(wider, verifier, [5, 6], GenerationConfig())
    with pytest.raises(UserError, match="draft_tokens must be in"):
        speculative_generate(verifier, verifier, [5, 6], GenerationConfig(), draft_tokens=0)
    with pytest.raises(UserError, match="at least one token"):
        speculative_generate(verifier, verifier, [], GenerationConfig())


# ------------------------------------------------------------------------------------------ command line
def test_cli_golden_prints_the_verifiers_text(golden_folders, capsys):
    verifier, draft = str(golden_folders["verifier"]), str(golden_folders["w4a16"])
    code, plain, _ = run_cli(capsys, "generate", verifier, "The river ran", "--max-new-tokens", "40",
                             "--device", "cpu")
    assert code == 0
    for extra in ([], ["--draft-tokens", "3"]):
        code, golden, err = run_cli(capsys, "generate", verifier, "The river ran", "--max-new-tokens", "40",
                                    "--device", "cpu", "--golden", draft, *extra)
        assert code == 0 and golden == plain
        summary = [line for line in err.splitlines() if line.startswith("[")]
        assert len(summary) == 1
        assert "acceptance" in summary[0] and "tokens per verifier pass" in summary[0] and "tokens/s" in summary[0]


def test_cli_refuses_a_draft_with_another_tokenizer(golden_folders, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    other = tmp_path / "other-tokenizer"
    shutil.copytree(golden_folders["w4a16"], other)
    Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(256)}, unk_token="w0")).save(
        str(other / "tokenizer.json"))
    code, _, err = run_cli(capsys, "generate", str(golden_folders["verifier"]), "hi", "--golden", str(other),
                           "--device", "cpu")
    assert_user_error(code, err, "different tokenizers")
    check_pair(golden_folders["w4a16"], golden_folders["verifier"] / "model.onnx")  # same tokenizer: no error
    code, _, err = run_cli(capsys, "generate", str(golden_folders["verifier"]), "hi", "--draft-tokens", "3")
    assert_user_error(code, err, "--draft-tokens needs --golden")


def test_cli_reports_a_failing_verifier_in_one_line(golden_folders, monkeypatch, capsys):
    from accullm_export.runtime import trt_runner

    load = trt_runner.load_runner
    verifier_folder = str(golden_folders["verifier"])

    def load_failing_verifier(path, **options):
        runner = load(path, **options)
        return FailingOnce(runner, fail_on=3) if str(path) == verifier_folder else runner

    monkeypatch.setattr(trt_runner, "load_runner", load_failing_verifier)
    code, _, err = run_cli(capsys, "generate", verifier_folder, "The river ran", "--max-new-tokens", "40",
                           "--device", "cpu", "--golden", str(golden_folders["w4a16"]), "--draft-tokens", "2")
    assert code == 3
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert "the verifier failed" in lines[0] and "device lost" in lines[0]
