"""benchmarks/peers.py's rows: every one of our presets is a valid `quantize` command line, and a peer that needs
a longer build gets it (a typo in a flag or a short timeout would only show after the run's other builds)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def _our_recipes():
    import peers

    return {name: peer.build.keywords["recipe"] for name, peer in peers.PEERS.items()
            if isinstance(peer.build, functools.partial) and peer.build.func is peers.build_ours}


def test_every_recipe_row_is_a_valid_quantize_command():
    """Each ``ours-*`` row's flags parse and resolve into a recipe (its checks raise on keys that do not go
    together); every preset that runs on ONNX Runtime has its row, which builds exactly that preset."""
    from accullm_export.cli.main import build_parser
    from accullm_export.cli.quantize import resolve_recipe
    from accullm_export.recipes.presets import all_presets

    recipes = _our_recipes()
    presets = {name: preset for name, preset in all_presets().items() if "onnxruntime" in preset.backends}
    assert presets and {f"ours-{name}" for name in presets} <= set(recipes)
    assert "ours-w4a16-fast-no-outliers" in recipes
    resolved = {}
    for name, flags in recipes.items():
        args = build_parser().parse_args(["quantize", "MODEL", "--profile", "P", "-o", "OUT", *flags])
        resolved[name] = resolve_recipe(args, args.backend)
        assert resolved[name].backend == "onnxruntime", name
    for name, preset in presets.items():
        assert resolved[f"ours-{name}"] == preset.resolve("onnxruntime"), name
    ablation = resolved["ours-w4a16-fast-no-outliers"]
    assert ablation.outliers.channels == 0 and not ablation.outlier_branch
    assert ablation.weights == resolved["ours-w4a16-fast"].weights


def test_a_peer_gets_its_longer_build_time(tmp_path):
    import peers

    seen = []

    def build(context, folder, log_path):
        seen.append(context.timeout_s)
        (folder / "model.onnx").write_bytes(b"")
        return ["built"]

    context = peers.BuildContext(reference=tmp_path / "ref", model=peers.SAMPLE_MODEL, hf_folder=tmp_path / "hf",
                                 work=tmp_path / "work", settings=peers.QUICK, timeout_s=600)
    for minutes in (40, 5):
        peer = peers.Peer(name=f"p{minutes}", label="test", build=build, build_minutes=minutes)
        record = peers.ensure_built(peer, context, reuse=False)
        assert record["notes"] == ["built"] and (tmp_path / f"work/p{minutes}/model.onnx").is_file()
    assert seen == [2400, 600]
    from accullm_export.recipes.presets import all_presets

    distilled = {f"ours-{name}" for name, preset in all_presets().items()
                 if "onnxruntime" in preset.backends and preset.resolve("onnxruntime").distill.steps}
    assert "ours-w4a16" in distilled and "ours-w4a16-fast" not in distilled
    assert {peers.PEERS[name].build_minutes for name in distilled} == {40}
    assert {peer.build_minutes for name, peer in peers.PEERS.items() if name not in distilled} == {10}


def test_the_table_reads_our_quantized_head_and_embedding(planted_model, profile, tmp_path):
    """Our graphs keep the LM head behind a DequantizeLinear and gather an INT8 table beside its per-token
    scales: the table says so, where it once said "not found" and "table float" (the scales' Gather)."""
    import peers

    from accullm_export.build.quantize import quantize_model
    from tests.helpers.recipes import make_recipe

    folder, _ = planted_model
    quantize_model(folder, tmp_path / "q", make_recipe(name="w4a16", block_size=16, policy="ratio", asymmetric=True),
                   profile)
    described = peers.describe_quantization(tmp_path / "q", vocab_size=256)
    assert described["lm_head"] == "MatMul of a DequantizeLinear uint4 weight, block 16"
    assert described["embedding"] == "Gather, table int8"
    reference = peers.describe_quantization(folder, vocab_size=256)
    assert reference["lm_head"] == "MatMul, weight float" and reference["embedding"] == "Gather, table float"
