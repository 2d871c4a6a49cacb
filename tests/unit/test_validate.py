"""validate: metrics against an independent NumPy computation, gates, bisection, generic mode, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from accullm_export.cli.main import main
from accullm_export.runtime import OrtCausalLM
from tests.helpers.emulation import hand_kl
from tests.helpers.graphs import llm_feed, make_mlp
from tests.helpers.models import TEXT, make_tiny_checkpoint

FAST = ["--windows", "3", "--seq-len", "48", "--num-prompts", "3", "--new-tokens", "12", "--probes-per-task", "1"]


def perturb(source, target, initializer: str, scale: float):
    """Copy an exported folder, multiplying one initializer by ``scale``."""
    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"))
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == initializer:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * scale,
                                                                            initializer))
    (target / "model.onnx.data").unlink()
    onnx.save_model(model, str(target / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return target


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_model_against_itself(capsys, tiny_exports, text_file, tmp_path):
    _, folder = tiny_exports["llama"]
    code, out, _ = run(capsys, "validate", str(folder), str(folder), "--text", str(text_file), *FAST,
                       "--report", str(tmp_path / "rep"))
    assert code == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["mode"] == "llm"
    assert report["metrics"]["kl_mean"] == 0.0 and report["metrics"]["top1_agreement"] == 1.0
    assert report["metrics"]["ppl_delta_pct"] == 0.0
    assert report["greedy"]["full_matches"] == report["greedy"]["count"] == 3
    assert report["probes"]["agreement"] == 1.0
    assert (tmp_path / "rep" / "report.html").is_file()


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # the default; one position at a time
def test_perturbed_model_matches_hand_computed_metrics(tiny_exports, text_file, tmp_path, chunk_bytes, monkeypatch):
    """validate's text metrics against a hand-computed softmax per position, with the positions of each window
    taken in one piece or one at a time (TokenStatistics bounds its float64 temporaries so)."""
    from accullm_export.data.text import load_text_source, token_windows
    from accullm_export.runtime.tokenizer import FolderTokenizer
    from accullm_export.validate import metrics
    from accullm_export.validate.llm import LLMValidationConfig, text_metrics

    if chunk_bytes is not None:
        monkeypatch.setattr(metrics, "CHUNK_BYTES", chunk_bytes)

    _, folder = tiny_exports["llama"]
    candidate = perturb(folder, tmp_path / "cand", "model.layers.0.mlp.up_proj.MatMul.weight", 1.8)
    ref, cand = OrtCausalLM.from_path(folder, device="cpu"), OrtCausalLM.from_path(candidate, device="cpu")
    tokenizer = FolderTokenizer(folder)
    config = LLMValidationConfig(text=str(text_file), windows=3, seq_len=48)
    measured = text_metrics(ref, cand, tokenizer, config)["metrics"]

    windows = token_windows(load_text_source(str(text_file)).documents, tokenizer.encode, num_windows=3, seq_len=48,
                            seed=0, separator_ids=tokenizer.eos_token_ids[:1])
    kls, nll_r, nll_c, agree = [], [], [], []
    for window in windows:
        r = ref.full_logits(window[None])[0, :-1].astype(np.float64)
        c = cand.full_logits(window[None])[0, :-1].astype(np.float64)
        kls.extend(hand_kl(r, c))
        for t, target in enumerate(window[1:]):
            pr = np.exp(r[t] - r[t].max()); pr /= pr.sum()
            pc = np.exp(c[t] - c[t].max()); pc /= pc.sum()
            nll_r.append(-np.log(pr[target])); nll_c.append(-np.log(pc[target]))
            agree.append(r[t].argmax() == c[t].argmax())
    assert measured["kl_mean"] > 1e-4  # the perturbation is visible
    assert measured["kl_mean"] == pytest.approx(np.mean(kls), rel=1e-6)
    assert measured["kl_p99"] == pytest.approx(np.percentile(kls, 99), rel=1e-6)
    assert measured["ppl_reference"] == pytest.approx(np.exp(np.mean(nll_r)), rel=1e-9)
    assert measured["ppl_candidate"] == pytest.approx(np.exp(np.mean(nll_c)), rel=1e-9)
    assert measured["top1_agreement"] == pytest.approx(np.mean(agree))


def test_failed_gate_exits_one_and_says_by_how_much(capsys, tiny_exports, text_file, tmp_path):
    _, folder = tiny_exports["llama"]
    candidate = perturb(folder, tmp_path / "cand", "model.layers.1.self_attn.o_proj.MatMul.weight", 2.0)
    code, out, err = run(capsys, "validate", str(folder), str(candidate), "--text", str(text_file), *FAST,
                         "--max-kl", "1e-9", "--min-top1", "0.0", "--report", str(tmp_path / "rep"))
    assert code == 1
    assert "max-kl" in err and "off by" in err and "min-top1" not in err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    gates = {gate["name"]: gate["passed"] for gate in report["gates"]}
    assert gates == {"max-kl": False, "min-top1": True}


def test_bisect_finds_the_broken_layer(capsys, tiny_exports, text_file, tmp_path):
    _, folder = tiny_exports["qwen2"]
    candidate = perturb(folder, tmp_path / "cand", "model.layers.1.mlp.up_proj.MatMul.weight", 3.0)
    code, out, _ = run(capsys, "validate", str(folder), str(candidate), "--text", str(text_file), *FAST,
                       "--bisect", "--report", str(tmp_path / "rep"))
    assert code == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    blocks = report["layers"]["blocks"]
    assert [b["index"] for b in blocks] == [0, 1]
    assert blocks[0]["rel_error"] == 0.0 and blocks[1]["rel_error"] > 0.05
    culprit = report["bisect"]["culprit"]
    assert culprit["node"] == "/model/layers.1/mlp/up_proj/MatMul"
    assert culprit["precision"] == "float32"
    assert "/model/layers.1/mlp/up_proj/MatMul" in out


def test_mismatched_vocabularies(capsys, tiny_exports, tmp_path, text_file):
    from accullm_export.models.export import export_model

    _, folder = tiny_exports["llama"]
    other = make_tiny_checkpoint(tmp_path / "hf", "llama", vocab_size=300)
    export_model(str(other), tmp_path / "other")
    code, _, err = run(capsys, "validate", str(folder), str(tmp_path / "other"), "--text", str(text_file), *FAST)
    assert code == 2 and "vocabulary sizes differ" in err


def test_empty_text_source(capsys, tiny_exports, tmp_path):
    _, folder = tiny_exports["llama"]
    (tmp_path / "empty.txt").write_text("\n\n")
    code, _, err = run(capsys, "validate", str(folder), str(folder), "--text", str(tmp_path / "empty.txt"), *FAST)
    assert code == 2 and "empty" in err and "Traceback" not in err


def test_generic_polygraphy_comparison(capsys, tmp_path):
    ref, cand = make_mlp(tmp_path / "a.onnx"), make_mlp(tmp_path / "b.onnx", scale=1.01)
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n\ndef load_data():\n    rng = np.random.default_rng(3)\n"
                      "    for _ in range(3):\n        yield {'x': rng.standard_normal((2, 8)).astype(np.float32)}\n")
    code, out, _ = run(capsys, "validate", str(ref), str(ref), "--data-loader", str(script),
                       "--report", str(tmp_path / "same"))
    assert code == 0
    report = json.loads((tmp_path / "same" / "report.json").read_text())
    assert report["mode"] == "generic" and report["generic"]["iterations"] == 3
    assert report["generic"]["outputs"][0]["cosine"] == pytest.approx(1.0)
    assert (tmp_path / "same" / "inputs.json").is_file()
    assert "polygraphy run" in report["generic"]["polygraphy_command"]
    code, _, err = run(capsys, "validate", str(ref), str(cand), "--data-loader", str(script), "--bisect", "--bisect-tol", "1e-3",
                       "--report", str(tmp_path / "diff"))
    assert code == 1 and "polygraphy" in err
    report = json.loads((tmp_path / "diff" / "report.json").read_text())
    assert report["generic"]["outputs"][0]["max_abs"] > 1e-4
    assert report["bisect"]["culprit"]["node"] == "/mm/MatMul"


def test_generic_random_inputs_and_errors(capsys, tmp_path):
    ref = make_mlp(tmp_path / "a.onnx")
    code, _, _ = run(capsys, "validate", str(ref), str(ref), "--iterations", "2", "--val-range", "-1", "1")
    assert code == 0
    other = make_mlp(tmp_path / "c.onnx", input_name="z")
    code, _, err = run(capsys, "validate", str(ref), str(other))
    assert code == 2 and "different input names" in err
    bad = tmp_path / "bad.py"
    bad.write_text("def load_data():\n    raise RuntimeError('no data here')\n")
    code, _, err = run(capsys, "validate", str(ref), str(ref), "--data-loader", str(bad))
    assert code == 2 and "no data here" in err and "Traceback" not in err


def test_intermediate_sessions_run_only_what_the_tapped_tensors_need(tiny_exports):
    """A tapped layer input is computed by the nodes before it alone (no later layer, no LM head), with the same
    values as in the whole graph, and shared weights the pruned graph does not read are left out."""
    from accullm_export.runtime import intermediates
    from accullm_export.runtime.session import create_session
    from onnx import helper

    _, folder = tiny_exports["llama"]
    reader = intermediates.IntermediateReader(folder)
    early = "/model/layers.0/residual_mlp/Add/output_0"
    pruned = reader.pruned([early])
    kept = {node.name for node in pruned.graph.node}
    assert kept and len(kept) < len(reader.model.graph.node)
    assert not any("layers.1" in name or "lm_head" in name for name in kept)
    assert [output.name for output in pruned.graph.output] == [early]
    assert not any("layers.1" in tensor.name for tensor in pruned.graph.initializer)
    whole = onnx.ModelProto()
    whole.CopyFrom(reader.model)
    whole.graph.output.extend([helper.make_empty_tensor_value_info(early)])
    session = create_session(whole.SerializeToString(), device="cpu", optimization="basic",
                             external_data_folder=folder)
    feed = llm_feed(folder)
    inputs = {spec.name for spec in session.get_inputs()}
    expected = session.run([early], {name: value for name, value in feed.items() if name in inputs})[0]
    weights = {tensor.name: onnx.numpy_helper.to_array(tensor, base_dir=str(folder))
               for tensor in reader.model.graph.initializer if tensor.name.endswith("MatMul.weight")}
    shared = intermediates.IntermediateReader(folder, shared_initializers=weights)
    for tap in (reader.open([early]), shared.open([early])):
        np.testing.assert_array_equal(tap.run(feed)[early], expected)


def test_intermediates_leave_the_model_folder_as_it_was(tiny_exports, monkeypatch, tmp_path):
    """Intermediates come from the graph serialized in memory, its weights read from the model's folder: no
    temporary file beside the model or in the system temp folder."""
    import tempfile

    from accullm_export.runtime import intermediates

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _, folder = tiny_exports["llama"]
    before = sorted(p.name for p in folder.iterdir())
    reader = intermediates.IntermediateReader(folder)
    runner = OrtCausalLM.from_path(folder, device="cpu")
    ids = np.array([[5, 6, 7, 8]])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    for i, (key, value) in enumerate(runner.empty_cache(1)):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = key, value
    values = reader.run(feed, ["/model/layers.1/residual_mlp/Add/output_0", "logits"])
    assert np.allclose(values["logits"], runner.full_logits(ids), atol=1e-6)
    assert values["/model/layers.1/residual_mlp/Add/output_0"].shape == (1, 4, 64)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not any(tmp_path.iterdir())
