"""calibrate: streamed statistics equal NumPy over the same batches; policies find planted outliers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from accullm_export.calibration.outliers import OutlierPolicy
from accullm_export.calibration.profile import load_profile
from accullm_export.calibration.run import CalibrationConfig, calibrate
from accullm_export.cli.main import main
from accullm_export.errors import UserError
from accullm_export.runtime.intermediates import IntermediateReader
from tests.helpers.graphs import make_mlp
from tests.helpers.models import PLANTED, SAMPLES, SEQ_LEN, TEXT


def test_statistics_equal_numpy_over_the_same_batches(planted_model, profile):
    from accullm_export.calibration.feeds import llm_feeds, text_windows

    folder, text = planted_model
    loaded = load_profile(profile, folder / "model.onnx")
    windows, _ = text_windows(folder, str(text), SAMPLES, SEQ_LEN, 0)
    feeds = llm_feeds(windows, folder / "model.onnx")
    names = [entry["name"] for entry in loaded.manifest["inputs"]]
    from accullm_export.calibration.collect import OPTIMIZATION

    tap = IntermediateReader(folder, OPTIMIZATION).open(names)  # every tensor at once: fine for a tiny model
    values = [tap.run(feed) for feed in feeds]
    for name in names:
        stacked = np.concatenate([v[name] for v in values], axis=0)  # [samples, seq, channels]
        main = np.abs(stacked[:, 1:, :].reshape(-1, stacked.shape[-1]).astype(np.float64))
        sink = np.abs(stacked[:, 0, :].astype(np.float64))
        stats = loaded.input_statistics(name)
        assert np.allclose(stats["absmax"], main.max(0), rtol=1e-6), (name, np.abs(stats["absmax"] - main.max(0)).max())
        assert np.allclose(stats["p999"], np.percentile(main, 99.9, axis=0), rtol=1e-5, atol=1e-6)
        assert np.allclose(stats["mean_abs"], main.mean(0), rtol=1e-5)
        assert np.allclose(stats["second_moment"], (main ** 2).mean(0), rtol=1e-5)
        assert np.array_equal(stats["over_threshold"], (main > 6.0).sum(0))
        assert int(stats["rows"]) == SAMPLES * (SEQ_LEN - 1) and bool(stats["p999_exact"])
        assert np.allclose(stats["sink_absmax"], sink.max(0), rtol=1e-6)
        if name.endswith("mlp/Mul/output_0"):  # the down projection's input: sparsity thresholds
            node = name.replace("/Mul/output_0", "/down_proj/MatMul")
            thresholds = loaded.manifest["sparsity"][node]["thresholds"]
            for level, threshold in zip(loaded.manifest["sparsity"][node]["levels"], thresholds):
                assert abs(np.mean(main < threshold) - level) < 0.01


def test_passes_in_groups_give_the_one_pass_statistics_one_session_at_a_time(planted_model, profile, monkeypatch):
    """A budget of one batch's single tensor gives every input its own pass: the statistics are those of the
    profile's single pass, and each pass's session is freed before the next one's is made (a session holds the
    weights its tensors depend on)."""
    from accullm_export.calibration.collect import collect_statistics
    from accullm_export.calibration.feeds import llm_feeds, text_windows
    from accullm_export.graph.linear import find_linear_layers
    from tests.helpers.sessions import track_tap_sessions

    folder, text = planted_model
    loaded = load_profile(profile, folder / "model.onnx")
    windows, _ = text_windows(folder, str(text), SAMPLES, SEQ_LEN, 0)
    feeds = llm_feeds(windows, folder / "model.onnx")
    layers = find_linear_layers(onnx.load(str(folder / "model.onnx"), load_external_data=False))
    alive = track_tap_sessions(monkeypatch)
    collected = collect_statistics(folder / "model.onnx", layers, lambda: feeds, total_rows=SAMPLES * (SEQ_LEN - 1),
                                   rows_per_batch=SEQ_LEN, sink=True, budget_bytes=1)
    assert collected.passes == len({layer.input for layer in layers}) > 2 and loaded.manifest["passes"] == 1
    assert alive == [0] * collected.passes
    for name, stats in collected.channels.items():
        finished, stored = stats.finish(), loaded.input_statistics(name)
        for key in ("absmax", "p999", "second_moment", "sink_absmax"):
            np.testing.assert_array_equal(finished[key], stored[key], err_msg=f"{name} {key}")


@pytest.mark.parametrize("batch_rows", [7, 50, 400])  # batches under, near and over the values kept per channel
def test_the_running_top_values_are_every_batch_s_top_values(batch_rows):
    """The p99.9's kept magnitudes per channel are exactly the largest ones of all rows, however the batches
    fall: the first batches fill them, later ones merge in only what beats a channel's smallest kept value
    (ties, zeros and channels that never change included)."""
    from accullm_export.calibration.stats import ChannelStatistics

    rng = np.random.default_rng(batch_rows)
    data = rng.standard_normal((3000, 6)).astype(np.float32)
    data[:, 1] = np.round(data[:, 1])  # many ties
    data[:, 2] = 0.0  # nothing ever joins
    data[::97, 3] *= 40  # rare outliers
    data[:, 4] = np.linspace(0, 1, 3000, dtype=np.float32)  # growing: every batch beats the kept values
    stats = ChannelStatistics(6, len(data))
    for start in range(0, len(data), batch_rows):
        stats.update(data[start:start + batch_rows])
    keep = stats.top.shape[1]
    assert keep == 4  # 3000 - floor(2999 * 0.999)
    expected = np.sort(np.abs(data), axis=0)[-keep:].T
    np.testing.assert_array_equal(np.sort(stats.top, axis=1), expected)
    p999, exact = stats.percentile()
    assert exact
    np.testing.assert_allclose(p999, np.percentile(np.abs(data), 99.9, axis=0), rtol=1e-6)


@pytest.mark.parametrize("policy", ["threshold", "topk", "ratio", "sensitivity"])
def test_every_policy_finds_the_planted_channels(profile, policy):
    loaded = load_profile(profile)
    for layer in loaded.manifest["layers"]:
        if layer["node"].endswith(("q_proj/MatMul", "k_proj/MatMul", "v_proj/MatMul", "gate_proj/MatMul",
                                   "up_proj/MatMul")):
            chosen = layer["candidates"][policy]
            assert set(PLANTED) <= set(chosen), (policy, layer["node"], chosen)
            if policy in ("topk", "sensitivity"):
                assert chosen == PLANTED
    assert loaded.manifest["policy"]["name"] == "ratio"


def test_batches_differ_and_the_same_seed_gives_the_same_profile(planted_model, profile, tmp_path):
    folder, text = planted_model
    loaded = load_profile(profile)
    digests = loaded.manifest["batch_digests"]
    assert len(digests) == SAMPLES and len(set(digests)) == SAMPLES
    config = CalibrationConfig(source=str(text), samples=SAMPLES, seq_len=SEQ_LEN,
                               policy=OutlierPolicy(name="ratio", k=2, ratio=20.0))
    calibrate(folder, tmp_path / "again", config)
    again = load_profile(tmp_path / "again")
    assert again.manifest == loaded.manifest
    assert again.arrays.keys() == loaded.arrays.keys()
    assert all(np.array_equal(again.arrays[k], loaded.arrays[k]) for k in loaded.arrays)
    calibrate(folder, tmp_path / "other", CalibrationConfig(source=str(text), samples=SAMPLES, seq_len=SEQ_LEN,
                                                           seed=1))
    assert load_profile(tmp_path / "other").manifest["batch_digests"] != digests


def test_cli_summary_and_report(capsys, planted_model, tmp_path):
    folder, text = planted_model
    code = main(["calibrate", str(folder), "-o", str(tmp_path / "p"), "--calib", str(text), "--samples", "3",
                 "--seq-len", "32", "--policy", "topk", "--topk", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert " 5 " in out or " 40 " in out
    assert (tmp_path / "p" / "report.html").is_file()
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "file" and manifest["config"]["samples"] == 3


def test_generic_model_with_a_load_data_script(tmp_path):
    model = make_mlp(tmp_path / "mlp.onnx")
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n\ndef load_data():\n    rng = np.random.default_rng(0)\n"
                      "    for _ in range(4):\n        x = rng.standard_normal((16, 8)).astype(np.float32)\n"
                      "        x[:, 3] *= 50\n        yield {'x': x}\n")
    calibrate(model, tmp_path / "p", CalibrationConfig(source=str(script), policy=OutlierPolicy(name="topk", k=1)))
    loaded = load_profile(tmp_path / "p", model)
    assert loaded.manifest["layers"][0]["outliers"] == [3]
    assert int(loaded.input_statistics("x")["rows"]) == 64


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty", "short", "seq_len", "no_matmul", "script_raises"])
def test_bad_input(capsys, planted_model, tmp_path, case):
    folder, _ = planted_model
    model, calib, extra = str(folder), str(tmp_path / "c.txt"), []
    if case == "empty":
        (tmp_path / "c.txt").write_text("\n")
        needle = "empty"
    elif case == "short":
        (tmp_path / "c.txt").write_text("only a few words")
        needle = "too short"
    elif case == "seq_len":
        (tmp_path / "c.txt").write_text(TEXT)
        extra, needle = ["--seq-len", "2000"], "maximum"
    elif case == "no_matmul":
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")], "g",
                                  [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 2]) for n in "ab"],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        onnx.save(m, str(tmp_path / "plain.onnx"))
        model, needle = str(tmp_path / "plain.onnx"), "no MatMul/Gemm"
    else:
        (tmp_path / "bad.py").write_text("def load_data():\n    raise ValueError('broken loader')\n")
        calib, needle = str(tmp_path / "bad.py"), "broken loader"
    code, err = run_cli(capsys, "calibrate", model, "-o", str(tmp_path / "out"), "--calib", calib,
                        "--samples", "4", "--seq-len", "64", *extra)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_profile_from_another_model_is_refused(profile, tmp_path):
    other = make_mlp(tmp_path / "other.onnx")
    with pytest.raises(UserError, match="measured on another model"):
        load_profile(profile, other)
    with pytest.raises(UserError, match="not a calibration profile"):
        load_profile(tmp_path)


def test_calibrators_text_script_works_in_calibrate_and_in_polygraphy(planted_model, tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    folder, text = planted_model
    script = Path(__file__).resolve().parents[2] / "calibrators" / "text.py"
    env = {"ACCULLM_MODEL": str(folder), "ACCULLM_TEXT": str(text), "ACCULLM_SAMPLES": "3", "ACCULLM_SEQ_LEN": "24"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calibrate(folder, tmp_path / "p", CalibrationConfig(source=str(script)))
    assert load_profile(tmp_path / "p").manifest["batches"] == 3
    polygraphy = Path(sys.executable).with_name("polygraphy")
    result = subprocess.run([str(polygraphy), "run", str(folder / "model.onnx"), "--onnxrt",
                             "--data-loader-script", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASSED" in result.stdout + result.stderr
