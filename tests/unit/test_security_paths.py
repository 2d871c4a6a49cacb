"""Paths stay inside their folders, and numeric options are checked before any work.

Every case asserts the contract: exit code 2, one stderr line, no traceback, no output folder (or staging folder)
left, and a canary file outside the model's folder untouched and never copied into an output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from accullm_export.cli.main import main
from accullm_export.errors import UserError
from accullm_export.safe_paths import hf_cache_roots, inside
from tests.helpers.cli import assert_user_error, run_cli

CANARY = b"canary: a file outside the model's folder; it must never be read into an output\n"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "outside" / "canary.bin"
    path.parent.mkdir()
    path.write_bytes(CANARY)
    yield path
    assert path.read_bytes() == CANARY
    copies = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != path
              and p.stat().st_size == len(CANARY) and p.read_bytes() == CANARY]
    assert not copies, f"the canary was copied to {copies}"


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, instead of hanging the suite, when a command blocks (a FIFO opened, /dev/zero read to its end)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs on its input")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def model_copy(planted_model, tmp_path) -> Path:
    """A plain copy of the planted model's exported folder (its profile fixture matches it)."""
    folder, _ = planted_model
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy


def set_location(folder: Path, location: str) -> str:
    """Point the first externally stored initializer of ``folder``'s model at ``location``; returns its name."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, str(folder / "model.onnx"))
    return tensor.name


def hostile_location(kind: str, folder: Path, canary: Path) -> str:
    """The external-data location of each attack, with what it needs made beside the model."""
    if kind == "symlink":
        (folder / "weights.data").symlink_to(canary)
        return "weights.data"
    if kind == "fifo":
        os.mkfifo(folder / "weights.data")
        return "weights.data"
    return {"absolute": str(canary), "dotdot": f"../{canary.parent.name}/{canary.name}",
            "dev-zero": "/dev/zero", "dotdot-inside": "sub/../../outside/canary.bin"}[kind]


LOCATIONS = ("absolute", "dotdot", "dotdot-inside", "symlink", "dev-zero", "fifo")
COMMANDS = {
    "inspect": lambda m, p, o, t: ["inspect", m],
    "calibrate": lambda m, p, o, t: ["calibrate", m, "-o", o, "--calib", t, "--samples", "2", "--seq-len", "16"],
    "quantize": lambda m, p, o, t: ["quantize", m, "--preset", "w4a16-fast", "--block-size", "16", "--profile", p,
                                    "-o", o],
    "sparsify": lambda m, p, o, t: ["sparsify", m, "--profile", p, "--sparsity", "0.5", "-o", o],
    "build": lambda m, p, o, t: ["build", m, "--target", "cpu", "-o", o, "--calib", t],
    "generate": lambda m, p, o, t: ["generate", m, "hello", "--max-new-tokens", "2"],
    "validate": lambda m, p, o, t: ["validate", m, m, "--windows", "1", "--seq-len", "16"],
}


@pytest.mark.parametrize("kind", LOCATIONS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_external_data_outside_the_folder_is_refused(command, kind, planted_model, profile, canary, tmp_path,
                                                      capsys):
    folder = model_copy(planted_model, tmp_path)
    location = hostile_location(kind, folder, canary)
    tensor = set_location(folder, location)
    out = tmp_path / "out"
    argv = COMMANDS[command](str(folder), str(profile), str(out), str(planted_model[1]))
    with deadline(60):
        code, _, err = run_cli(capsys, *argv)
    if command in ("generate", "validate"):  # they hand the file to ONNX Runtime, whose own check refuses it first
        assert_user_error(code, err, "ONNX Runtime cannot load")
    else:
        assert_user_error(code, err, repr(location))
        assert "model.onnx" in err and repr(tensor) in err  # names the file and the entry
    assert_nothing_left(out)


def test_sparsify_fails_fast_on_dev_zero_in_a_fresh_process(planted_model, profile, canary, tmp_path):
    """The reported hang: sparsify hashed the external data before checking it, and /dev/zero never ends."""
    folder = model_copy(planted_model, tmp_path)
    set_location(folder, "/dev/zero")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "accullm_export.cli.main", "sparsify", str(folder), "--profile",
                           str(profile), "--sparsity", "0.5", "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert_user_error(done.returncode, done.stderr, "'/dev/zero' is an absolute path")
    assert_nothing_left(out)


def test_model_fingerprint_checks_locations_before_hashing(planted_model, tmp_path):
    from accullm_export.calibration.profile import model_fingerprint

    folder = model_copy(planted_model, tmp_path)
    before = model_fingerprint(folder)
    set_location(folder, "/dev/zero")
    with deadline(30), pytest.raises(UserError, match="absolute path"):
        model_fingerprint(folder)
    assert before == model_fingerprint(planted_model[0])  # a copy hashes as its original


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
@pytest.mark.parametrize("command", ["quantize", "sparsify", "build"])
def test_a_side_file_leaving_the_folder_is_refused(command, kind, planted_model, profile, canary, tmp_path, capsys):
    """special_tokens_map.json linked to a file outside (or a FIFO, or a folder) never reaches an output."""
    folder = model_copy(planted_model, tmp_path)
    side = folder / "special_tokens_map.json"
    side.unlink(missing_ok=True)
    if kind == "symlink":
        side.symlink_to(canary)
    elif kind == "fifo":
        os.mkfifo(side)
    else:
        side.mkdir()
    out = tmp_path / "out"
    argv = {"quantize": ["quantize", str(folder), "--preset", "w4a16-fast", "--block-size", "16", "--profile",
                         str(profile), "-o", str(out)],
            "sparsify": ["sparsify", str(folder), "--profile", str(profile), "--sparsity", "0.5", "-o", str(out)],
            "build": ["build", str(folder), "--target", "orin", "-o", str(out), "--calib", str(planted_model[1])]}
    with deadline(60):
        code, _, err = run_cli(capsys, *argv[command])
    assert_user_error(code, err, "side file 'special_tokens_map.json'")
    assert_nothing_left(out)


def test_only_known_side_files_are_copied(planted_model, profile, canary, tmp_path, capsys):
    folder = model_copy(planted_model, tmp_path)
    (folder / "notes.txt").write_text("private notes")
    (folder / "id_rsa").write_text("not a side file")
    (folder / "vocab.json").write_text("{}")  # on the allow-list, so it travels
    (folder / "merges.txt").symlink_to(folder / "vocab.json")  # a symlink inside the folder is fine
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", str(folder), "--preset", "w4a16-fast", "--block-size", "16",
                           "--profile", str(profile), "-o", str(out))
    assert code == 0, err
    names = {path.name for path in out.iterdir()}
    assert {"tokenizer.json", "genai_config.json", "config.json", "vocab.json", "merges.txt"} <= names
    assert not {"notes.txt", "id_rsa"} & names
    assert not (out / "merges.txt").is_symlink() and (out / "merges.txt").read_text() == "{}"


def test_export_refuses_a_tokenizer_file_linked_outside(tiny_exports, canary, tmp_path, capsys):
    hf, _ = tiny_exports["llama"]
    folder = tmp_path / "hf"
    shutil.copytree(hf, folder)
    (folder / "tokenizer_config.json").symlink_to(canary)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", str(folder), "-o", str(out))
    assert_user_error(code, err, "tokenizer file 'tokenizer_config.json' is a symlink to")
    assert_nothing_left(out)


def test_export_reads_a_hugging_face_cache_snapshot(tiny_exports, tmp_path, capsys):
    """The hub cache keeps every file in ``blobs`` and links it from ``snapshots/<rev>``: that is not leaving."""
    hf, _ = tiny_exports["llama"]
    repo = tmp_path / "models--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for index, path in enumerate(sorted(p for p in hf.iterdir() if p.is_file())):
        shutil.copy2(path, repo / "blobs" / f"blob{index}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"blob{index}")
    assert hf_cache_roots(snapshot) == (repo.resolve() / "blobs",)
    code, _, err = run_cli(capsys, "export", str(snapshot), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(("name", "message"), [
    ("/etc/passwd", "is an absolute path"),
    ("../canary.bin", "climbs out with '..'"),
    ("a/../../canary.bin", "climbs out with '..'"),
    ("a\\..\\..\\canary.bin", "climbs out with '..'"),
    ("", "is not a file name"),
    ("bad\x00name", "is not a file name"),
    ("missing.bin", "is missing"),
    ("link-out", "is a symlink to"),
    ("dir-out/canary.bin", "is a symlink to"),
    ("zero", "is a symlink to /dev/zero"),
    ("pipe", "is a FIFO"),
    ("sub", "is a folder"),
])
def test_inside_refuses(name, message, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "canary.bin").write_bytes(CANARY)
    (folder / "link-out").symlink_to(tmp_path / "canary.bin")
    (folder / "dir-out").symlink_to(tmp_path)
    (folder / "zero").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe")
    with pytest.raises(UserError) as raised:
        inside(folder, name, named_by=folder / "model.onnx", what="external data")
    text = str(raised.value)
    assert message in text and "\n" not in text
    assert text.startswith(f"{folder / 'model.onnx'}: external data {name!r}")


def test_inside_accepts_files_and_links_within(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x")
    (tmp_path / "b.bin").symlink_to(tmp_path / "sub" / "a.bin")
    assert inside(tmp_path, "sub/a.bin") == (tmp_path / "sub" / "a.bin").resolve()
    assert inside(tmp_path, "b.bin") == (tmp_path / "sub" / "a.bin").resolve()
    assert inside(tmp_path, "./sub/a.bin") == (tmp_path / "sub" / "a.bin").resolve()


def test_a_profile_file_linked_outside_is_refused(profile, canary, tmp_path, capsys):
    from accullm_export.calibration.profile import load_profile

    copy = tmp_path / "profile"
    shutil.copytree(profile, copy)
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").symlink_to(canary)
    with pytest.raises(UserError, match="profile file 'manifest.json' is a symlink to"):
        load_profile(copy)


# --- numeric options: argparse refuses each bad value with its one-line error, exit 2, before any work

BAD_COUNTS = ["-1", "0", "abc", "1e9", "nan", "inf", "2.5", ""]
BAD_NON_NEGATIVE = ["-1", "nan", "inf", "-inf", "abc", "1e999"]
BAD_FRACTION = ["-0.1", "1.5", "nan", "inf", "abc"]
BAD_SKIP_FRACTION = ["1", "1.0", "1.5", "-0.1", "nan", "inf", "abc"]
OPTIONS = [
    ("build", "--max-batch", BAD_COUNTS + ["4097", "-8"]),
    ("build", "--max-seq-len", BAD_COUNTS + ["1048577", "-2048"]),
    ("build", "--calib-samples", BAD_COUNTS + ["1000001"]),
    ("build", "--calib-seq-len", BAD_COUNTS + ["1048577"]),
    ("build", "--validation-windows", BAD_COUNTS),
    ("build", "--validation-seq-len", BAD_COUNTS + ["1048577"]),
    ("build", "--max-kl", BAD_NON_NEGATIVE),
    ("build", "--min-top1", BAD_FRACTION),
    ("build", "--max-ppl-delta", BAD_NON_NEGATIVE),
    ("build", "--sparsity", BAD_SKIP_FRACTION),
    ("quantize", "--sparsity", BAD_SKIP_FRACTION),
    ("sparsify", "--sparsity", BAD_SKIP_FRACTION),
    ("sparsify", "--predictor-rank", ["0", "-1", "abc"]),
    ("sparsify", "--predictor-samples", ["0", "-1", "1e9"]),
    ("sparsify", "--predictor-steps", ["0", "nan"]),
    ("sparsify", "--seed", ["-1", "abc", "4294967296"]),
    ("generate", "--max-new-tokens", BAD_COUNTS + ["1048577"]),
    ("generate", "--temperature", ["0", "-1", "nan", "inf", "abc"]),
    ("generate", "--top-k", ["-1", "abc", "2.5", "1e9"]),
    ("generate", "--top-p", ["0", "-0.5", "1.5", "nan", "inf"]),
    ("generate", "--seed", ["-1", "abc", "4294967296"]),
    ("calibrate", "--samples", BAD_COUNTS),
    ("calibrate", "--seq-len", BAD_COUNTS + ["1048577"]),
    ("calibrate", "--seed", ["-1", "nan"]),
    ("calibrate", "--threshold", ["0", "-1", "nan", "inf"]),
    ("calibrate", "--topk", ["-1", "abc", "nan"]),
    ("calibrate", "--topk-percent", ["-1", "101", "nan"]),
    ("calibrate", "--ratio", ["0", "-2", "nan", "inf"]),
    ("calibrate", "--block-size", ["0", "-1", "100"]),
    ("calibrate", "--budget-mb", ["0", "-1", "abc", "1048577"]),
    ("validate", "--windows", BAD_COUNTS),
    ("validate", "--seq-len", BAD_COUNTS + ["1048577"]),
    ("validate", "--num-prompts", BAD_COUNTS),
    ("validate", "--new-tokens", BAD_COUNTS),
    ("validate", "--probes-per-task", ["-1", "abc", "nan"]),
    ("validate", "--iterations", ["0", "-1", "abc"]),
    ("validate", "--seed", ["-1"]),
    ("validate", "--atol", BAD_NON_NEGATIVE),
    ("validate", "--rtol", BAD_NON_NEGATIVE),
    ("validate", "--bisect-tol", ["0"] + BAD_NON_NEGATIVE),
    ("validate", "--max-kl", BAD_NON_NEGATIVE),
    ("validate", "--min-top1", BAD_FRACTION),
    ("validate", "--max-ppl-delta", BAD_NON_NEGATIVE),
    ("validate", "--min-greedy-prefix", BAD_NON_NEGATIVE),
]
PREFIX = {
    "build": lambda m, o: ["build", m, "--target", "cpu", "-o", o],
    "quantize": lambda m, o: ["quantize", m, "--preset", "w4a16-fast", "--profile", m, "-o", o],
    "sparsify": lambda m, o: ["sparsify", m, "--profile", m, "--sparsity", "0.5", "-o", o],
    "generate": lambda m, o: ["generate", m, "hello"],
    "calibrate": lambda m, o: ["calibrate", m, "-o", o],
    "validate": lambda m, o: ["validate", m, m, "--report", o],
}


@pytest.mark.parametrize(("command", "option", "value"),
                         [(c, o, v) for c, o, values in OPTIONS for v in values])
def test_bad_numeric_options_are_refused_before_any_work(command, option, value, canary, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main([*PREFIX[command](str(canary.parent), str(out)), f"{option}={value}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert errors[0].startswith(f"accullm-export {command}: error: argument {option}"), err
    assert "Traceback" not in err
    assert_nothing_left(out)


def test_good_numeric_options_parse(tmp_path):
    from accullm_export.cli.main import build_parser

    args = build_parser().parse_args(["build", "m", "--target", "orin", "-o", "o", "--max-batch", "4",
                                      "--max-seq-len", "1048576", "--max-kl", "0", "--min-top1", "1",
                                      "--max-ppl-delta", "2.5", "--calib-samples", "8"])
    assert (args.max_batch, args.max_seq_len, args.max_kl, args.min_top1) == (4, 1 << 20, 0.0, 1.0)
    args = build_parser().parse_args(["generate", "m", "p", "--top-p", "1", "--top-k", "0", "--temperature",
                                      "0.7", "--seed", "0"])
    assert (args.top_p, args.top_k, args.temperature, args.seed) == (1.0, 0, 0.7, 0)
    args = build_parser().parse_args(["validate", "a", "b", "--val-range", "-1", "1", "--atol", "0"])
    assert args.val_range == [-1.0, 1.0] and args.atol == 0.0


def test_validate_refuses_an_empty_value_range(canary, capsys):
    code, _, err = run_cli(capsys, "validate", str(canary), str(canary), "--val-range", "1", "-1")
    assert_user_error(code, err, "--val-range LO HI: LO (1) is over HI (-1)")


@pytest.mark.parametrize("field", ["max_batch", "max_seq_len", "calib_seq_len", "validation_windows",
                                   "validation_seq_len", "calib_samples"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_build_options_refuse_impossible_shapes_from_python(field, value):
    from accullm_export.build.pipeline import BuildOptions

    with pytest.raises(UserError, match=f"build option {field} must be a positive integer"):
        BuildOptions(target="orin", **{field: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "5"])
def test_build_options_refuse_bad_gates_from_python(value):
    from accullm_export.build.pipeline import BuildOptions

    with pytest.raises(UserError, match="gate max-kl must be a finite number"):
        BuildOptions(target="orin", gates={"max-kl": value})
