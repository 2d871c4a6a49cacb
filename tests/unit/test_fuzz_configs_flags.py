"""Fuzzed recipe files and command-line flags: every bad one exits 2 with one line naming the problem.

Each case also checks that nothing is left behind (no output folder, staging folder or temp file) and that a
canary file beside the output is untouched. Hypothesis runs derandomized, so every run tries the same examples;
values a strategy could make that the kit rightly takes are filtered out, and tests below show they are taken.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from accullm_export.cli.main import build_parser, main
from tests.helpers.fuzz import (FUZZ, IMPOSSIBLE, MAX_COUNT, MAX_SEED, NUMERIC, PRESET_ONLY, RECIPE_KEYS,
                                SECTIONS, TEXT, VALUES, Sandbox, assert_refused, bad_numbers, base_recipes, escaped,
                                good_numbers, refuses, required_argv, run_main, subcommands, takes_value,
                                toml_document, valid_value, with_value, wrong_type)

BASES = base_recipes()
COMMANDS = subcommands()


@pytest.fixture
def sandbox(tmp_path, planted_model, profile):
    """A canary beside the output path; the model and profile folders are watched too."""
    root = tmp_path / "sandbox"
    root.mkdir()
    (tmp_path / "config").mkdir()
    return Sandbox(root, planted_model[0], profile)


def write_config(tmp_path, data: dict | bytes) -> str:
    """``data`` written as the config file (a table as TOML, checked to read back as written, or raw bytes)."""
    path = tmp_path / "config" / "recipe.toml"
    path.parent.mkdir(exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        text = toml_document(data)
        assert canonical(tomllib.loads(text)) == canonical(data), text  # the writer wrote what the test means
        path.write_text(text, encoding="utf-8")
    return str(path)


def canonical(value):
    """``value`` compared by content: tables in key order, NaN equal to itself."""
    if isinstance(value, dict):
        return sorted((key, canonical(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return (type(value).__name__, repr(value))


def config_argv(command: str, backend: str, config: str, sandbox: Sandbox, planted_model, profile) -> list:
    model, text = (str(path) for path in planted_model)
    if command == "quantize":
        return ["quantize", model, "--config", config, "--profile", str(profile), "-o", str(sandbox.out)]
    target = "cpu" if backend == "onnxruntime" else "orin"
    return ["build", model, "--target", target, "--config", config, "-o", str(sandbox.out), "--calib", text]


base_index = st.integers(0, len(BASES) - 1)
command = st.sampled_from(["quantize", "build"])


# ------------------------------------------------------------------------------------------- recipe config files
@settings(FUZZ, max_examples=120)
@given(index=base_index, command=command, key=st.sampled_from(sorted(RECIPE_KEYS)), data=st.data())
def test_a_value_of_the_wrong_type_names_its_key(index, command, key, data, sandbox, planted_model, profile,
                                                   tmp_path, capsys):
    value = data.draw(wrong_type(RECIPE_KEYS[key]), label="value")
    base = BASES[index]
    config = write_config(tmp_path, with_value(base, key, value))
    argv = config_argv(command, base["backend"], config, sandbox, planted_model, profile)
    sandbox.refused(capsys, argv, f"recipe key {key}:")


@settings(FUZZ, max_examples=150)
@given(index=base_index, command=command, key=st.sampled_from(sorted(IMPOSSIBLE)), data=st.data())
def test_an_impossible_value_names_its_key(index, command, key, data, sandbox, planted_model, profile, tmp_path,
                                            capsys):
    """Negative, zero, out of range, non-finite, huge or unknown: each key refuses it on its own."""
    value = data.draw(IMPOSSIBLE[key], label="value")
    base = BASES[index]
    config = write_config(tmp_path, with_value(base, key, value))
    argv = config_argv(command, base["backend"], config, sandbox, planted_model, profile)
    sandbox.refused(capsys, argv, f"recipe key {key}:")


@settings(FUZZ, max_examples=50)
@given(index=base_index, command=command, section=st.sampled_from(["", *SECTIONS]),
       key=st.text(TEXT, max_size=10), value=st.integers(-3, 3) | st.text(TEXT, max_size=3))
def test_an_unknown_key_is_named(index, command, section, key, value, sandbox, planted_model, profile, tmp_path,
                                 capsys):
    known = {name.split(".")[-1] for name in RECIPE_KEYS if name.startswith(section + ".")} if section else (
        {name for name in RECIPE_KEYS if "." not in name} | set(SECTIONS) | set(PRESET_ONLY))
    assume(key not in known)
    base = BASES[index]
    config = write_config(tmp_path, with_value(base, f"{section}.{key}" if section else key, value))
    argv = config_argv(command, base["backend"], config, sandbox, planted_model, profile)
    line = sandbox.refused(capsys, argv, f"recipe key {section + '.' if section else ''}")
    assert "unknown key" in line
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        assert f"recipe key {section + '.' if section else ''}{key}: unknown key" in line


@settings(FUZZ, max_examples=40)
@given(index=base_index, command=command, section=st.sampled_from(SECTIONS), data=st.data())
def test_a_section_that_is_not_a_table_is_named(index, command, section, data, sandbox, planted_model, profile,
                                                tmp_path, capsys):
    value = data.draw(st.one_of(*(VALUES[kind] for kind in VALUES if kind != "table")), label="value")
    base = BASES[index]
    config = write_config(tmp_path, {**base, section: value})
    sandbox.refused(capsys, config_argv(command, base["backend"], config, sandbox, planted_model, profile),
                    f"recipe key {section}: must be a table")


@settings(FUZZ, max_examples=60)
@given(index=base_index, command=command, kind=st.sampled_from(["bad value", "not a table", "unknown backend"]),
       key=st.sampled_from(sorted(k for k in IMPOSSIBLE if "." in k)), data=st.data())
def test_backend_tables_are_checked(index, command, kind, key, data, sandbox, planted_model, profile, tmp_path,
                                    capsys):
    """A preset-shaped file: the backend's table replaces base keys, and a table for no known backend is refused."""
    base = BASES[index]
    backend = base["backend"]
    if kind == "bad value":
        table, needle = with_value(base, key, data.draw(IMPOSSIBLE[key], label="value"), table=backend), key
    elif kind == "not a table":
        value = data.draw(st.one_of(*(VALUES[kind] for kind in VALUES if kind != "table")), label="value")
        table, needle = {**base, backend: value}, backend
    else:
        name = data.draw(st.from_regex(r"[a-z][a-z0-9_-]{0,9}", fullmatch=True), label="backend")
        assume(name not in RECIPE_KEYS and name not in SECTIONS and name not in PRESET_ONLY)
        table, needle = with_value(base, key, 1, table=name), f"{name}: unknown key"
    config = write_config(tmp_path, table)
    sandbox.refused(capsys, config_argv(command, backend, config, sandbox, planted_model, profile),
                    f"recipe key {needle}")


@settings(FUZZ, max_examples=40)
@given(index=base_index, command=command, value=wrong_type("int") | IMPOSSIBLE["version"])
def test_a_wrong_version_is_refused(index, command, value, sandbox, planted_model, profile, tmp_path, capsys):
    base = BASES[index]
    config = write_config(tmp_path, {**base, "version": value})
    sandbox.refused(capsys, config_argv(command, base["backend"], config, sandbox, planted_model, profile),
                    "recipe key version:")


def _parses(data: bytes) -> bool:
    try:
        tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return True


INVALID_UTF8 = [b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]


@settings(FUZZ, max_examples=60)
@given(index=base_index, command=command, kind=st.sampled_from(["truncated", "non-UTF-8", "garbage"]),
       data=st.data())
def test_broken_toml_bytes_are_refused(index, command, kind, data, sandbox, planted_model, profile, tmp_path,
                                       capsys):
    base = BASES[index]
    text = toml_document(base).encode()
    if kind == "truncated":
        broken = text[:data.draw(st.integers(1, len(text) - 1), label="cut")]
    elif kind == "non-UTF-8":
        at = data.draw(st.integers(0, len(text)), label="at")
        broken = text[:at] + data.draw(st.sampled_from(INVALID_UTF8), label="bytes") + text[at:]
    else:
        broken = data.draw(st.binary(min_size=1, max_size=40), label="bytes")
    assume(not _parses(broken))
    config = write_config(tmp_path, broken)
    sandbox.refused(capsys, config_argv(command, base["backend"], config, sandbox, planted_model, profile),
                    "is not a valid TOML file")


def _special_config(kind: str, path) -> str:
    """Files a recipe reader must refuse without reading them to the end (or at all)."""
    valid = toml_document(BASES[0])
    contents = {
        "deep arrays": "version = " + "[" * 5000 + "]" * 5000,
        "deep tables": "a = " + "{b = " * 3000 + "1" + "}" * 3000,
        "long integer": "version = " + "9" * 5000, "huge file": "#" * (2 << 20), "byte order mark": "\ufeff" + valid,
        "NUL byte": valid + "\x00"}
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero link":
        path.symlink_to("/dev/zero")
    elif kind == "UTF-16":
        path.write_bytes(valid.encode("utf-16"))
    elif kind in contents:
        path.write_bytes(contents[kind].encode())
    return {"missing": str(path) + ".missing", "empty name": ""}.get(kind, str(path))


@pytest.mark.parametrize(("kind", "needle"), [
    ("deep arrays", "nest too deeply"), ("deep tables", "nest too deeply"), ("long integer", "too many digits"),
    ("huge file", "is not a recipe file: it is over 1 MiB"), ("byte order mark", "is not a valid TOML file"),
    ("NUL byte", "is not a valid TOML file"), ("UTF-16", "is not a valid TOML file"),
    ("folder", "not a regular file"), ("fifo", "not a regular file"), ("dev-zero link", "not a regular file"),
    ("missing", "no such file"), ("empty name", "--config '': give a file name")])
@pytest.mark.parametrize("command", ["quantize", "build"])
def test_special_config_files_are_refused(command, kind, needle, sandbox, planted_model, profile, tmp_path, capsys):
    config = _special_config(kind, tmp_path / "config" / "special.toml")
    sandbox.refused(capsys, config_argv(command, "onnxruntime", config, sandbox, planted_model, profile),
                    needle)


VALID_VALUES = {  # key -> values each base takes, the limits included
    "weights.block_size": st.sampled_from([16, 32, 64, 128, 256]), "name": st.text(TEXT, max_size=12),
    "gptq.samples": st.sampled_from([1, MAX_COUNT]) | st.integers(1, MAX_COUNT),
    "distill.samples": st.integers(1, MAX_COUNT), "vocab.samples": st.integers(1, MAX_COUNT),
    "sparsity.seed": st.sampled_from([0, MAX_SEED]) | st.integers(0, MAX_SEED),
    "sparsity.predictor_rank": st.sampled_from([1, 65536]), "sparsity.predictor_steps": st.integers(1, MAX_COUNT),
    "distill.lr": st.floats(1e-12, 10.0) | st.integers(1, 10),
    "sparsity.method": st.sampled_from(["threshold", "predictor"]),
}


@settings(FUZZ, max_examples=40)
@given(index=base_index, key=st.sampled_from(sorted(VALID_VALUES)), data=st.data())
def test_valid_values_at_the_limits_are_taken(index, key, data, tmp_path, capsys):
    """The other side of the filters above: in-range values of the same keys resolve and dump back unchanged."""
    value = data.draw(VALID_VALUES[key], label="value")
    config = write_config(tmp_path, with_value(BASES[index], key, value))
    assert main(["quantize", "--config", config, "--dump-config"]) == 0
    dumped = tomllib.loads(capsys.readouterr().out)
    section, _, name = key.rpartition(".")
    assert (dumped[section] if section else dumped)[name] == value


# ----------------------------------------------------------------------------------------------- command-line flags
def option_argv(command: str, option: str, value: str, folder) -> list:
    """Everything the parser needs, then ``option`` given ``value`` (both ends of --val-range get it)."""
    action = next(a for a in COMMANDS[command]._actions if option in a.option_strings)
    given_value = [option, value, value] if action.nargs == 2 else [f"{option}={value}"]
    return [command, *required_argv(COMMANDS[command], folder), *given_value]


@settings(FUZZ, max_examples=250)
@given(key=st.sampled_from(sorted(NUMERIC)), data=st.data())
def test_bad_numbers_are_refused_by_the_parser(key, data, tmp_path, capsys):
    """Negative, zero, out of range, non-finite, overflowing or not a number: argparse's one line names the flag."""
    command, option = key
    value = data.draw(bad_numbers(option, NUMERIC[key]), label="value")
    out = tmp_path / "out"
    code, err = run_main(capsys, option_argv(command, option, value, tmp_path))
    assert_refused(code, err, f"accullm-export {command}: error: argument {option}", argparse_error=True)
    assert not out.exists() and not list(tmp_path.iterdir())


@settings(FUZZ, max_examples=120)
@given(key=st.sampled_from(sorted(NUMERIC)), data=st.data())
def test_numbers_in_range_parse(key, data, tmp_path):
    """The other side of the filter: every value the documented range holds parses, to itself."""
    command, option = key
    value = data.draw(good_numbers(NUMERIC[key]), label="value")
    args = build_parser().parse_args(option_argv(command, option, repr(value), tmp_path))
    parsed = getattr(args, option.lstrip("-").replace("-", "_"))
    assert (list(parsed) == [value, value]) if isinstance(parsed, (list, tuple)) else parsed == value


def test_every_numeric_flag_is_fuzzed():
    """A new numeric option of these commands joins NUMERIC (with its documented range), or this fails."""
    typed = {(name, action.option_strings[0]) for name in {command for command, _ in NUMERIC}
             for action in COMMANDS[name]._actions
             if action.option_strings and action.type is not None and action.choices is None}
    assert typed == set(NUMERIC)


CHOICES = sorted((name, action.option_strings[0]) for name, parser in COMMANDS.items() for action in parser._actions
                 if action.option_strings and action.choices is not None)


@settings(FUZZ, max_examples=80)
@given(key=st.sampled_from(CHOICES), value=st.sampled_from(["", "\n", "AUTO", "fp8", "7", "-1", "none "])
       | st.text(TEXT, max_size=10))
def test_unknown_choices_are_refused_by_the_parser(key, value, tmp_path, capsys):
    command, option = key
    action = next(a for a in COMMANDS[command]._actions if option in a.option_strings)
    assume(refuses(action, value))
    code, err = run_main(capsys, [command, *required_argv(COMMANDS[command], tmp_path), f"{option}={value}"])
    assert_refused(code, err, f"accullm-export {command}: error: argument {option}", argparse_error=True)
    assert not list(tmp_path.iterdir())


def _option_prefixes(parser) -> set:
    return {option for action in parser._actions for option in action.option_strings}


@settings(FUZZ, max_examples=80)
@given(command=st.sampled_from(sorted(COMMANDS)), kind=st.sampled_from(["option", "positional"]),
       token=st.text(TEXT, min_size=1, max_size=10))
def test_unknown_options_and_extra_arguments_are_refused(command, kind, token, tmp_path, capsys):
    parser = COMMANDS[command]
    if kind == "option":
        token = "--" + token.lstrip("-")
        name = token.split("=")[0]
        assume(name != "--" and not any(option.startswith(name) for option in _option_prefixes(parser)))
    else:
        assume(not token.startswith("-"))
    code, err = run_main(capsys, [command, *required_argv(parser, tmp_path), token])
    line = assert_refused(code, err, f"accullm-export {command}: error: unrecognized arguments: ",
                          argparse_error=True)
    assert escaped(token) in line
    assert not list(tmp_path.iterdir())


STRING_ACTIONS = sorted((name, action.dest) for name, parser in COMMANDS.items() for action in parser._actions
                        if takes_value(action) and action.type is None and action.choices is None)


@settings(FUZZ, max_examples=60)
@given(key=st.sampled_from(STRING_ACTIONS), head=st.text(TEXT, max_size=5), tail=st.text(TEXT, max_size=5))
def test_a_nul_byte_in_any_argument_is_refused(key, head, tail, tmp_path, capsys):
    """No shell can pass one, but a Python caller can: open() would raise ValueError deep inside."""
    command, dest = key
    parser = COMMANDS[command]
    action = next(a for a in parser._actions if a.dest == dest)
    value = "x" + head + "\x00" + tail
    argv = required_argv(parser, tmp_path, leave_out=action)
    argv = [*argv, f"{action.option_strings[0]}={value}"] if action.option_strings else [value, *argv]
    code, err = run_main(capsys, [command, *argv])
    assert_refused(code, err, "holds a NUL byte", argparse_error=True)
    assert not list(tmp_path.iterdir())


def hostile_path_argv(slot: str, bad: str, sandbox: Sandbox, planted_model, profile) -> list:
    """Real commands on the tiny model with one path (``slot``) replaced by a missing, oddly named one."""
    model, text = (str(path) for path in planted_model)
    out, profile = str(sandbox.out), str(profile)
    return {
        "inspect MODEL": ["inspect", bad], "generate MODEL": ["generate", bad, "hi", "--max-new-tokens", "2"],
        "export MODEL": ["export", bad, "-o", out], "calibrate MODEL": ["calibrate", bad, "-o", out],
        "calibrate --calib": ["calibrate", model, "-o", out, "--calib", bad, "--samples", "2", "--seq-len", "16"],
        "quantize MODEL": ["quantize", bad, "--preset", "w4a16-fast", "--profile", profile, "-o", out],
        "quantize --profile": ["quantize", model, "--preset", "w4a16-fast", "--profile", bad, "-o", out],
        "quantize --config": ["quantize", model, "--config", bad, "--profile", profile, "-o", out],
        "sparsify MODEL": ["sparsify", bad, "--profile", profile, "--sparsity", "0.5", "-o", out],
        "sparsify --profile": ["sparsify", model, "--profile", bad, "--sparsity", "0.5", "-o", out],
        "build MODEL": ["build", bad, "--target", "cpu", "-o", out],
        "build --calib": ["build", model, "--target", "cpu", "-o", out, "--calib", bad],
        "build --config": ["build", model, "--target", "cpu", "-o", out, "--config", bad],
        "validate REFERENCE": ["validate", bad, model], "validate CANDIDATE": ["validate", model, bad],
        "validate --text": ["validate", model, model, "--text", bad, "--windows", "1", "--seq-len", "16"],
    }[slot]


PATH_SLOTS = ["inspect MODEL", "generate MODEL", "export MODEL", "calibrate MODEL", "calibrate --calib",
              "quantize MODEL", "quantize --profile", "quantize --config", "sparsify MODEL", "sparsify --profile",
              "build MODEL", "build --calib", "build --config", "validate REFERENCE", "validate CANDIDATE",
              "validate --text"]
CONTROL = st.sampled_from(["\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\x0b", "\r\n"])
NAME_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="'\"\\/\x00"), max_size=4)


@settings(FUZZ, max_examples=60)
@given(slot=st.sampled_from(PATH_SLOTS), head=NAME_TEXT, control=CONTROL, tail=NAME_TEXT)
def test_a_path_with_control_characters_stays_one_line(slot, head, control, tail, sandbox, planted_model, profile,
                                                        capsys):
    name = "bad" + head + control + tail + ".onnx"
    bad = str(sandbox.root / name)
    sandbox.refused(capsys, hostile_path_argv(slot, bad, sandbox, planted_model, profile), escaped(name))


VALID_PRECISION = re.compile(r"fp32|fp16|int8|int4|int4:(16|32|64|128|256)")


@settings(FUZZ, max_examples=60)
@given(kind=st.sampled_from(["no =", "empty pattern", "bad precision", "pattern matching nothing", "blank pattern"]),
       text=st.text(TEXT, max_size=10), pattern=st.sampled_from(["lm_head", "layers.0", "*down_proj*"]),
       blank=st.sampled_from(["!", "/", "//", "!/", "!//"]), control=CONTROL,
       precision=st.sampled_from(["int8", "fp16", "int4", "int4:32", "fp32"]),
       command=st.sampled_from(["quantize", "build"]))
def test_override_garbage_is_refused(kind, text, pattern, blank, control, precision, command, sandbox, planted_model,
                                     profile, capsys):
    """Refused when the recipe resolves; a pattern matching no layer is refused once the model is read (quantize:
    build would calibrate first)."""
    if kind == "pattern matching nothing":
        command = "quantize"
    if kind == "no =":
        value, needle = text.replace("=", ""), "--override"
    elif kind == "empty pattern":
        value, needle = "=" + text.replace("=", ""), "--override"
    elif kind == "bad precision":
        assume(not VALID_PRECISION.fullmatch(text.replace("=", "")))
        value, needle = f"{pattern}={text.replace('=', '')}", "recipe key weights.overrides:"
    elif kind == "blank pattern":
        value, needle = f"{blank}={precision}", "recipe key weights.overrides:"
    else:
        value, needle = f"{text.replace('=', '')}{control}={precision}", "matches no linear layer"
    assume("\x00" not in value)
    model, calib = (str(path) for path in planted_model)
    prefix = (["quantize", model, "--preset", "w4a16-fast", "--profile", str(profile)] if command == "quantize"
              else ["build", model, "--target", "cpu", "--preset", "w4a16-fast", "--calib", calib])
    sandbox.refused(capsys, [*prefix, "-o", str(sandbox.out), f"--override={value}"], needle)


@settings(FUZZ, max_examples=50)
@given(kind=st.sampled_from(["quantize --preset", "build --preset", "build --target"]),
       name=st.sampled_from(["", " ", "W4A16", "w4a16 ", "../w4a16", "w4a16.toml", "default", "\n"])
       | st.text(TEXT, max_size=12))
def test_unknown_preset_and_target_names_are_refused(kind, name, sandbox, planted_model, profile, capsys):
    from accullm_export.recipes.presets import preset_names
    from accullm_export.targets import TARGETS

    command, option = kind.split()
    assume("\x00" not in name and name not in (TARGETS if option == "--target" else preset_names()))
    model, calib = (str(path) for path in planted_model)
    argv = (["quantize", model, "--profile", str(profile)] if command == "quantize"
            else ["build", model, "--calib", calib] + (["--target", "cpu"] if option == "--preset" else []))
    needle = f"unknown {'target' if option == '--target' else 'preset'} {escaped(repr(name))}"
    sandbox.refused(capsys, [*argv, "-o", str(sandbox.out), f"{option}={name}"], needle)


# ------------------------------------------------------------------- argparse errors: one usage line, one message line
def _parser_cases() -> list:
    cases = [("", "no command", None), ("", "unknown command", None), ("", "unknown option", None)]
    for name, parser in sorted(COMMANDS.items()):
        cases.append((name, "unknown option", None))
        for action in parser._actions:
            if not takes_value(action):
                continue
            if action.required or (not action.option_strings and action.nargs is None):
                cases.append((name, "missing", action.dest))
            if action.choices is not None:
                cases.append((name, "bad choice", action.dest))
            if action.type is not None:
                cases.append((name, "bad type", action.dest))
    return cases


@pytest.mark.parametrize(("command", "kind", "dest"), _parser_cases())
def test_argparse_errors_are_one_usage_line_and_one_message_line(command, kind, dest, tmp_path, capsys):
    if not command:
        argv = {"no command": [], "unknown command": ["bogus\ncommand"], "unknown option": ["--bogus", "presets"]}[kind]
        code, err = run_main(capsys, argv)
        assert code == 2
        usage, message = err.strip("\n").split("\n")
        assert usage.startswith("usage: accullm-export ") and message.startswith("accullm-export")
        assert {"no command": "required: COMMAND", "unknown command": "invalid choice: 'bogus\\ncommand'",
                "unknown option": "unrecognized arguments: --bogus"}[kind] in message
        return
    parser = COMMANDS[command]
    action = next((a for a in parser._actions if a.dest == dest), None)
    argv = required_argv(parser, tmp_path, leave_out=action if kind == "missing" else None)
    if kind == "unknown option":
        argv.append("--no-such-option\nor-line")
    elif kind in ("bad choice", "bad type"):
        candidates = ["bogus", "abc", "", "-1e999"] if kind == "bad choice" else ["abc", "", "-1e999", "nan"]
        bad = next(text for text in candidates if refuses(action, text))
        if action.option_strings:
            argv.append(f"{action.option_strings[0]}={bad}")
        else:
            argv = [bad if text == valid_value(action, tmp_path) else text for text in argv]
    code, err = run_main(capsys, [command, *argv])
    assert code == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 2, err
    assert lines[0].startswith(f"usage: accullm-export {command} "), err
    assert lines[1].startswith(f"accullm-export {command}: error: "), err
    named = {"missing": "the following arguments are required: ", "unknown option": "unrecognized arguments: "}
    assert named.get(kind, "argument ") in lines[1]
    if action is not None and action.option_strings:
        assert action.option_strings[0] in lines[1] or "/".join(action.option_strings) in lines[1]
    assert not list(tmp_path.iterdir())
