"""The ONNX Runtime target passes: GroupQueryAttention (rotary inside) and SkipSimplifiedLayerNormalization.

Each fused graph is run against the unfused export in ONNX Runtime (basic optimization): a batch-1 prompt
and decode steps through the KV cache, and a left-padded batch of two prompts, where the contrib op's slot
positions differ from the position ids by each row's padding.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from accullm_export.graph.ir import load_graph, save_graph
from accullm_export.graph.pipeline import run_passes
from accullm_export.runtime import OrtCausalLM
from accullm_export.runtime.base import position_ids_from_mask
from accullm_export.runtime.generation import left_pad

FUSIONS = ("fuse_group_query_attention", "fuse_skip_rms_norm")


def _fused_copy(folder, out, passes=FUSIONS, edit=None):
    """``folder``'s model with ``passes`` applied, written to ``out``/model.onnx; returns (path, notes, ops)."""
    graph, model = load_graph(folder / "model.onnx")
    if edit is not None:
        edit(graph)
    graph, reports, _ = run_passes(graph, [(name, None) for name in passes])
    out.mkdir()
    save_graph(graph, model, out / "model.onnx", {})
    for name in ("config.json", "genai_config.json"):
        if (folder / name).is_file():
            (out / name).write_text((folder / name).read_text())
    ops = Counter(node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    return out / "model.onnx", [note for report in reports for note in report.notes], ops


def _run(runner, prompts, steps=3):
    """Logits of the prompts' real tokens, then of ``steps`` decode steps through the cache (fixed tokens)."""
    ids, mask = left_pad(prompts)
    logits, cache = runner.forward(ids, mask, position_ids_from_mask(mask), runner.empty_cache(len(prompts)))
    out = [logits[mask.astype(bool)]]
    for step in range(steps):
        token = np.full((len(prompts), 1), 7 + 11 * step, dtype=np.int64)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), mask.dtype)], axis=1)
        logits, cache = runner.forward(token, mask, position_ids_from_mask(mask)[:, -1:], cache)
        out.append(logits[:, -1])
    return np.concatenate(out)


def _assert_same_model(reference, fused):
    prompts = ([list(range(3, 17))], [list(range(3, 17)), [9, 30, 41, 52, 5]])
    for batch in prompts:
        expected = _run(OrtCausalLM.from_path(reference, optimization="basic"), batch)
        got = _run(OrtCausalLM.from_path(fused, optimization="basic"), batch)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_fusions_keep_the_numerics(tiny_exports, tmp_path, model_type):
    """Every architecture: no standard Attention, RotaryEmbedding or residual Add + RMSNorm left, same logits
    (Mistral's sliding window of 5 is shorter than the prompts; Qwen2 has q/k/v biases, Qwen3 per-head norms)."""
    _, folder = tiny_exports[model_type]
    path, notes, ops = _fused_copy(folder, tmp_path / "fused")
    layers = 2
    assert ops["GroupQueryAttention"] == layers and not ops["Attention"] and not ops["RotaryEmbedding"]
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers  # every norm but the first has a residual Add
    assert not [note for note in notes if "left as standard Attention" in note]
    _assert_same_model(folder, path)


def test_packed_projection_is_read_whole(planted_model, tmp_path):
    """After merge_parallel_linears, GroupQueryAttention reads the packed q/k/v projection: the Split goes."""
    folder, _ = planted_model
    merged, _, merged_ops = _fused_copy(folder, tmp_path / "merged", passes=("merge_parallel_linears",))
    path, _, ops = _fused_copy(folder, tmp_path / "fused", passes=("merge_parallel_linears",) + FUSIONS)
    assert merged_ops["Split"] == 4 and ops["Split"] == 2  # gate/up keep theirs
    model = onnx.load(str(path), load_external_data=False)
    for node in (node for node in model.graph.node if node.op_type == "GroupQueryAttention"):
        assert node.input[1] == "" and node.input[2] == ""  # query only: packed q, k, v
    _assert_same_model(folder, path)


def test_an_unmatched_attention_is_left_with_a_note(tiny_exports, tmp_path):
    """A rotary output the graph also returns cannot be folded into the contrib op: that layer stays standard."""
    _, folder = tiny_exports["llama"]

    def expose_rotary(graph):
        rotary = next(node for node in graph.nodes if node.op == "RotaryEmbedding" and "layers.0" in node.name)
        graph.outputs.append(rotary.outputs[0].to_variable(dtype=np.float32))

    path, notes, ops = _fused_copy(folder, tmp_path / "fused", passes=FUSIONS[:1], edit=expose_rotary)
    assert ops["Attention"] == 1 and ops["GroupQueryAttention"] == 1
    assert len(notes) == 1 and "layers.0" in notes[0] and "RotaryEmbedding" in notes[0]
    _assert_same_model(folder, path)


def test_quantize_cli_writes_the_fusions(planted_model, profile, tmp_path):
    from accullm_export.cli.main import main

    from tests.helpers.recipes import make_recipe, write_config

    folder, _ = planted_model
    base = ["quantize", str(folder), "--profile", str(profile), "--block-size", "32"]
    plain = write_config(tmp_path / "plain.toml", make_recipe(name="w4a16"))
    fused = write_config(tmp_path / "fused.toml", make_recipe(name="w4a16", onnxruntime_fusions=True))
    assert main(base + ["--config", plain, "-o", str(tmp_path / "plain")]) == 0
    assert main(base + ["--config", fused, "-o", str(tmp_path / "fused")]) == 0
    passes = [entry["name"] for entry in json.loads((tmp_path / "fused" / "manifest.json").read_text())["passes"]]
    assert passes[-3:] == ["merge_parallel_linears", *FUSIONS]
    model = onnx.load(str(tmp_path / "fused" / "model.onnx"), load_external_data=False)
    assert {entry.domain: entry.version for entry in model.opset_import}.get("com.microsoft") == 1
    _assert_same_model(tmp_path / "plain" / "model.onnx", tmp_path / "fused" / "model.onnx")


def test_bisection_still_reads_a_fused_model(tiny_exports, tmp_path):
    """The fused ops keep the block outputs' names (the residual sum is SkipSimplifiedLayerNormalization's fourth
    output), so validate --bisect compares every block of a fused candidate."""
    from accullm_export.calibration.feeds import llm_feeds
    from accullm_export.validate.bisect import bisect

    _, folder = tiny_exports["llama"]
    path, _, _ = _fused_copy(folder, tmp_path / "fused")
    feed = llm_feeds(np.arange(3, 15)[None], folder / "model.onnx")[0]
    layers, found = bisect(folder / "model.onnx", path, feed, tolerance=1e-4)
    assert [row["index"] for row in layers["blocks"]] == [0, 1]
    assert all(row["rel_error"] < 1e-5 for row in layers["blocks"]) and found["culprit"] is None


def test_fp16_export_fuses_attention(tmp_path):
    """An fp16 export (the bias is fp16 too): attention fuses, its RMSNorm (cast to float32 and back) is left."""
    from accullm_export.models.export import export_model
    from tests.helpers.models import make_tiny_checkpoint

    hf = make_tiny_checkpoint(tmp_path / "hf", "llama")
    export_model(str(hf), tmp_path / "fp16", dtype="fp16")
    path, _, ops = _fused_copy(tmp_path / "fp16", tmp_path / "fused")
    assert ops["GroupQueryAttention"] == 2 and not ops["Attention"] and not ops["SkipSimplifiedLayerNormalization"]
    for batch in ([list(range(3, 17))], [list(range(3, 17)), [9, 30, 41, 52, 5]]):
        expected = _run(OrtCausalLM.from_path(tmp_path / "fp16", optimization="basic"), batch)
        got = _run(OrtCausalLM.from_path(path, optimization="basic"), batch)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
