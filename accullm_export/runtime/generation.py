"""Prefill-then-decode generation over any :class:`CausalLMRunner`: greedy or sampling, streamed."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from accullm_export.errors import UserError
from accullm_export.runtime.base import CausalLMRunner, position_ids_from_mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How to pick tokens. Greedy unless ``do_sample``; top_k 0 and top_p 1.0 mean no truncation."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class GenerationResult:
    """New tokens per prompt (stopping after EOS, which is kept) and timings."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        rows = len(self.tokens)
        return rows * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class GenerationStream:
    """Iterating yields one array of next tokens (one per prompt) per step; timings fill in as it runs."""

    def __init__(self, runner: CausalLMRunner, prompts: Sequence[Sequence[int]], config: GenerationConfig):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        self.runner, self.config = runner, config
        self.prompts = [list(map(int, p)) for p in prompts]
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.decode_steps = 0
        self._rng = np.random.default_rng(config.seed)

    def __iter__(self) -> Iterator[np.ndarray]:
        input_ids, mask = left_pad(self.prompts)
        positions = position_ids_from_mask(mask)
        started = time.perf_counter()
        logits, past = self.runner.forward(input_ids, mask, positions, self.runner.empty_cache(len(self.prompts)))
        self.prefill_seconds = time.perf_counter() - started
        finished = np.zeros(len(self.prompts), dtype=bool)
        eos = np.asarray(self.config.eos_token_ids, dtype=np.int64)
        next_positions = positions[:, -1:] + 1
        for step in range(self.config.max_new_tokens):
            tokens = self._select(logits[:, -1, :])
            tokens = np.where(finished, eos[0] if eos.size else 0, tokens)
            yield tokens
            finished |= np.isin(tokens, eos)
            if finished.all() or step == self.config.max_new_tokens - 1:
                return
            mask = np.concatenate([mask, np.ones((len(self.prompts), 1), dtype=np.int64)], axis=1)
            started = time.perf_counter()
            logits, past = self.runner.forward(tokens[:, None], mask, next_positions, past)
            self.decode_seconds += time.perf_counter() - started
            self.decode_steps += 1
            next_positions = next_positions + 1

    def _select(self, logits: np.ndarray) -> np.ndarray:
        if not self.config.do_sample:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([sample_token(row, self.config, self._rng) for row in logits], dtype=np.int64)


def sample_token(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """A draw from ``sampling_distribution``."""
    probs = sampling_distribution(logits, config)
    return int(rng.choice(len(probs), p=probs))


def sampling_distribution(logits: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """The probabilities sampling draws from (float64): temperature, then top-k, then nucleus (top-p)."""
    scaled = logits.astype(np.float64) / config.temperature
    if config.top_k and config.top_k < scaled.size:  # a k beyond the vocabulary cuts nothing
        kth = np.partition(scaled, -config.top_k)[-config.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, config.top_p)) + 1]
        truncated = np.zeros_like(probs)
        truncated[keep] = probs[keep]
        probs = truncated / truncated.sum()
    return probs


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Batch prompts with left padding; returns (input_ids, attention_mask), both int64."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate(runner: CausalLMRunner, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> GenerationResult:
    """Generate for a batch of token-id prompts; each row stops after its first EOS."""
    stream = GenerationStream(runner, prompts, config)
    rows: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    eos = set(config.eos_token_ids)
    for tokens in stream:
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                rows[row].append(token)
                done[row] = token in eos
    return GenerationResult(tokens=rows, prefill_seconds=stream.prefill_seconds,
                            decode_seconds=stream.decode_seconds, decode_steps=stream.decode_steps)


def text_stream(runner: CausalLMRunner, prompt: str, config: GenerationConfig,
                tokenizer=None) -> tuple[GenerationStream, Iterator[str]]:
    """Set up streaming generation for one text prompt.

    Returns the stream (whose timings fill in while it runs) and an iterator of text pieces that stops at
    EOS. The model folder's tokenizer and EOS ids are used unless given.
    """
    from accullm_export.runtime.tokenizer import FolderTokenizer

    tokenizer = tokenizer or FolderTokenizer(runner.folder)
    if not config.eos_token_ids:
        config = dataclasses.replace(config, eos_token_ids=tuple(tokenizer.eos_token_ids))
    stream = GenerationStream(runner, [tokenizer.encode(prompt)], config)
    return stream, text_pieces((int(tokens[0]) for tokens in stream), tokenizer, config.eos_token_ids)


def text_pieces(tokens: Iterable[int], tokenizer, eos_token_ids: Sequence[int]) -> Iterator[str]:
    """The text of ``tokens`` as it streams in, up to (not including) the first EOS."""
    from accullm_export.runtime.tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer)
    for token in tokens:
        if token in eos_token_ids:
            return
        piece = decoder.push(token)
        if piece:
            yield piece


def generate_text(runner: CausalLMRunner, prompt: str, config: GenerationConfig, tokenizer=None) -> Iterator[str]:
    """Stream text pieces for one prompt (see :func:`text_stream`)."""
    return text_stream(runner, prompt, config, tokenizer)[1]
