"""Hostile input for the command line and recipe files: the bad-input contract, a sandbox that notices anything a
refused command leaves, a TOML writer for what the recipe writer refuses (NaN, wrong types, odd keys), and
hypothesis strategies that make only values the kit must refuse.

The allowed values below are written from docs/recipes.md and the options' help texts, not read from the kit, so a
check that drifts from its documentation fails here.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import re
import shutil
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from accullm_export.cli.main import build_parser, main

CANARY = b"canary: a file beside the output; a refused command never touches it\n"

# Deterministic for CI: the same examples on every run, no example database; each test sets max_examples.
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------- the contract
def run_main(capsys, argv) -> tuple[int, str]:
    """(exit code, stderr) of ``accullm-export *argv`` run in-process; argparse's exit counts as a return."""
    try:
        code = main(list(argv))
    except SystemExit as exited:
        code = exited.code
    return code, capsys.readouterr().err


def escaped(text: str) -> str:
    """``text`` as a one-line error message shows it: control characters written as Python escapes."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def assert_refused(code, err: str, needle: str, *, argparse_error: bool | None = None) -> str:
    """Exit code 2, no traceback, and one message line holding ``needle`` (I/W log lines aside, and after the one
    usage line an argparse error starts with); returns that line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("I ", "W "))]
    usage = bool(lines) and lines[0].startswith("usage: ")
    if argparse_error is not None:
        assert usage == argparse_error, err
    lines = lines[1:] if usage else lines
    assert len(lines) == 1, err
    assert needle in lines[0], err
    return lines[0]


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() and not p.is_symlink() else -1)
                  for p in folder.rglob("*"))


class Sandbox:
    """A folder holding a canary file and the output path; ``check`` asserts a refused command changed nothing
    there (no output folder, no ``.partial`` staging folder, no temp file) nor in the watched input folders."""

    def __init__(self, root: Path, *watched: Path):
        self.root = root
        self.out = root / "out"
        self.canary = root / "canary.bin"
        self.canary.write_bytes(CANARY)
        self.watched = (root, *watched)

    def snapshot(self) -> dict:
        return {folder: _listing(folder) for folder in self.watched}

    def refused(self, capsys, argv, needle: str, *, argparse_error: bool | None = False) -> str:
        """Runs ``argv`` and asserts the contract; returns the message line."""
        before = self.snapshot()
        code, err = run_main(capsys, argv)
        after, left = self.snapshot(), self.out.exists()
        if left:  # a command that wrongly ran is cleaned up, so the next example starts from the same state
            shutil.rmtree(self.out)
        line = assert_refused(code, err, needle, argparse_error=argparse_error)
        assert self.canary.read_bytes() == CANARY
        assert not left and after == before
        return line


# -------------------------------------------------------------------------------------------------- TOML writing
def toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\"}
    return '"' + "".join(escapes.get(ch, f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                         for ch in text) + '"'


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_document(data: dict) -> str:
    """``data`` as TOML: top-level values first, then one ``[table]`` per top-level dict (inline tables below)."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{toml_key(key)}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ the recipe tree, as documented
MAX_COUNT = 1_000_000  # windows, samples, steps, channels, rows
MAX_TOKENS = 1 << 20
MAX_SEED = 2**32 - 1
BLOCKS = (16, 32, 64, 128, 256)
TEXT = st.characters(exclude_categories=("Cs",))  # any character a UTF-8 file can hold

# key -> its TOML type: int, float (an integer also reads as one), bool, str, str|int, list
RECIPE_KEYS = {
    "version": "int", "name": "str", "backend": "str",
    "weights.precision": "str", "weights.block_size": "int", "weights.scale_search": "bool",
    "weights.asymmetric": "bool", "weights.scale_bits": "int", "weights.awq": "bool", "weights.overrides": "list",
    "weights.embeddings": "str",
    "activations.mode": "str", "activations.group": "str|int", "activations.smoothquant": "float",
    "outliers.channels": "str|int", "outliers.policy": "str", "outliers.layers": "list",
    "outliers.min_channels": "list", "outliers.bits": "int", "outliers.planes": "bool",
    "gptq.enabled": "bool", "gptq.samples": "int",
    "distill.steps": "int", "distill.norms": "bool", "distill.outlier_rows": "bool", "distill.lr": "float",
    "distill.samples": "int", "distill.weight_steps": "int",
    "rotation.layers": "list",
    "vocab.refine_rows": "str|int", "vocab.samples": "int",
    "sparsity.fraction": "float", "sparsity.method": "str", "sparsity.predictor_rank": "int",
    "sparsity.predictor_samples": "int", "sparsity.predictor_steps": "int", "sparsity.seed": "int",
    "sparsity.dense_first_token": "bool",
    "graph.onnxruntime_fusions": "bool",
}
SECTIONS = sorted({key.split(".")[0] for key in RECIPE_KEYS if "." in key})
PRESET_ONLY = ("description", "backends", "measured", "onnxruntime", "tensorrt")

HUGE = st.sampled_from([2**63, 2**64 + 1, 10**400, -(2**63) - 1, -(10**400)])  # past int64, past a float
_ints = st.integers(-10**30, 10**30) | HUGE
_floats = st.floats(allow_nan=True, allow_infinity=True)
_words = st.text(TEXT, max_size=12)
VALUES = {  # one strategy per TOML type; a wrong type is any of the others
    "int": _ints, "float": _floats, "bool": st.booleans(), "str": _words, "date": st.dates(),
    "list": st.lists(st.integers(-3, 3) | st.text(TEXT, max_size=4), max_size=3),
    "table": st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.integers(-3, 3), max_size=2),
}
ACCEPTED = {"int": {"int"}, "float": {"int", "float"}, "bool": {"bool"}, "str": {"str"}, "str|int": {"str", "int"},
            "list": {"list"}}


def wrong_type(kind: str) -> st.SearchStrategy:
    """A value of a TOML type the key does not take."""
    others = [strategy for name, strategy in VALUES.items() if name not in ACCEPTED[kind]]
    if kind == "list":  # a list whose entries are of the wrong type
        others.append(st.lists(st.integers() | st.booleans() | st.floats(allow_nan=False), min_size=1, max_size=3))
    return st.one_of(*others)


def _outside(low: int, high: int) -> st.SearchStrategy:
    return (st.integers(max_value=low - 1, min_value=-10**30) | st.integers(min_value=high + 1, max_value=10**30)
            | HUGE.filter(lambda v: not low <= v <= high))


def _word_not(*allowed: str) -> st.SearchStrategy:
    return (st.sampled_from(["", " ", "INT4", "auto ", "none", "fp8", "\n", "int4\x00"]) | _words).filter(
        lambda text: text not in allowed)


EMPTY_PATTERNS = st.sampled_from(["", "!", "/", "!/", "//", "!///"])
GOOD_PATTERNS = st.sampled_from(["lm_head", "layers.0", "*down_proj*", "/model/layers.1/mlp"])
VALID_OVERRIDE = re.compile(r"fp32|fp16|int8|int4|int4:(16|32|64|128|256)")
_bad_precision = (st.sampled_from(["int3", "int4:100", "int4:0", "int4:", "int8:64", "fp16:16", "int4:\u00b2",
                                   "int4:\u0663\u0662", "int4:99999999999999999999", "INT8", "int4:-64", ""])
                  | st.text(TEXT, max_size=10)).filter(lambda text: not VALID_OVERRIDE.fullmatch(text))
_patterns = st.lists(GOOD_PATTERNS, max_size=2)

IMPOSSIBLE = {  # key -> values of the right type the key refuses on its own
    "version": _ints.filter(lambda v: v != 1),
    "backend": _word_not("onnxruntime", "tensorrt"),
    "weights.precision": _word_not("int4", "int8", "fp16"),
    "weights.block_size": _ints.filter(lambda v: v not in BLOCKS),
    "weights.scale_bits": _ints.filter(lambda v: v not in (16, 8)),
    "weights.embeddings": _word_not("int8", "fp16", "fp32"),
    "weights.overrides": st.one_of(
        st.tuples(GOOD_PATTERNS, _bad_precision).map(list),
        st.tuples(EMPTY_PATTERNS, st.sampled_from(["int8", "fp16", "int4:64"])).map(list)).map(lambda e: [e]),
    "activations.mode": _word_not("none", "static", "dynamic"),
    "activations.group": _ints.filter(lambda v: v not in BLOCKS and v != 0) | _word_not("auto"),  # 0: older "off"
    "activations.smoothquant": (_floats | _ints).filter(lambda v: not (v == 0 or 0 < v < 1)),
    "outliers.channels": _outside(0, MAX_COUNT) | _word_not("auto"),
    "outliers.policy": _word_not("profile", "threshold", "topk", "ratio", "sensitivity"),
    "outliers.layers": st.tuples(_patterns, EMPTY_PATTERNS).map(lambda pair: [*pair[0], pair[1]]),
    "outliers.min_channels": st.one_of(
        st.tuples(GOOD_PATTERNS, _outside(1, MAX_COUNT)).map(list),
        st.tuples(EMPTY_PATTERNS, st.integers(1, 8)).map(list)).map(lambda e: [e]),
    "outliers.bits": _ints.filter(lambda v: v not in (16, 8)),
    "gptq.samples": _outside(1, MAX_COUNT),
    "distill.steps": _outside(0, MAX_COUNT),
    "distill.lr": (_floats | st.integers(-10**30, 0) | st.integers(10**20, 10**30) | HUGE).filter(
        lambda v: not 0 < v <= 2**64),  # compared, not made a float: an integer past float's range is refused too
    "distill.samples": _outside(1, MAX_COUNT),
    "distill.weight_steps": _outside(0, 10**18),
    "rotation.layers": st.tuples(_patterns, EMPTY_PATTERNS).map(lambda pair: [*pair[0], pair[1]]),
    "vocab.refine_rows": _outside(0, MAX_COUNT) | _word_not("auto"),
    "vocab.samples": _outside(1, MAX_COUNT),
    "sparsity.fraction": (_floats | _ints).filter(lambda v: not 0 <= v < 1),
    "sparsity.method": _word_not("threshold", "predictor"),
    "sparsity.predictor_rank": _outside(1, 65536),
    "sparsity.predictor_samples": _outside(1, MAX_COUNT),
    "sparsity.predictor_steps": _outside(1, MAX_COUNT),
    "sparsity.seed": _outside(0, MAX_SEED),
}


def base_recipes() -> list[dict]:
    """Every shipped preset resolved for each backend it runs on, as ``--dump-config`` writes it."""
    from accullm_export.recipes.presets import all_presets

    return [preset.resolve(backend).to_dict() for preset in all_presets().values() for backend in preset.backends]


def with_value(base: dict, key: str, value, table: str | None = None) -> dict:
    """A copy of ``base`` with ``key`` set to ``value`` (inside ``base[table]`` when a backend table is named)."""
    data = copy.deepcopy(base)
    target = data.setdefault(table, {}) if table else data
    *section, name = key.split(".")
    if section:
        target = target.setdefault(section[0], {})
    target[name] = value
    return data


# ------------------------------------------------------------------------------------- numeric flags, as documented
INF = math.inf
COUNT, TOKENS, SEED = (1, MAX_COUNT), (1, MAX_TOKENS), (0, MAX_SEED)
NON_NEGATIVE, POSITIVE, FRACTION, SKIP = (0, INF, False, False), (0, INF, True, False), (0, 1, False, False), (
    0, 1, False, True)
# (command, option) -> ("int", low, high) or ("float", low, high, low open, high open), from each option's help
NUMERIC = {
    ("generate", "--max-new-tokens"): ("int", *TOKENS), ("generate", "--temperature"): ("float", *POSITIVE),
    ("generate", "--top-k"): ("int", 0, 2**31 - 1), ("generate", "--top-p"): ("float", 0, 1, True, False),
    ("generate", "--seed"): ("int", *SEED), ("generate", "--draft-tokens"): ("int", 1, 64),
    ("calibrate", "--samples"): ("int", *COUNT), ("calibrate", "--seq-len"): ("int", *TOKENS),
    ("calibrate", "--seed"): ("int", *SEED), ("calibrate", "--threshold"): ("float", *POSITIVE),
    ("calibrate", "--topk"): ("int", 0, MAX_COUNT), ("calibrate", "--topk-percent"): ("float", 0, 100, False, False),
    ("calibrate", "--ratio"): ("float", *POSITIVE), ("calibrate", "--budget-mb"): ("int", 1, 1 << 20),
    ("validate", "--windows"): ("int", *COUNT), ("validate", "--seq-len"): ("int", *TOKENS),
    ("validate", "--num-prompts"): ("int", *COUNT), ("validate", "--new-tokens"): ("int", *TOKENS),
    ("validate", "--probes-per-task"): ("int", 0, MAX_COUNT), ("validate", "--seed"): ("int", *SEED),
    ("validate", "--iterations"): ("int", *COUNT), ("validate", "--val-range"): ("float", -INF, INF, False, False),
    ("validate", "--atol"): ("float", *NON_NEGATIVE), ("validate", "--rtol"): ("float", *NON_NEGATIVE),
    ("validate", "--bisect-tol"): ("float", *POSITIVE), ("validate", "--max-kl"): ("float", *NON_NEGATIVE),
    ("validate", "--min-top1"): ("float", *FRACTION), ("validate", "--max-ppl-delta"): ("float", *NON_NEGATIVE),
    ("validate", "--min-greedy-prefix"): ("float", *NON_NEGATIVE),
    ("quantize", "--sparsity"): ("float", *SKIP), ("quantize", "--outliers"): ("int", 0, MAX_COUNT),
    ("sparsify", "--sparsity"): ("float", *SKIP), ("sparsify", "--predictor-rank"): ("int", 1, 65536),
    ("sparsify", "--predictor-samples"): ("int", *COUNT), ("sparsify", "--predictor-steps"): ("int", *COUNT),
    ("sparsify", "--seed"): ("int", *SEED),
    ("build", "--sparsity"): ("float", *SKIP), ("build", "--outliers"): ("int", 0, MAX_COUNT),
    ("build", "--calib-samples"): ("int", *COUNT), ("build", "--calib-seq-len"): ("int", *TOKENS),
    ("build", "--validation-windows"): ("int", *COUNT), ("build", "--validation-seq-len"): ("int", *TOKENS),
    ("build", "--max-batch"): ("int", 1, 4096), ("build", "--max-seq-len"): ("int", *TOKENS),
    ("build", "--max-kl"): ("float", *NON_NEGATIVE), ("build", "--min-top1"): ("float", *FRACTION),
    ("build", "--max-ppl-delta"): ("float", *NON_NEGATIVE),
}
WORDS = {"--outliers": ("auto",)}  # words an option takes besides numbers


def accepts(option: str, spec: tuple, text: str) -> bool:
    """The documented range: what Python's int() or float() reads, finite, inside the bounds."""
    if text in WORDS.get(option, ()):
        return True
    kind, low, high, *open_ends = spec
    try:
        value = int(text) if kind == "int" else float(text)
    except ValueError:
        return False
    low_open, high_open = open_ends or (False, False)
    return (math.isfinite(value) and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high))


SPECIAL_NUMBERS = ["", " ", "nan", "NaN", "-nan", "inf", "-inf", "+Infinity", "1e999", "-1e999", "0x10", "1e3",
                   "2.5", "-0", "-0.0", "0", "--", "1\n", "\n", "1\x00", "\u0663", "1_0", "auto", "None", "true",
                   "9" * 30, "-" + "9" * 30, "1e-400", "\t5", "5 6", "1,5"]


def bad_numbers(option: str, spec: tuple) -> st.SearchStrategy:
    kind, low, high, *_ = spec
    edges = [st.integers(max_value=int(low) - 1, min_value=-10**25)] if math.isfinite(low) else []
    edges += [st.integers(min_value=int(high) + 1, max_value=10**25)] if math.isfinite(high) else []
    return st.one_of(*[e.map(str) for e in edges], st.sampled_from(SPECIAL_NUMBERS),
                     st.floats().map(repr), st.text(TEXT, max_size=8)).filter(lambda t: not accepts(option, spec, t))


def good_numbers(spec: tuple) -> st.SearchStrategy:
    kind, low, high, *open_ends = spec
    if kind == "int":
        return st.sampled_from([low, high]) | st.integers(low, high)
    low_open, high_open = open_ends
    return st.floats(None if math.isinf(low) else low, None if math.isinf(high) else high, allow_nan=False,
                     allow_infinity=False, exclude_min=low_open and math.isfinite(low),
                     exclude_max=high_open and math.isfinite(high))


# ------------------------------------------------------------------------------------------------- the parser
def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name, the ones added later included."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))


def refuses(action: argparse.Action, text: str) -> bool:
    """Whether argparse refuses ``text`` as ``action``'s value (its type, then its choices)."""
    try:
        value = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return True
    return action.choices is not None and value not in action.choices


def valid_value(action: argparse.Action, folder: Path) -> str:
    """A value ``action`` takes: its first choice, a number its type reads, or a path in ``folder``."""
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type is None:
        return str(folder / action.dest)
    return next(text for text in ("1", "0.5", "0", "auto") if not refuses(action, text))


def required_argv(parser: argparse.ArgumentParser, folder: Path, leave_out: argparse.Action | None = None) -> list:
    """The arguments a subcommand's parser needs to parse (its positionals and required options), less one."""
    argv = []
    for action in parser._actions:
        if action is leave_out or not takes_value(action):
            continue
        if action.option_strings and action.required:
            argv += [action.option_strings[0], valid_value(action, folder)]
        elif not action.option_strings:
            argv += [valid_value(action, folder)] * (action.nargs if isinstance(action.nargs, int) else 1)
    return argv
