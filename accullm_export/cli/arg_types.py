"""argparse types for the numeric options: a bad value (negative, zero, out of range, non-finite, not a number) is
refused by argparse itself, with its one-line error and exit code 2, before any work starts."""

from __future__ import annotations

import argparse
import math
from typing import Callable

MAX_TOKENS = 1 << 20  # a sequence length or a number of generated tokens
MAX_COUNT = 1_000_000  # windows, samples, prompts, iterations, optimizer steps
MAX_BATCH = 4096
MAX_SEED = 2**32 - 1  # what NumPy's and torch's generators take on every platform


def integer(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,}, got {value:,}")
        return value

    return parse


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval from ``low`` to ``high`` (each end closed unless ``*_open``)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value:g}")
        return value

    return parse


positive_int = integer(1, MAX_COUNT)  # counts: windows, samples, prompts, steps
non_negative_int = integer(0, MAX_COUNT)
token_count = integer(1, MAX_TOKENS)  # sequence lengths and generated tokens
batch_size = integer(1, MAX_BATCH)
seed = integer(0, MAX_SEED)
finite_float = number()
non_negative = number(0.0)
positive = number(0.0, low_open=True)
fraction = number(0.0, 1.0)  # [0, 1]: a top-1 agreement
skip_fraction = number(0.0, 1.0, high_open=True)  # [0, 1): the share of MLP neurons skipped
percent = number(0.0, 100.0)
