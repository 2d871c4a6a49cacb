"""argparse types for the numeric options: a bad value (negative, zero, out of range, non-finite, not a number) is
refused by argparse itself, with its one-line error and exit code 2, before any work starts. The parser class
keeps every argparse error to two lines: a one-line usage, then the message."""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable, Sequence

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


def one_line(message: str) -> str:
    """``message`` with its control characters escaped, so a path or value holding a newline stays on one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a one-line usage and a one-line message, from the subcommand at fault."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a value such as -1e-3 (--val-range -1e-3 1) is a number, not an option; argparse reads only -1 and -.5 so
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

    def format_usage(self) -> str:
        """The positionals and required options on one line (``--help`` shows the rest)."""
        shown = [action for action in self._actions if not action.option_strings or action.required]
        formatter = argparse.HelpFormatter(prog=self.prog, width=1 << 16)
        formatter.add_usage(None, shown, [])
        usage = formatter.format_help().strip()
        if len(shown) < len(self._actions):
            usage = usage.replace(self.prog, f"{self.prog} [options]", 1)
        return f"{usage}  (`{self.prog} --help` lists every option)\n"

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):
        """As argparse's, but leftover arguments and NUL bytes are reported by the subcommand they were given to."""
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(argv, namespace)
        command = self._command_parser(parsed)
        if extras:
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        _check_single_values(command, parsed)
        holding_nul = [arg for arg in argv if "\0" in arg]
        if holding_nul:  # no operating system passes one; from Python it would reach open() and raise there
            command.error(f"argument {holding_nul[0]!r} holds a NUL byte, which no path or value can hold")
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None))
                return chosen if chosen is not None else self
        return self


def _check_single_values(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> None:
    """An option of one value given as ``--option=--`` reaches Python 3.11's argparse as an empty list, past its type
    and choices: refuse it as argparse refuses a missing value."""
    for action in parser._actions:
        if action.nargs is not None or not action.dest or not hasattr(parsed, action.dest):
            continue
        value = getattr(parsed, action.dest)
        values = value if isinstance(action, argparse._AppendAction) and isinstance(value, list) else [value]
        if any(isinstance(item, list) for item in values):
            name = "/".join(action.option_strings) or action.metavar or action.dest
            parser.error(f"argument {name}: expected one argument")
