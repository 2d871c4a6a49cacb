"""benchmarks/peers.py's rows: every one of our recipes is a valid `quantize` command line, and a peer that needs
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
    from accullm_export.cli.main import build_parser
    from accullm_export.cli.quantize import recipe_from_args

    recipes = _our_recipes()
    assert "ours-w4a16-b64-best" in recipes and len(recipes) >= 10
    for name, flags in recipes.items():
        args = build_parser().parse_args(["quantize", "MODEL", "--profile", "P", "-o", "OUT", *flags])
        recipe = recipe_from_args(args)  # the recipe's own checks raise on flags that do not go together
        assert recipe.name in ("fp16", "w8a8", "w4a16"), name
    best = recipe_from_args(build_parser().parse_args(
        ["quantize", "MODEL", "--profile", "P", "-o", "OUT", *recipes["ours-w4a16-b64-best"]]))
    assert best.distill_steps == 120 and best.refine_vocab == 4096 and best.rotate == ("lm_head",)
    assert best.outlier_layers == ("residual", "!lm_head") and best.asymmetric and best.scale_bits == 8


def test_a_peer_gets_its_longer_build_time(tmp_path):
    import peers

    seen = []

    def build(context, folder, log_path):
        seen.append(context.timeout_s)
        (folder / "model.onnx").write_bytes(b"")
        return ["built"]

    context = peers.BuildContext(reference=tmp_path / "ref", hf_folder=tmp_path / "hf", work=tmp_path / "work",
                                 settings=peers.QUICK, timeout_s=600)
    for minutes in (40, 5):
        peer = peers.Peer(name=f"p{minutes}", label="test", build=build, build_minutes=minutes)
        record = peers.ensure_built(peer, context, reuse=False)
        assert record["notes"] == ["built"] and (tmp_path / f"work/p{minutes}/model.onnx").is_file()
    assert seen == [2400, 600]
    distilled = {"ours-w4a16-b64-best", "ours-w4a16-b64-planes"}
    assert {peers.PEERS[name].build_minutes for name in distilled} == {40}
    assert {peer.build_minutes for name, peer in peers.PEERS.items() if name not in distilled} == {10}


def test_the_table_reads_our_quantized_head_and_embedding(planted_model, profile, tmp_path):
    """Our graphs keep the LM head behind a DequantizeLinear and gather an INT8 table beside its per-token
    scales: the table says so, where it once said "not found" and "table float" (the scales' Gather)."""
    import peers

    from accullm_export.build.quantize import quantize_model
    from accullm_export.graph.recipes import Recipe

    folder, _ = planted_model
    quantize_model(folder, tmp_path / "q", Recipe(name="w4a16", block_size=16, policy="ratio", asymmetric=True),
                   profile)
    described = peers.describe_quantization(tmp_path / "q", vocab_size=256)
    assert described["lm_head"] == "MatMul of a DequantizeLinear uint4 weight, block 16"
    assert described["embedding"] == "Gather, table int8"
    reference = peers.describe_quantization(folder, vocab_size=256)
    assert reference["lm_head"] == "MatMul, weight float" and reference["embedding"] == "Gather, table float"
