"""Golden mode: lossless speculative decoding, a low-bit draft proposing tokens and the verifier deciding.

The draft proposes ``k`` tokens one at a time through its own KV cache; the verifier scores the last accepted
token and the ``k`` proposals in one pass through its KV cache. Greedy decoding keeps the longest prefix the
verifier's argmax agrees with, then the verifier's own token (at the first disagreement, or after all ``k``);
sampling uses the speculative-sampling rule, so the tokens are distributed as the verifier's own samples. Both
caches are cut back to the accepted tokens after every pass.

Example:
    >>> from accullm_export.runtime import GenerationConfig, OrtCausalLM
    >>> from accullm_export.runtime.speculative import speculative_generate
    >>> verifier = OrtCausalLM.from_path("out/smol")
    >>> draft = OrtCausalLM.from_path("out/smol-w4a16")
    >>> result = speculative_generate(draft, verifier, [1, 415, 5565], GenerationConfig(max_new_tokens=32))
    >>> result.tokens, result.acceptance_rate
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from accullm_export.errors import BackendError, UserError
from accullm_export.hashing import sha256_file
from accullm_export.runtime.base import CausalLMRunner, KVCache
from accullm_export.runtime.generation import GenerationConfig, sample_token, sampling_distribution, text_pieces
from accullm_export.safe_paths import inside

ADAPTIVE_START = 4  # draft tokens of the first pass when the count adapts
ADAPTIVE_LIMIT = 12  # the most draft tokens an adaptive pass proposes
MAX_DRAFT_TOKENS = 64  # the most a fixed count may ask for
# a golden folder (``build --golden``) records its pair and their files' hashes in this file
GOLDEN_MANIFEST, GOLDEN_KIND, GOLDEN_VERSION = "golden.json", "accullm-export/golden", 1


@dataclasses.dataclass
class SpeculativeResult:
    """New tokens of one prompt (stopping after EOS, which is kept), timings and how well the draft did."""

    tokens: list[int]
    prefill_seconds: float  # both models' prefill
    decode_seconds: float  # every draft step and verifier pass after the prefill
    verifier_passes: int
    draft_steps: int
    proposed: int  # draft tokens the verifier scored
    accepted: int  # of those, the ones it agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_verifier_pass(self) -> float:
        """Tokens after the first (which the prefill picks) per verifier pass."""
        return (len(self.tokens) - 1) / self.verifier_passes if self.verifier_passes else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Where a golden output first leaves the verifier's own greedy output, with both models' top-2 there.

    The logits come from one teacher-forced pass over the prompt and the common prefix; a small verifier margin
    means a near-tie that a k-token pass may round differently from one-token passes.
    """

    position: int  # index into the new tokens
    golden_token: int
    reference_token: int
    verifier_top2: tuple[int, int]
    verifier_margin: float  # top-1 logit minus top-2 logit
    draft_top2: tuple[int, int]
    draft_margin: float


def check_pair(draft_path: str | Path, verifier_path: str | Path) -> None:
    """Refuse a draft that cannot stand in for the verifier: their tokenizer.json files must be byte-identical,
    and a pair from a golden folder (``build --golden``) must be the two models its golden.json records, every
    file of both matching the SHA-256 recorded there.

    Args:
        draft_path: the draft's folder, .onnx file or .engine.
        verifier_path: the verifier's folder, .onnx file or .engine.

    Raises:
        UserError: a path does not exist, a folder has no tokenizer.json, the two differ, or golden.json names
            another pair (the draft and verifier swapped) or other file contents (a model or tokenizer edited or
            replaced after the build).
    """
    paths = {"draft": Path(draft_path), "verifier": Path(verifier_path)}
    folders = {}
    for role, path in paths.items():
        if not path.exists():
            raise UserError(f"{path}: no such {role} model (expected an exported folder, .onnx file or .engine)")
        folders[role] = path if path.is_dir() else path.parent
    for root in (folders["verifier"], folders["draft"].parent, folders["draft"]):
        manifest = read_golden(root)
        if manifest is not None:
            _check_golden(root, manifest, paths)
            break
    digests = {}
    for role, folder in folders.items():
        tokenizer = folder / "tokenizer.json"
        if not tokenizer.is_file():
            raise UserError(f"{folder} has no tokenizer.json: cannot confirm the {role} shares the "
                            "other model's tokenizer")
        digests[role] = sha256_file(tokenizer)
    if digests["draft"] != digests["verifier"]:
        raise UserError(f"draft {draft_path} and verifier {verifier_path} have different tokenizers "
                        "(tokenizer.json differs); golden mode needs a draft built from the verifier's model")


def read_golden(folder: str | Path) -> dict | None:
    """The golden.json of a golden folder (None when ``folder`` has none).

    Raises:
        UserError: the file is not a golden manifest this version reads.
    """
    from accullm_export.data.json_files import read_json_object

    path = Path(folder) / GOLDEN_MANIFEST
    if not path.is_file():
        return None
    manifest = read_json_object(path, "golden manifest")
    roles = [manifest.get(role) for role in ("draft", "verifier")]
    if manifest.get("kind") != GOLDEN_KIND or manifest.get("version") != GOLDEN_VERSION or not all(
            isinstance(role, dict) and isinstance(role.get("model"), str) and isinstance(role.get("files"), dict)
            for role in roles):
        raise UserError(f"{path} is not a golden manifest (kind {GOLDEN_KIND}, version {GOLDEN_VERSION}, with "
                        "draft and verifier entries)")
    return manifest


def is_golden_folder(path: str | Path) -> bool:
    """Whether ``path`` is a golden folder (``build --golden``'s, holding golden.json)."""
    return Path(path).is_dir() and (Path(path) / GOLDEN_MANIFEST).is_file()


def verifier_options(path: str | Path) -> dict:
    """How a verifier loads: ONNX Runtime models with ``exact`` MatMulNBits (float32 activations), so that a
    pass over k tokens computes each as k one-token passes would; a TensorRT engine as it is."""
    return {} if Path(path).suffix == ".engine" else {"exact": True}


def golden_models(folder: str | Path) -> tuple[Path, Path]:
    """(the draft's model file, the verifier's) that a golden folder's golden.json records.

    Raises:
        UserError: ``folder`` holds no golden.json, or it names a file outside the folder.
    """
    manifest = read_golden(folder)
    if manifest is None:
        raise UserError(f"{folder} has no {GOLDEN_MANIFEST}: name the draft (--golden DRAFT_DIR), or give a folder "
                        "written by `build --golden`")
    return tuple(inside(folder, manifest[role]["model"], named_by=Path(folder) / GOLDEN_MANIFEST,
                        what=f"{role} model") for role in ("draft", "verifier"))


def _check_golden(root: Path, manifest: dict, paths: dict[str, Path]) -> None:
    """The given pair is golden.json's, and every recorded file (models, data, tokenizers) hashes as recorded."""
    named_by = root / GOLDEN_MANIFEST
    for role, given in paths.items():
        record = manifest[role]
        expected = inside(root, record["model"], named_by=named_by, what=f"{role} model")
        model_file = given / Path(record["model"]).name if given.is_dir() else given
        if model_file.resolve() != expected:
            raise UserError(f"{given} is not the {role} that {named_by} records ({record['model']}): the draft and "
                            f"verifier may be swapped; run `accullm-export generate {root} PROMPT --golden`")
    recorded = {**manifest["draft"]["files"], **manifest["verifier"]["files"]}
    for relative, digest in recorded.items():
        path = inside(root, relative, named_by=named_by, what="model file")
        actual = sha256_file(path)
        if actual != digest:
            raise UserError(f"{path} does not match {named_by} (sha256 {actual[:12]}... where {str(digest)[:12]}... "
                            "was recorded): a model or tokenizer was edited or replaced after the build; build "
                            "the golden folder again")
    tokenizer = manifest.get("tokenizer_sha256")
    for relative in (name for name in recorded if Path(name).name == "tokenizer.json"):
        if recorded[relative] != tokenizer:
            raise UserError(f"{named_by} records a tokenizer {relative} other than the pair's "
                            f"({str(tokenizer)[:12]}...); build the golden folder again")


def check_runners(draft: CausalLMRunner, verifier: CausalLMRunner, prompt_length: int, max_new_tokens: int) -> None:
    """Refuse a pair with different vocabularies, or a request longer than either model's context."""
    if prompt_length < 1:
        raise UserError("the prompt needs at least one token")
    vocabularies = (draft.layout.vocab_size, verifier.layout.vocab_size)
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        raise UserError(f"the draft's vocabulary ({vocabularies[0]} tokens) differs from the verifier's "
                        f"({vocabularies[1]}); golden mode needs one tokenizer")
    for role, runner in (("draft", draft), ("verifier", verifier)):
        limit = runner.layout.max_positions
        if limit is not None and prompt_length + max_new_tokens > limit:
            raise UserError(f"the prompt's {prompt_length} tokens plus {max_new_tokens} new tokens exceed the "
                            f"{role}'s maximum of {limit} positions")


def verify_sampled(verifier_probs: np.ndarray, draft_probs: np.ndarray, proposals: Sequence[int],
                   rng: np.random.Generator) -> tuple[int, int]:
    """The speculative-sampling rule: how many proposals to keep, and the token that follows them.

    Proposal ``x`` (drawn from ``draft_probs[i]``) is kept with probability min(1, p(x) / q(x)); the first one
    refused is replaced by a draw from normalize(max(0, p - q)); after all are kept, the next token is drawn from
    the verifier's last row. The result is distributed exactly as drawing from the verifier alone.

    Args:
        verifier_probs: [len(proposals) + 1, vocab] verifier probabilities after each prefix.
        draft_probs: [len(proposals), vocab] the draft probabilities the proposals were drawn from.
        proposals: the draft's tokens.
        rng: the generator for the acceptance tests and draws.
    """
    vocab = verifier_probs.shape[-1]
    for index, token in enumerate(proposals):
        p, q = verifier_probs[index], draft_probs[index]
        if rng.random() * q[token] < p[token]:
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return index, int(rng.choice(vocab, p=residual / total if total > 0 else p))
    return len(proposals), int(rng.choice(vocab, p=verifier_probs[len(proposals)]))


def next_draft_length(current: int, proposed: int, accepted: int, limit: int = ADAPTIVE_LIMIT) -> int:
    """Adaptive draft length: one more after a pass that kept every proposal, one fewer after one that kept
    fewer than half, within [1, limit]."""
    if proposed == 0:
        return current
    if accepted == proposed:
        return min(current + 1, limit)
    if 2 * accepted < proposed:
        return max(current - 1, 1)
    return current


def truncate_cache(cache: KVCache, length: int) -> KVCache:
    """The first ``length`` positions of every layer's key and value ([batch, kv_heads, seq, head_dim])."""
    if cache_length(cache) == length:
        return cache
    return [(np.ascontiguousarray(key[:, :, :length]), np.ascontiguousarray(value[:, :, :length]))
            for key, value in cache]


def cache_length(cache: KVCache) -> int:
    return int(cache[0][0].shape[2]) if cache else 0


class SpeculativeDecoder:
    """Golden-mode generation for one prompt, a pass at a time.

    Iterating yields the tokens each verifier pass adds (first, the token the verifier's prefill picks). A pass
    updates the tokens, both caches and the random state together only once it has succeeded: when a model
    raises, a BackendError leaves the decoder as it was before that pass, and iterating again continues from
    there.
    """

    def __init__(self, draft: CausalLMRunner, verifier: CausalLMRunner, prompt_ids: Sequence[int],
                 config: GenerationConfig, draft_tokens: int | None = None):
        """See :func:`speculative_generate` for the arguments."""
        if draft_tokens is not None and not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
            raise UserError(f"draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {draft_tokens}")
        check_runners(draft, verifier, len(prompt_ids), config.max_new_tokens)
        self.draft, self.verifier, self.config = draft, verifier, config
        self.prompt = [int(token) for token in prompt_ids]
        self.adaptive = draft_tokens is None
        self.draft_tokens = ADAPTIVE_START if draft_tokens is None else draft_tokens
        self.tokens: list[int] = []
        self.prefill_seconds = self.decode_seconds = 0.0
        self.verifier_passes = self.draft_steps = self.proposed = self.accepted = 0
        self._rng = np.random.default_rng(config.seed)
        self._verifier_cache: KVCache = []  # prompt + tokens[:-1]
        self._draft_cache: KVCache = []  # a prefix of prompt + tokens

    @property
    def done(self) -> bool:
        return bool(self.tokens) and (self.tokens[-1] in self.config.eos_token_ids
                                      or len(self.tokens) >= self.config.max_new_tokens)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.tokens:
            yield self._prefill()
        while not self.done:
            yield self._verify_pass()

    def run(self) -> SpeculativeResult:
        """Generate to the end (or continue after an error) and return the result."""
        for _ in self:
            pass
        return self.result()

    def result(self) -> SpeculativeResult:
        return SpeculativeResult(tokens=list(self.tokens), prefill_seconds=self.prefill_seconds,
                                 decode_seconds=self.decode_seconds, verifier_passes=self.verifier_passes,
                                 draft_steps=self.draft_steps, proposed=self.proposed, accepted=self.accepted)

    def _prefill(self) -> list[int]:
        rng_state = self._rng.bit_generator.state
        started = time.perf_counter()
        try:
            logits, verifier_cache = self._forward("verifier", self.verifier, self.prompt, [])
            _, draft_cache = self._forward("draft", self.draft, self.prompt, [])
            first = self._pick(logits[0, -1])
        except BaseException:
            self._rng.bit_generator.state = rng_state
            raise
        self.prefill_seconds = time.perf_counter() - started
        self.tokens, self._verifier_cache, self._draft_cache = [first], verifier_cache, draft_cache
        return [first]

    def _verify_pass(self) -> list[int]:
        """One round: the draft proposes, the verifier scores them in one pass, the agreed prefix is kept."""
        count = min(self.draft_tokens, self.config.max_new_tokens - len(self.tokens) - 1)
        sequence = self.prompt + self.tokens
        rng_state = self._rng.bit_generator.state
        started = time.perf_counter()
        try:
            proposals, draft_probs, draft_cache = self._propose(sequence, count)
            logits, verifier_cache = self._forward("verifier", self.verifier, [sequence[-1], *proposals],
                                                   self._verifier_cache)
            if self.config.do_sample:
                verifier_probs = np.stack([sampling_distribution(row, self.config) for row in logits[0]])
                accepted, following = verify_sampled(verifier_probs, draft_probs, proposals, self._rng)
            else:
                choices = np.argmax(logits[0], axis=-1)
                accepted = next((i for i, token in enumerate(proposals) if token != choices[i]), count)
                following = int(choices[accepted])
        except BaseException:
            self._rng.bit_generator.state = rng_state
            raise
        added = _through_eos([*proposals[:accepted], following], self.config.eos_token_ids)
        self.tokens = self.tokens + added
        kept = len(self.prompt) + len(self.tokens) - 1
        self._verifier_cache = truncate_cache(verifier_cache, kept)
        self._draft_cache = truncate_cache(draft_cache, min(cache_length(draft_cache), kept))
        self.verifier_passes += 1
        self.draft_steps += count
        self.proposed += count
        self.accepted += accepted
        if self.adaptive:
            self.draft_tokens = next_draft_length(self.draft_tokens, count, accepted)
        self.decode_seconds += time.perf_counter() - started
        return added

    def _propose(self, sequence: list[int], count: int) -> tuple[list[int], np.ndarray | None, KVCache]:
        """``count`` draft tokens, one step each; returns them, their draft probabilities when sampling (the rows
        they were drawn from), and the draft's cache (which then lacks the last proposal)."""
        cache = self._draft_cache
        feed = sequence[cache_length(cache):]
        proposals, rows = [], []
        for _ in range(count):
            logits, cache = self._forward("draft", self.draft, feed, cache)
            if self.config.do_sample:
                rows.append(sampling_distribution(logits[0, -1], self.config))
                token = int(self._rng.choice(rows[-1].size, p=rows[-1]))
            else:
                token = int(np.argmax(logits[0, -1]))
            proposals.append(token)
            feed = [token]
        return proposals, np.stack(rows) if rows else None, cache

    def _pick(self, logits: np.ndarray) -> int:
        return sample_token(logits, self.config, self._rng) if self.config.do_sample else int(np.argmax(logits))

    def _forward(self, role: str, runner: CausalLMRunner, token_ids: list[int], past: KVCache):
        start = cache_length(past)
        end = start + len(token_ids)
        try:
            return runner.forward(np.array([token_ids], dtype=np.int64), np.ones((1, end), dtype=np.int64),
                                  np.arange(start, end, dtype=np.int64)[None], past or runner.empty_cache(1))
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            raise BackendError(f"the {role} failed on positions {start}-{end - 1} ({type(exc).__name__}: {reason}); "
                               f"stopped after {len(self.tokens)} new tokens with both caches intact") from exc


def _through_eos(tokens: list[int], eos_token_ids: Sequence[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: index + 1]
    return tokens


def speculative_generate(draft: CausalLMRunner, verifier: CausalLMRunner, prompt_ids: Sequence[int],
                         config: GenerationConfig, draft_tokens: int | None = None) -> SpeculativeResult:
    """Generate for one prompt with ``draft`` proposing and ``verifier`` deciding.

    Greedy output is token-for-token the verifier's own greedy output (up to near-ties that a multi-token pass
    rounds differently; see :func:`first_divergence`), stopping at EOS or ``max_new_tokens`` as
    :func:`~accullm_export.runtime.generation.generate` does; sampled output is distributed as the verifier's
    own samples.

    Args:
        draft: the low-bit model that proposes tokens.
        verifier: the model whose output this is.
        prompt_ids: the prompt's token ids (batch 1).
        config: as for ``generate``; ``do_sample`` applies the same temperature, top-k and top-p to both models.
        draft_tokens: tokens proposed per verifier pass; None adapts it (from ``ADAPTIVE_START``, within
            [1, ``ADAPTIVE_LIMIT``]).

    Raises:
        UserError: different vocabularies, an empty prompt, a bad ``draft_tokens``, or prompt plus new tokens
            beyond either model's maximum positions.
        BackendError: a model failed during a pass (see :class:`SpeculativeDecoder` to continue).
    """
    return SpeculativeDecoder(draft, verifier, prompt_ids, config, draft_tokens).run()


def speculative_text(draft: CausalLMRunner, verifier: CausalLMRunner, prompt: str, config: GenerationConfig,
                     draft_tokens: int | None = None, tokenizer=None) -> tuple[SpeculativeDecoder, Iterator[str]]:
    """Set up golden-mode generation for one text prompt, as ``text_stream`` does for one model.

    Returns the decoder (whose counters and timings fill in while it runs) and an iterator of text pieces that
    stops at EOS. The verifier folder's tokenizer and EOS ids are used unless given.
    """
    from accullm_export.runtime.tokenizer import FolderTokenizer

    tokenizer = tokenizer or FolderTokenizer(verifier.folder)
    if not config.eos_token_ids:
        config = dataclasses.replace(config, eos_token_ids=tuple(tokenizer.eos_token_ids))
    decoder = SpeculativeDecoder(draft, verifier, tokenizer.encode(prompt), config, draft_tokens)
    return decoder, text_pieces((token for tokens in decoder for token in tokens), tokenizer, config.eos_token_ids)


def first_divergence(draft: CausalLMRunner, verifier: CausalLMRunner, prompt_ids: Sequence[int],
                     golden_tokens: Sequence[int], reference_tokens: Sequence[int]) -> Divergence | None:
    """The first position (over their common length) where a golden output differs from the verifier's own
    greedy output, with both models' top-2 tokens and logit margins there; None when they agree."""
    position = next((i for i, (golden, reference) in enumerate(zip(golden_tokens, reference_tokens))
                     if golden != reference), None)
    if position is None:
        return None
    prefix = np.array([[*prompt_ids, *reference_tokens[:position]]], dtype=np.int64)
    tops = []
    for runner in (verifier, draft):
        row = runner.full_logits(prefix)[0, -1]
        second, first = np.argsort(row, kind="stable")[-2:]
        tops.append(((int(first), int(second)), float(row[first] - row[second])))
    return Divergence(position=position, golden_token=int(golden_tokens[position]),
                      reference_token=int(reference_tokens[position]), verifier_top2=tops[0][0],
                      verifier_margin=tops[0][1], draft_top2=tops[1][0], draft_margin=tops[1][1])
