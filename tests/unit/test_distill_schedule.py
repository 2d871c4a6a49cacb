"""benchmarks/distill_schedule.py on a tiny export's captured start: schedules in either product precision and
the step timing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

torch = pytest.importorskip("torch", reason="distillation trains with torch (the [export] extra)")
pytest.importorskip("transformers", reason="the replicas are transformers models (the [export] extra)")

import distill_schedule  # noqa: E402

from accullm_export.graph.ir import load_graph  # noqa: E402
from accullm_export.graph.passes.distill_scales import graph_weights  # noqa: E402
from accullm_export.training.distill import teacher_outputs  # noqa: E402
from tests.helpers.distill import rounded_layers  # noqa: E402
from tests.helpers.graphs import token_ids  # noqa: E402


@pytest.fixture
def captured(tiny_exports):
    """What the benchmark's capture saves, made from a tiny llama export directly."""
    _, folder = tiny_exports["llama"]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    ids = token_ids(seed=2).reshape(1, -1)
    windows = np.concatenate([ids, ids[:, ::-1], ids[:, 1:].repeat(2, axis=1)[:, :ids.shape[1]]])
    teacher = teacher_outputs(folder, weights, windows)
    return {"config_dir": str(folder), "hidden": teacher.hidden.numpy(), "head": teacher.head.numpy(),
            "softcap": None, "student": weights, "layers": rounded_layers(weights), "windows": windows}


def test_a_run_names_its_precision_and_unknown_keys_are_refused():
    assert distill_schedule.parse_run("lr=3e-4,precision=bfloat16")["precision"] == "bfloat16"
    assert distill_schedule.parse_run("steps=2")["precision"] == "float32"
    with pytest.raises(SystemExit, match="unknown key 'rate'"):
        distill_schedule.parse_run("rate=1")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_schedule_trains_from_the_capture_and_lowers_the_held_out_kl(captured, precision):
    run = distill_schedule.parse_run(f"lr=2e-2,steps=6,every=3,precision={precision}")
    result = distill_schedule.train(captured, run, None, None)
    trace = result["held_out_kl"]
    assert [step for step, _ in trace] == [0, 3, 6] and trace[-1][1] < trace[0][1]


def test_step_timing_runs_both_precisions_side_by_side(captured):
    timing = distill_schedule.time_steps(captured, 2)
    assert {key: len(value) for key, value in timing["seconds"].items()} == {"float32": 2, "bfloat16": 2}
    assert timing["ratio"] > 0 and timing["median"]["float32"] > 0
