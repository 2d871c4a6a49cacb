"""--overwrite replaces only a previous output of the same kind; interruptions and killed runs leave nothing behind.

Each case asserts the exit code, the single stderr line (no traceback), that no staging folder (``.partial``) or
backup (``.old``) is left, and that a canary file outside the output is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accullm_export import atomic
from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.graphs import make_mlp
from tests.helpers.models import TEXT

CANARY = "canary: must survive"


def canary(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "canary.txt"
    path.write_text(CANARY)
    return path


def assert_no_leftovers(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.endswith((".partial", ".old")) or p.name == atomic.OWNER_FILE]
    assert not leftovers, leftovers


def copy_export(tiny_exports, destination: Path) -> Path:
    _, folder = tiny_exports["llama"]
    shutil.copytree(folder, destination)
    return destination


# -------------------------------------------------------------------------------------- what --overwrite may replace
def test_overwrite_of_the_current_folder_is_refused(capsys, tiny_exports, tmp_path, monkeypatch):
    hf, _ = tiny_exports["llama"]
    work = tmp_path / "work"
    kept = canary(work)
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "export", str(hf), "-o", ".", "--overwrite")
    assert_user_error(code, err, "is the current folder or holds it")
    assert kept.read_text() == CANARY and sorted(p.name for p in work.iterdir()) == ["canary.txt"]
    assert_no_leftovers(tmp_path)


def test_overwrite_of_an_ancestor_of_the_current_folder_is_refused(capsys, tiny_exports, tmp_path, monkeypatch):
    hf, _ = tiny_exports["llama"]
    kept = canary(tmp_path / "top")
    (tmp_path / "top" / "manifest.json").write_text(json.dumps({"kind": "accullm-export/export"}))
    (tmp_path / "top" / "deep").mkdir()
    monkeypatch.chdir(tmp_path / "top" / "deep")
    code, _, err = run_cli(capsys, "export", str(hf), "-o", "..", "--overwrite")
    assert_user_error(code, err, "is the current folder or holds it")
    assert kept.read_text() == CANARY
    assert_no_leftovers(tmp_path)


def test_output_equal_to_the_input_folder_is_refused(capsys, tiny_exports, tmp_path):
    """The input is an export (its manifest has the right kind), and still it is never replaced."""
    model = copy_export(tiny_exports, tmp_path / "model")
    kept = canary(tmp_path)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    code, _, err = run_cli(capsys, "export", str(model), "-o", str(model), "--overwrite")
    assert_user_error(code, err, "is the input")
    code, _, err = run_cli(capsys, "calibrate", str(model), "-o", str(model), "--overwrite")
    assert_user_error(code, err, "is the input")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert kept.read_text() == CANARY
    assert_no_leftovers(tmp_path)


def test_output_holding_the_input_or_inside_it_is_refused(capsys, tiny_exports, tmp_path):
    hf, _ = tiny_exports["llama"]
    models = tmp_path / "models"
    shutil.copytree(hf, models / "hf")
    kept = canary(models)
    (models / "manifest.json").write_text(json.dumps({"kind": "accullm-export/export"}))  # the right kind, even
    code, _, err = run_cli(capsys, "export", str(models / "hf"), "-o", str(models), "--overwrite")
    assert_user_error(code, err, "or holds it")
    code, _, err = run_cli(capsys, "export", str(models / "hf"), "-o", str(models / "hf" / "onnx"))
    assert_user_error(code, err, "inside the input folder")
    assert kept.read_text() == CANARY and (models / "hf" / "config.json").is_file()
    assert not (models / "hf" / "onnx").exists()
    assert_no_leftovers(tmp_path)


def test_overwrite_of_unrelated_files_or_another_kind_is_refused(capsys, tiny_exports, tmp_path):
    hf, _ = tiny_exports["llama"]
    kept = canary(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "export", str(hf), "-o", str(mine), "--overwrite")
    assert_user_error(code, err, "holds no previous export output; refusing to replace it")
    other = copy_export(tiny_exports, tmp_path / "exported")  # a previous *export*, not a profile
    code, _, err = run_cli(capsys, "calibrate", str(hf), "-o", str(other), "--overwrite")
    assert_user_error(code, err, "holds no previous profile output; refusing to replace it")
    assert (mine / "thesis.tex").read_text() == "years of work" and (other / "model.onnx").is_file()
    assert kept.read_text() == CANARY
    assert_no_leftovers(tmp_path)


def test_overwrite_replaces_a_previous_output_of_the_same_kind(capsys, tiny_exports, tmp_path):
    hf, _ = tiny_exports["llama"]
    kept = canary(tmp_path)
    out = tmp_path / "out"
    assert run_cli(capsys, "export", str(hf), "-o", str(out))[0] == 0
    (out / "stale.txt").write_text("from the previous run")
    code, _, err = run_cli(capsys, "export", str(hf), "-o", str(out))
    assert_user_error(code, err, "pass --overwrite to replace it")
    code, _, _ = run_cli(capsys, "export", str(hf), "-o", str(out), "--overwrite")
    assert code == 0
    assert json.loads((out / "manifest.json").read_text())["kind"] == "accullm-export/export"
    assert not (out / "stale.txt").exists()  # replaced as a whole
    assert kept.read_text() == CANARY
    assert_no_leftovers(tmp_path)


# --------------------------------------------------------------------------------------- what appears during the run
def _appearing(monkeypatch, out: Path, write):
    """Make ``write(out)`` happen in the middle of the export (after the start check, before the publish)."""
    from accullm_export.models import export

    real = export.genai_config

    def genai_config_and_interference(config):
        write(out)
        return real(config)

    monkeypatch.setattr(export, "genai_config", genai_config_and_interference)


def test_a_folder_appearing_at_the_output_during_the_run_is_kept(capsys, tiny_exports, tmp_path, monkeypatch):
    hf, _ = tiny_exports["llama"]
    kept = canary(tmp_path)
    out = tmp_path / "out"

    def someone_else(folder: Path):
        folder.mkdir()
        (folder / "theirs.txt").write_text("not yours")

    _appearing(monkeypatch, out, someone_else)
    code, _, err = run_cli(capsys, "export", str(hf), "-o", str(out))
    assert_user_error(code, err, "appeared while this run was working")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert kept.read_text() == CANARY
    assert_no_leftovers(tmp_path)


def test_a_previous_output_changed_during_the_run_is_kept(capsys, tiny_exports, tmp_path, monkeypatch):
    hf, _ = tiny_exports["llama"]
    kept = canary(tmp_path)
    out = copy_export(tiny_exports, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    _appearing(monkeypatch, out, lambda folder: (folder / "added.txt").write_text("added meanwhile"))
    code, _, err = run_cli(capsys, "export", str(hf), "-o", str(out), "--overwrite")
    assert_user_error(code, err, "changed while this run was working")
    assert sorted(p.name for p in out.iterdir()) == sorted(before + ["added.txt"])
    assert kept.read_text() == CANARY
    assert_no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------- validate --report
def test_validate_report_replaces_only_a_previous_report(capsys, tmp_path, monkeypatch):
    import tempfile

    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    (tmp_path / "m").mkdir()
    model = make_mlp(tmp_path / "m" / "model.onnx")
    kept = canary(tmp_path)
    assert run_cli(capsys, "validate", str(model), str(model), "--bisect")[0] == 0  # no report: nothing written
    assert not any(system_temp.iterdir()) and sorted(p.name for p in model.parent.iterdir()) == ["model.onnx"]
    report = tmp_path / "report"
    assert run_cli(capsys, "validate", str(model), str(model), "--report", str(report))[0] == 0
    assert run_cli(capsys, "validate", str(model), str(model), "--report", str(report))[0] == 0  # replaced
    assert json.loads((report / "report.json").read_text())["generic"]["inputs_json"] == str(report / "inputs.json")
    code, _, err = run_cli(capsys, "validate", str(model), str(model), "--report", str(model.parent))
    assert_user_error(code, err, "or holds it")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    code, _, err = run_cli(capsys, "validate", str(model), str(model), "--report", str(notes))
    assert_user_error(code, err, "holds no previous validate output")
    assert (notes / "todo.txt").read_text() == "mine"
    assert kept.read_text() == CANARY and not any(system_temp.iterdir())
    assert_no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ SIGTERM and SIGINT
def _default_signals() -> None:
    """The child starts with SIGINT and SIGTERM at their defaults, whatever the test runner ignores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize(("signum", "exit_code", "line"), [(signal.SIGTERM, 143, "terminated"),
                                                            (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_calibrate_leaves_nothing(planted_model, tmp_path, signum, exit_code, line):
    folder, _ = planted_model
    text = tmp_path / "long.txt"
    text.write_text(TEXT * 500)  # byte tokens: thousands of windows, so the run is still working when signalled
    kept = canary(tmp_path)
    inputs_before = sorted(p.name for p in folder.iterdir())
    child = subprocess.Popen(
        [sys.executable, "-m", "accullm_export.cli.main", "-q", "calibrate", str(folder), "-o", "profile",
         "--calib", str(text), "--samples", "6000", "--seq-len", "64"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".profile.*.partial")) and child.poll() is None:
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()
        time.sleep(0.3)  # well inside the statistics passes
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == exit_code, err
    lines = [entry for entry in err.splitlines() if entry.strip() and not entry.startswith(("I ", "W "))]
    assert lines == [line], err
    assert "Traceback" not in err
    assert not (tmp_path / "profile").exists()
    assert sorted(p.name for p in folder.iterdir()) == inputs_before
    assert kept.read_text() == CANARY
    assert_no_leftovers(tmp_path)


# -------------------------------------------------------------------------------- leftovers of killed runs (SIGKILL)
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _staging(parent: Path, name: str, owner: dict | None, age_s: float = 0.0) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model.onnx.data").write_bytes(b"\0" * 1024)
    if owner is not None:
        (folder / atomic.OWNER_FILE).write_text(json.dumps(owner))
    if age_s:
        stamp = time.time() - age_s
        os.utime(folder, (stamp, stamp))
    return folder


def test_a_later_run_removes_only_stale_staging_of_its_own_output(capsys, tiny_exports, tmp_path):
    import socket

    hf, _ = tiny_exports["llama"]
    kept = canary(tmp_path)
    host = socket.gethostname()
    dead = _staging(tmp_path, ".out.dead0001.partial", {"pid": _dead_pid(), "host": host})
    old = _staging(tmp_path, ".out.old00001.partial", None, age_s=2 * atomic.STALE_AFTER_S)
    backup = _staging(tmp_path, f".out.{_dead_pid()}-0a1b2c3d.old", None)
    live = _staging(tmp_path, ".out.live0001.partial",
                    {"pid": os.getpid(), "host": host, "started": atomic._process_start(os.getpid())})
    legacy = _staging(tmp_path, ".out.old", None, age_s=2 * atomic.STALE_AFTER_S)  # the backup name of old versions
    fresh = _staging(tmp_path, ".out.fresh001.partial", None)  # no owner recorded, minutes old: maybe running
    foreign = _staging(tmp_path, ".out.dead0002.partial", {"pid": _dead_pid(), "host": host + "-elsewhere"})
    other_output = _staging(tmp_path, ".other.dead0003.partial", {"pid": _dead_pid(), "host": host})
    unrelated = [_staging(tmp_path, name, {"pid": _dead_pid(), "host": host}, age_s=2 * atomic.STALE_AFTER_S)
                 for name in (".other", ".out.partial", ".out.x.dead0004.partial", ".out.TOOLONG123.partial")]
    code, _, _ = run_cli(capsys, "export", str(hf), "-o", str(tmp_path / "out"))
    assert code == 0
    assert not dead.exists() and not old.exists() and not backup.exists() and not legacy.exists()
    assert live.exists() and fresh.exists() and foreign.exists() and other_output.exists()
    assert all(folder.exists() for folder in unrelated)
    assert (tmp_path / "out" / "manifest.json").is_file() and not (tmp_path / "out" / atomic.OWNER_FILE).exists()
    assert kept.read_text() == CANARY
    for folder in (live, fresh, foreign, other_output, *unrelated):
        shutil.rmtree(folder)
    assert_no_leftovers(tmp_path)


def test_staging_records_its_owner_while_it_works(tmp_path):
    with atomic.atomic_dir(tmp_path / "out", kind="accullm-export/export") as staging:
        owner = json.loads((staging / atomic.OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and staging.name.startswith(".out.")
        assert atomic.remove_stale_staging(tmp_path / "out") == []  # its own, running: kept
        (staging / "manifest.json").write_text(json.dumps({"kind": "accullm-export/export"}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json"]
    assert_no_leftovers(tmp_path)
