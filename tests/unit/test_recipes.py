"""Recipes as data: the shipped presets, the config tree's checks, --dump-config / --config round trips, the
`presets` listing, the short `quantize` command line and each target's default preset."""

from __future__ import annotations

import hashlib

import pytest

from accullm_export.errors import UserError
from accullm_export.recipes.config import Recipe
from accullm_export.recipes.presets import all_presets, get_preset, load_config
from accullm_export.recipes.toml_io import dump_toml
from tests.helpers.cli import assert_user_error, run_cli

REQUIRED = {"w4a16", "w4a16-fast", "w8a8", "w8a8-static", "fp16"}


def test_the_required_presets_ship_and_resolve_for_each_backend():
    presets = all_presets()
    assert REQUIRED <= set(presets)
    for name, preset in presets.items():
        assert preset.description
        for backend in preset.backends:
            recipe = preset.resolve(backend)
            assert recipe.name == name and recipe.backend == backend
            assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_presets_differ_per_backend_where_the_runtimes_do():
    w4a16 = get_preset("w4a16")
    onnxruntime, tensorrt = w4a16.resolve("onnxruntime"), w4a16.resolve("tensorrt")
    assert onnxruntime.weights.asymmetric and onnxruntime.outliers.planes and onnxruntime.graph.onnxruntime_fusions
    assert not (tensorrt.outliers.planes or tensorrt.graph.onnxruntime_fusions)
    assert tensorrt.weights.asymmetric  # lowered to signed INT4 plus block offsets (graph.passes.lower_zero_points)
    assert onnxruntime.weights.scale_bits == 8 and tensorrt.weights.scale_bits == 16
    assert onnxruntime.weights.block_size == tensorrt.weights.block_size == 64
    assert onnxruntime.distill.steps > 0 and get_preset("w4a16-fast").resolve("onnxruntime").distill.steps == 0
    assert get_preset("w8a8-static").resolve("tensorrt").activations.mode == "static"
    assert get_preset("w8a8").resolve("onnxruntime").activations.mode == "dynamic"


def test_a_preset_the_backend_cannot_run_is_refused():
    with pytest.raises(UserError, match="preset w8a8 does not run on tensorrt.*w8a8-static"):
        get_preset("w8a8").resolve("tensorrt")
    with pytest.raises(UserError, match="outliers.bits: cannot run on the tensorrt backend"):
        Recipe.from_dict({"backend": "tensorrt", "outliers": {"bits": 8}})
    with pytest.raises(UserError, match="outliers.planes: cannot run on the tensorrt backend"):
        Recipe.from_dict({"backend": "tensorrt", "outliers": {"planes": True}})


@pytest.mark.parametrize("data, message", [
    ({"weights": {"blok_size": 64}}, "recipe key weights.blok_size: unknown key"),
    ({"colour": "red"}, "recipe key colour: unknown key"),
    ({"weights": {"block_size": 100}}, "recipe key weights.block_size: must be one of"),
    ({"weights": {"block_size": "64"}}, "recipe key weights.block_size: must be int"),
    ({"weights": {"scale_search": 1}}, "recipe key weights.scale_search: must be bool"),
    ({"gptq": {"samples": True}}, "recipe key gptq.samples: must be int"),
    ({"gptq": {"samples": 0}}, "recipe key gptq.samples: must be at least 1"),
    ({"distill": {"lr": float("nan")}}, "recipe key distill.lr: must be a finite number"),
    ({"distill": {"steps": -1}}, "recipe key distill.steps: must be 0"),
    ({"outliers": {"channels": -3}}, "recipe key outliers.channels"),
    ({"outliers": {"channels": "many"}}, "recipe key outliers.channels"),
    ({"activations": {"mode": "dynamic"}}, "recipe key activations.mode: INT8 activations need"),
    ({"weights": "int4"}, "recipe key weights: must be a table"),
    ({"version": 2}, "recipe key version"),
    ({"sparsity": {"fraction": 1.0}}, "recipe key sparsity.fraction"),
    ({"weights": {"overrides": [["lm_head", "int3"]]}}, "recipe key weights.overrides"),
    ({"weights": {"overrides": [["lm_head"]]}}, "recipe key weights.overrides: each entry"),
])
def test_every_bad_key_is_named(data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Recipe.from_dict(data)


def test_an_older_dump_with_group_0_still_loads_where_the_group_does_not_apply():
    """Earlier --dump-config output wrote activations.group = 0 ("off") into every recipe."""
    for mode in ("none", "static"):
        weights = {"precision": "int8"} if mode == "static" else {}
        assert Recipe.from_dict({"weights": weights, "activations": {"mode": mode, "group": 0}}).activations.group == 0
    with pytest.raises(UserError, match="recipe key activations.group: must be one of 16, 32, 64, 128, 256, auto"):
        Recipe.from_dict({"weights": {"precision": "int8"}, "activations": {"mode": "dynamic", "group": 0}})


def test_dump_config_reads_back_as_the_same_recipe(tmp_path):
    for name, preset in all_presets().items():
        for backend in preset.backends:
            recipe = preset.resolve(backend)
            path = tmp_path / f"{name}-{backend}.toml"
            path.write_text(dump_toml(recipe.to_dict()))
            assert load_config(path, backend) == recipe
    with pytest.raises(UserError, match="resolved for the onnxruntime backend, not tensorrt"):
        load_config(tmp_path / "w4a16-onnxruntime.toml", "tensorrt")


def test_cli_dump_config_then_config_builds_the_same_model_bit_for_bit(planted_model, profile, tmp_path, capsys):
    folder, _ = planted_model
    code, dumped, _ = run_cli(capsys, "quantize", "--preset", "w4a16-fast", "--block-size", "16",
                              "--override", "*down_proj*=int8", "--dump-config")
    assert code == 0 and "block_size = 16" in dumped and '["*down_proj*", "int8"]' in dumped
    config = tmp_path / "recipe.toml"
    config.write_text(dumped)
    for out, source in (("a", ("--preset", "w4a16-fast", "--block-size", "16", "--override", "*down_proj*=int8")),
                        ("b", ("--config", str(config)))):
        code, _, err = run_cli(capsys, "quantize", str(folder), "--profile", str(profile), "-o",
                               str(tmp_path / out), *source)
        assert code == 0, err
    digests = [{path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted((tmp_path / out).iterdir()) if path.name != "manifest.json"} for out in "ab"]
    assert digests[0] == digests[1] and "model.onnx" in digests[0]


def test_recipe_is_an_alias_of_preset(capsys):
    code, by_recipe, _ = run_cli(capsys, "quantize", "--recipe", "w8a8", "--dump-config")
    code2, by_preset, _ = run_cli(capsys, "quantize", "--preset", "w8a8", "--dump-config")
    assert code == code2 == 0 and by_recipe == by_preset and 'name = "w8a8"' in by_preset


@pytest.mark.parametrize("argv, needle", [
    (("quantize", "--preset", "w5a5", "--dump-config"), "unknown preset 'w5a5'; known presets: fp16, w4a16"),
    (("quantize", "--dump-config"), "give --preset NAME"),
    (("quantize", "--preset", "w8a8", "--backend", "tensorrt", "--dump-config"), "does not run on tensorrt"),
    (("quantize", "--preset", "w4a16", "M"), "quantize needs --profile, -o"),
])
def test_bad_recipe_input_is_one_line(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, needle)


def test_a_bad_config_file_names_its_key(capsys, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[weights]\nprecision = "int4"\nblock_sise = 64\n')
    code, _, err = run_cli(capsys, "quantize", "--config", str(config), "--dump-config")
    assert_user_error(code, err, "recipe key weights.block_sise: unknown key")
    config.write_text("[weights\n")
    code, _, err = run_cli(capsys, "quantize", "--config", str(config), "--dump-config")
    assert_user_error(code, err, "is not a valid TOML file")


def test_quantize_help_lists_at_most_fifteen_options():
    from accullm_export.cli.main import build_parser

    parser = build_parser()
    quantize = parser._subparsers._group_actions[0].choices["quantize"]  # argparse keeps subparsers here
    options = [action for action in quantize._actions if action.option_strings]
    assert len(options) <= 15, [action.option_strings for action in options]


def test_presets_command_lists_every_preset_with_its_targets(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    for name in REQUIRED:
        assert f"\n{name} " in f"\n{out}"
    code, out, _ = run_cli(capsys, "presets", "--json")
    import json

    rows = {row["name"]: row for row in json.loads(out)}
    assert "cpu" in rows["w8a8"]["targets"] and "orin" not in rows["w8a8"]["targets"]
    assert "orin" in rows["w8a8-static"]["targets"] and "orin" in rows["w4a16"]["default_for"]


def test_each_target_defaults_to_a_preset_its_backend_runs():
    from accullm_export.build.pipeline import target_recipe
    from accullm_export.targets import TARGETS

    for target in TARGETS.values():
        recipe = target_recipe(target, None)
        assert recipe.name == target.default_preset and recipe.backend == target.backend
    with pytest.raises(UserError, match="resolved for onnxruntime, and target orin runs tensorrt"):
        target_recipe(TARGETS["orin"], get_preset("w4a16").resolve("onnxruntime"))


@pytest.mark.parametrize("argv, needle", [
    (("--target", "orin", "--preset", "w8a8"), "preset w8a8 does not run on tensorrt"),
    (("--target", "cpu", "--preset", "nope"), "unknown preset 'nope'"),
    (("--target", "warp-drive"), "unknown target 'warp-drive'"),
])
def test_build_refuses_a_preset_its_target_cannot_run_before_any_work(capsys, tmp_path, argv, needle):
    code, _, err = run_cli(capsys, "build", str(tmp_path / "missing-model"), "-o", str(tmp_path / "out"), *argv)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_build_refuses_a_config_resolved_for_the_other_backend(capsys, tmp_path):
    config = tmp_path / "cpu.toml"
    config.write_text(dump_toml(get_preset("w4a16-fast").resolve("onnxruntime").to_dict()))
    code, _, err = run_cli(capsys, "build", str(tmp_path / "m"), "--target", "orin", "--config", str(config),
                           "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "resolved for the onnxruntime backend, not tensorrt")


def test_recorded_measurements_are_shown_and_leave_the_recipe_alone(tmp_path, monkeypatch):
    """benchmarks/record_presets.py writes a [measured] table from a peers row; the preset's recipe is unchanged
    and the table is replaced, not repeated, when recorded again."""
    import shutil
    import sys
    from pathlib import Path

    from accullm_export.recipes.presets import load_preset_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import record_presets

    source = Path(record_presets.PRESETS) / "w8a8.toml"
    copy = tmp_path / "w8a8.toml"
    shutil.copy(source, copy)
    row = {"metrics": {"kl_mean": 0.00123456, "ppl_delta_pct": 0.4567, "top1_agreement": 0.98765},
           "second_metrics": None, "bits_per_weight": 8.61234, "build_seconds": 150.0,
           "decode_tokens_per_second": 90.0}
    run = {"environment": {"date": "2026-12-06 12:00:00"}, "validation": {"text": "wiki:evaluation", "windows": 32},
           "settings": {"second_text": None}}
    for _ in range(2):
        record_presets.write_measured(copy, record_presets.measured_table(
            row, run, {"decode_tokens_per_second": 100.0}, "peers.py --windows 32"))
    preset = load_preset_file(copy)
    assert preset.resolve("onnxruntime") == get_preset("w8a8").resolve("onnxruntime")
    assert preset.measured["kl"] == 0.00123 and preset.measured["decode_vs_genai_int4_b64"] == 0.9
    assert preset.measured["build_minutes"] == 2.5 and copy.read_text().count("[measured]") == 1
    assert copy.read_text().count(record_presets.HEADER) == 1  # its comment line is not repeated either
