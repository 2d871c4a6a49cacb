"""LLM accuracy metrics in plain NumPy: perplexity, per-token KL, top-1 agreement, greedy prefixes."""

from __future__ import annotations

import dataclasses

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


CHUNK_BYTES = 16 << 20  # float64 bytes of one [positions, vocabulary] array at a time in TokenStatistics.add


@dataclasses.dataclass
class TokenStatistics:
    """Per-token figures accumulated over windows (one entry per predicted token)."""

    nll_reference: list[np.ndarray] = dataclasses.field(default_factory=list)
    nll_candidate: list[np.ndarray] = dataclasses.field(default_factory=list)
    kl: list[np.ndarray] = dataclasses.field(default_factory=list)
    top1_agree: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, reference_logits: np.ndarray, candidate_logits: np.ndarray, tokens: np.ndarray) -> None:
        """Add one batch: logits [batch, seq, vocab] for ``tokens`` [batch, seq]; position t predicts t+1.

        Each position's figures are its own, so they are computed a few positions at a time: the float64
        log-probabilities and their temporaries take about ``CHUNK_BYTES`` each, whatever the vocabulary (a
        whole 256-token window of a 151,936-token vocabulary would take 311 MB per array)."""
        batch, positions = tokens.shape[0], tokens.shape[1] - 1
        step = max(1, CHUNK_BYTES // (8 * batch * reference_logits.shape[-1]))
        nll_ref, nll_cand, kl = (np.empty((batch, positions)) for _ in range(3))
        agree = np.empty((batch, positions), dtype=bool)
        for start in range(0, positions, step):
            part = slice(start, min(start + step, positions))
            ref, cand = log_softmax(reference_logits[:, part]), log_softmax(candidate_logits[:, part])
            targets = tokens[:, 1:][:, part, None]
            nll_ref[:, part] = -np.take_along_axis(ref, targets, axis=-1)[..., 0]
            nll_cand[:, part] = -np.take_along_axis(cand, targets, axis=-1)[..., 0]
            kl[:, part] = (np.exp(ref) * (ref - cand)).sum(axis=-1)
            agree[:, part] = ref.argmax(-1) == cand.argmax(-1)
        self.nll_reference.append(nll_ref.ravel())
        self.nll_candidate.append(nll_cand.ravel())
        self.kl.append(kl.ravel())
        self.top1_agree.append(agree.ravel())

    def summary(self) -> dict[str, float]:
        nll_ref, nll_cand = np.concatenate(self.nll_reference), np.concatenate(self.nll_candidate)
        kl = np.maximum(np.concatenate(self.kl), 0.0)  # tiny negative values are rounding
        ppl_ref, ppl_cand = float(np.exp(nll_ref.mean())), float(np.exp(nll_cand.mean()))
        return {
            "ppl_reference": ppl_ref,
            "ppl_candidate": ppl_cand,
            "ppl_delta_pct": 100.0 * (ppl_cand / ppl_ref - 1.0),
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, 99)),
            "top1_agreement": float(np.concatenate(self.top1_agree).mean()),
            "tokens": int(kl.size),
        }

    def kl_histogram(self, bins: int = 40) -> dict[str, list]:
        """Log-spaced histogram of per-token KL; values under 1e-8 land in the first bin."""
        kl = np.maximum(np.concatenate(self.kl), 1e-8)
        edges = np.logspace(-8, max(np.log10(kl.max()), -7) + 0.01, bins + 1)
        counts, _ = np.histogram(kl, bins=edges)
        return {"bin_edges": edges.tolist(), "counts": counts.tolist()}


def shared_prefix(reference_argmax: np.ndarray, candidate_argmax: np.ndarray) -> int:
    """Length of the leading run where two argmax sequences agree."""
    differs = np.flatnonzero(np.asarray(reference_argmax) != np.asarray(candidate_argmax))
    return int(differs[0]) if differs.size else int(len(reference_argmax))


def tensor_errors(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs difference, relative L2 error and cosine similarity of two same-shape tensors."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cand = np.asarray(candidate, dtype=np.float64).ravel()
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch {reference.shape} vs {candidate.shape}")
    diff = ref - cand
    ref_norm, cand_norm = np.linalg.norm(ref), np.linalg.norm(cand)
    denominator = ref_norm * cand_norm
    return {
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
        "rel_error": float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff)),
        "cosine": float(ref @ cand / denominator) if denominator > 0 else float(ref_norm == cand_norm),
    }
