"""benchmarks/sparsity.py's speed ceiling: which profiled nodes belong to an MLP, to its down projection and to its
guesser, and the bound they give."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from accullm_export.build.sparsify import sparsify_model
from accullm_export.sparsity.config import SparsityConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_step_shares_sort_nodes_by_prefix():
    import sparsity as bench

    prefixes = [("/model/layers.0/mlp", "/model/layers.0/mlp/down_proj"),
                ("/model/layers.1/mlp", "/model/layers.1/mlp/down_proj")]
    node_us = {"/model/layers.0/mlp/down_proj/MatMul": 10.0,
               "/model/layers.0/mlp/down_proj/MatMul/outliers/MatMul": 1.0,
               "/model/layers.0/mlp/gate_proj/MatMul/merged_with_1": 20.0,
               "/model/layers.0/mlp/sparse/guess_rank": 3.0,
               "/model/layers.0/mlp/down_projection_elsewhere": 5.0,  # a sibling name, not under down_proj/
               "/model/layers.1/mlp/Mul": 2.0,
               "/model/layers.10/mlp/down_proj/MatMul": 100.0,  # layers.10 is not under layers.1
               "/model/layers.1/self_attn/o_proj/MatMul": 50.0}
    assert bench.step_shares(node_us, prefixes) == {"mlp_us": 41.0, "down_us": 11.0, "guesser_us": 3.0}
    assert bench.ceiling(100.0, 40.0, 0.5) == pytest.approx(100 / 80)
    assert bench.ceiling(100.0, 40.0, 0.5, added_us=10.0) == pytest.approx(100 / 90)
    assert bench.ceiling(100.0, 40.0, 0.0) == 1.0


def test_ceilings_on_a_profiled_tiny_model(planted_model, profile, tmp_path):
    import peers
    import profile_decode
    import sparsity as bench

    folder, _ = planted_model
    predictor = tmp_path / "p"
    sparsify_model(folder, predictor, SparsityConfig(sparsity=0.5, method="predictor", rank=8, samples=4, steps=20),
                   profile)
    prefixes = bench.mlp_prefixes(folder)
    assert prefixes == [(f"/model/layers.{i}/mlp", f"/model/layers.{i}/mlp/down_proj") for i in range(2)]
    prompt = peers.decode_prompt(folder)
    # the prefixes find ONNX Runtime's optimized (fused, renamed) nodes in the profile
    dense = profile_decode.profile_folder(folder, prompt, 3, tmp_path)
    shares = bench.step_shares(dense["node_us"], prefixes)
    assert 0 < shares["down_us"] < shares["mlp_us"] < dense["kernel_us"] and shares["guesser_us"] == 0
    found = bench.speed_ceilings({"fp32": folder, "fp32+predictor-50": predictor}, 3, prompt)["fp32"]
    assert found["guesser_us"] > 0 and found["mlp_us"] > found["down_us"] > 0
    assert found["threshold"] == pytest.approx(found["step_us"] / (found["step_us"] - 0.5 * found["down_us"]))
    assert found["predictor"] == pytest.approx(
        found["step_us"] / (found["step_us"] - 0.5 * found["mlp_us"] + found["guesser_us"]))
    assert found["threshold"] > 1.0
