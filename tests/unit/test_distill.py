"""Distilled INT4 block scales (recipe key ``distill.steps``): the torch replicas equal the graphs they are read
from, training moves only the scales, and it lowers the KL it is kept for."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from accullm_export.build.quantize import quantize_model
from accullm_export.errors import UserError
from accullm_export.graph.ir import load_graph
from tests.helpers.recipes import make_recipe

torch = pytest.importorskip("torch", reason="distillation trains with torch (the [export] extra)")
pytest.importorskip("transformers", reason="the replicas are transformers models (the [export] extra)")

from accullm_export.graph.passes.distill_scales import block_scaled_layers, graph_weights  # noqa: E402
from accullm_export.training.distill import (BlockScaled, DistillConfig, block_scaled_linear_class,  # noqa: E402
                                             build_replica, kl_step, mean_kl, module_of, student_replica,
                                             teacher_from_hidden, teacher_outputs)
from tests.helpers.distill import (DISTILL_W4, assert_same_size_and_lower_kl, plain_and_trained,  # noqa: E402
                                   planted_export, rounded_layers, stored_initializers)
from tests.helpers.graphs import ort_logits_for_ids, token_ids  # noqa: E402
from tests.helpers.models import TINY_ARCHITECTURES, load_torch_model  # noqa: E402

W4 = DISTILL_W4


@pytest.fixture(scope="module")
def planted_phi3(tmp_path_factory):
    """The planted model's outlier channels in a tiny Phi-3, whose transformers modules fuse q/k/v and gate/up:
    (export folder, text, profile)."""
    return planted_export(tmp_path_factory.mktemp("planted-phi3"), "phi3")


@pytest.fixture(params=["llama", "phi3"])
def planted(request):
    """(export folder, calibration text, profile) of a tiny model with planted outlier channels."""
    if request.param == "phi3":
        return request.getfixturevalue("planted_phi3")
    folder, text = request.getfixturevalue("planted_model")
    return folder, text, request.getfixturevalue("profile")


def test_graph_weights_are_the_float_constants_themselves(tiny_exports):
    """A float32 graph's linear weights and embedding table are read as views of its constants, not copies:
    the teacher's head and the replicas share the source weights (a copy of every layer would double them)."""
    import onnx_graphsurgeon as gs

    from accullm_export.graph.ir import constant_array

    _, folder = tiny_exports["llama"]
    graph, _ = load_graph(folder / "model.onnx")
    constants = [constant_array(tensor) for tensor in graph.tensors().values() if isinstance(tensor, gs.Constant)]
    weights = graph_weights(graph)
    linear = [name for name in weights if name.endswith("proj.weight")]
    assert linear and "lm_head.weight" in weights and "model.embed_tokens.weight" in weights
    for name in [*linear, "lm_head.weight", "model.embed_tokens.weight"]:
        assert any(np.shares_memory(weights[name], constant) for constant in constants), name


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_replica_equals_the_source_model(tiny_exports, model_type):
    """graph_weights reads every parameter back (transposes, tied embedding, biases, q/k norms), and Phi-3's fused
    qkv_proj and gate_up_proj run as the split layers the export writes."""
    hf, folder = tiny_exports[model_type]
    graph, _ = load_graph(folder / "model.onnx")
    replica = build_replica(folder, graph_weights(graph))
    ids = torch.from_numpy(token_ids())
    with torch.no_grad():
        expected = load_torch_model(hf)(ids).logits.numpy()
        np.testing.assert_allclose(replica(ids).logits.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_the_teacher_from_the_graphs_head_input_equals_the_replicas(tiny_exports, model_type):
    """The teacher made from the LM head's input as ONNX Runtime computes it (what GPTQ's statistics pass taps)
    gives the torch replica's final hidden states and logits. Gemma 2's soft cap stands between its head and the
    logits, where the head's row ranking finds no head: there the replica stays the teacher."""
    from accullm_export.build.quantize import _head_input_kept
    from accullm_export.graph.io import load_onnx
    from accullm_export.graph.linear import find_linear_layers
    from accullm_export.runtime.intermediates import IntermediateReader
    from tests.helpers.graphs import llm_feed

    _, folder = tiny_exports[model_type]
    header = load_onnx(folder / "model.onnx", load_external_data=False)
    kept = _head_input_kept(header, find_linear_layers(header),
                            make_recipe(gptq=True, distill_steps=1, distill_samples=2, gptq_samples=2))
    assert (kept == ()) == (model_type == "gemma2")
    head_input = kept[0] if kept else next(node.input[0] for node in header.graph.node
                                           if node.name == "/lm_head/MatMul")
    feed = llm_feed(folder, seed=3)
    hidden = IntermediateReader(folder).open([head_input]).run(feed)[head_input]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    ours = teacher_from_hidden(folder, hidden, weights["lm_head.weight"])
    replica = teacher_outputs(folder, weights, feed["input_ids"])
    np.testing.assert_allclose(ours.hidden.numpy(), replica.hidden.numpy(), rtol=1e-4, atol=1e-4)
    assert ours.softcap == replica.softcap
    np.testing.assert_allclose(ours.logits(ours.hidden).numpy(), replica.logits(replica.hidden).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_with_gptq_the_source_model_runs_once_for_teacher_and_head_ranking(planted_model, profile, tmp_path,
                                                                           monkeypatch):
    """GPTQ's statistics pass taps the LM head's input for distillation's teacher and the head's row ranking: no
    torch teacher and no pass of their own; without GPTQ the teacher is the replica's, as before."""
    import accullm_export.training.distill as distill
    from accullm_export.runtime import intermediates

    folder, _ = planted_model
    opened = []
    original_open = intermediates.IntermediateReader.open

    def counting_open(self, names, given=None):
        opened.append(list(names))
        return original_open(self, names, given)

    def no_torch_teacher(*args, **kwargs):
        raise AssertionError("the teacher was run again in torch")

    monkeypatch.setattr(intermediates.IntermediateReader, "open", counting_open)
    monkeypatch.setattr(distill, "teacher_outputs", no_torch_teacher)
    recipe = make_recipe(**W4, gptq=True, gptq_samples=4, distill_steps=2, distill_samples=4, refine_vocab=16,
                         vocab_samples=4)
    manifest = quantize_model(folder, tmp_path / "q", recipe, profile)
    assert any(note.startswith("distill_scales") for note in manifest["notes"])
    assert len(opened) == 1  # one statistics session: every Hessian and the head's input
    monkeypatch.setattr(distill, "teacher_outputs", teacher_outputs)
    opened.clear()
    quantize_model(folder, tmp_path / "plain", make_recipe(**W4, distill_steps=2, distill_samples=4), profile)
    assert opened == []


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_chunked_kl_is_the_kl_of_the_full_logits(tiny_exports, model_type):
    """The loss made from the teacher's stored outputs and the student's final hidden states a few tokens at a
    time (Gemma 2's soft cap included) is the KL of the two models' own logits, over windows and in training,
    where its gradient reaches the same parameters as autograd through the full logits does."""
    _, folder = tiny_exports[model_type]
    graph, _ = load_graph(folder / "model.onnx")
    teacher_model = build_replica(folder, graph_weights(graph))
    generator = torch.Generator().manual_seed(1)
    student = build_replica(folder, {name: value + 0.02 * torch.randn(value.shape, generator=generator).numpy()
                                     for name, value in graph_weights(graph).items()})
    trained = [parameter for name, parameter in student.named_parameters() if "norm" in name or "lm_head" in name]
    for parameter in trained:
        parameter.requires_grad_(True)
    ids = token_ids(seed=2).reshape(1, -1)
    windows = np.concatenate([ids, ids[:, ::-1], ids[:, ::2].repeat(2, axis=1)])
    teacher = teacher_outputs(folder, graph_weights(graph), windows)
    tokens = torch.from_numpy(windows)

    def full(batch):
        with torch.no_grad():
            target = torch.log_softmax(teacher_model(batch).logits, dim=-1)
        predicted = torch.log_softmax(student(batch).logits, dim=-1)
        return torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="none").sum(-1).mean()

    expected = full(tokens[[2, 0]])
    expected_gradients = torch.autograd.grad(expected, trained)
    loss = kl_step(teacher, student, tokens, [2, 0], chunk_tokens=3)
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5) and loss > 0
    for parameter, reference in zip(trained, expected_gradients):
        torch.testing.assert_close(parameter.grad, reference, rtol=1e-4, atol=1e-7)
    windows_kl = mean_kl(teacher, student, tokens, [1, 2], chunk_tokens=5)
    assert windows_kl == pytest.approx(np.mean([float(full(tokens[i:i + 1]).detach()) for i in (1, 2)]), rel=1e-5)


@pytest.mark.parametrize("rotated", [False, True])
def test_a_block_scaled_head_is_built_once_a_step_with_the_same_loss_and_gradients(tiny_exports, rotated):
    """kl_step makes a BlockScaledLinear head's float weight once for all its logit chunks and takes the chunks'
    gradients back to the scales in one pass: loss and gradients (scales, outlier rows, norm gains) are those of
    autograd through the head's own forward on the full logits."""
    from accullm_export.training.distill import _set_module

    _, folder = tiny_exports["llama"]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    teacher_model = build_replica(folder, weights)
    rng = np.random.default_rng(3)
    head = weights["lm_head.weight"].T  # [in, out]
    hidden_size, vocab = head.shape
    outliers = (1, 5)
    scales = (np.abs(head).reshape(-1, 8, vocab).max(axis=1) / 7 + 1e-3).astype(np.float32)
    values = np.clip(np.rint(head / np.repeat(scales, 8, axis=0)), -8, 7).astype(np.int8)
    rotation = np.linalg.qr(rng.standard_normal((hidden_size, hidden_size)))[0].astype(np.float32) if rotated else None
    if not rotated:
        values[list(outliers)] = 0
    layer = BlockScaled("lm_head", values, 3 * scales, block_size=8, outliers=outliers,  # far from the teacher
                        outlier_rows=head[list(outliers)].astype(np.float32), rotation=rotation)
    student = build_replica(folder, weights, copied=lambda name: "norm" in name)
    _set_module(student, "lm_head", block_scaled_linear_class()(layer, None, outlier_rows=True))
    trained = [parameter for name, parameter in student.named_parameters()
               if "norm" in name or name.startswith("lm_head.")]
    for parameter in trained:
        parameter.requires_grad_(True)
    ids = token_ids(seed=2).reshape(1, -1)
    windows = np.concatenate([ids, ids[:, ::-1]])
    teacher = teacher_outputs(folder, weights, windows)
    tokens = torch.from_numpy(windows)
    with torch.no_grad():
        target = torch.log_softmax(teacher_model(tokens).logits, dim=-1)
    predicted = torch.log_softmax(student(tokens).logits, dim=-1)
    expected = torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="none").sum(-1).mean()
    expected_gradients = torch.autograd.grad(expected, trained)
    assert {name for name, _ in student.named_parameters() if name.startswith("lm_head.")} == {
        "lm_head.theta", "lm_head.outlier_rows"}
    loss = kl_step(teacher, student, tokens, [0, 1], chunk_tokens=3)
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5) and loss > 0
    for parameter, reference in zip(trained, expected_gradients):
        assert float(reference.abs().max()) > 0
        torch.testing.assert_close(parameter.grad, reference, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        alone = [float(torch.nn.functional.kl_div(torch.log_softmax(student(tokens[i:i + 1]).logits, dim=-1),
                                                  target[i:i + 1], log_target=True, reduction="none").sum(-1).mean())
                 for i in (0, 1)]
    assert mean_kl(teacher, student, tokens, [0, 1], chunk_tokens=5) == pytest.approx(np.mean(alone), rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])  # gemma3: sliding and global layers
def test_recomputed_layers_give_the_same_loss_and_gradients_and_keep_less(tiny_exports, model_type):
    """With each decoder layer recomputed in the backward pass, a distillation step's loss and gradients are
    exactly those of the step that keeps the activations, and its forward keeps less for the backward pass
    (counted by autograd's saved-tensor hooks, each storage once)."""
    from accullm_export.training.distill import _decoder, recompute_layers

    _, folder = tiny_exports[model_type]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    ids = token_ids(seed=4).reshape(1, -1)
    windows = np.concatenate([ids, ids[:, ::-1]])
    teacher = teacher_outputs(folder, {name: value * 1.05 for name, value in weights.items()}, windows)
    tokens = torch.from_numpy(windows)
    results = []
    for recompute in (False, True):
        student = build_replica(folder, weights, copied=lambda name: "norm" in name)
        trained = [parameter.requires_grad_(True) for name, parameter in student.named_parameters() if "norm" in name]
        if recompute:
            recompute_layers(student)
        kept: dict[int, int] = {}

        def pack(tensor):
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _decoder(student)(tokens[:1], use_cache=False).last_hidden_state.sum()
        loss = kl_step(teacher, student, tokens, [0, 1])
        results.append((loss, [parameter.grad.clone() for parameter in trained], sum(kept.values())))
    (loss, gradients, kept_bytes), (again, recomputed_gradients, recomputed_bytes) = results
    assert loss == again and loss > 0 and len(gradients) > 2
    assert all(torch.equal(a, b) and float(a.abs().max()) > 0 for a, b in zip(gradients, recomputed_gradients))
    assert recomputed_bytes < kept_bytes / 2


def test_the_trained_student_is_freed_on_return_without_the_cycle_collector(tiny_exports, monkeypatch):
    """The recomputed layers' wrapped forwards hold their layers' own forwards weakly (no reference cycle), so
    the student's decoder layers, and the integers they share with the caller's layers, are freed as soon as
    distill_scales returns, not at the cycle collector's next run."""
    import gc
    import weakref

    from accullm_export.training import distill

    _, folder = tiny_exports["llama"]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    ids = token_ids(seed=3).reshape(1, -1)
    windows = np.concatenate([ids, ids[:, ::-1]])
    teacher = teacher_outputs(folder, weights, windows)
    built = []
    replica = distill.student_replica
    monkeypatch.setattr(distill, "student_replica",
                        lambda *args, **kwargs: built.append(replica(*args, **kwargs)) or built[-1])
    gc.collect()
    gc.disable()
    try:
        distill.distill_scales(folder, teacher, weights, rounded_layers(weights), windows,
                               DistillConfig(steps=2, recompute=True))
        student, _ = built.pop()
        layer = weakref.ref(distill._decoder(student).layers[0])
        del student
        assert layer() is None
    finally:
        gc.enable()


def test_layers_are_recomputed_when_a_step_s_activations_pass_the_budget():
    """The rule of DistillConfig(recompute=None): a 512-token window of a 24-layer decoder with 896 hidden and
    4,864 MLP channels keeps over the budget; a 30-layer one with 576 and 1,536 keeps under it."""
    from types import SimpleNamespace

    from accullm_export.training.distill import ACTIVATION_BUDGET_BYTES, activation_bytes

    wide = SimpleNamespace(hidden_size=896, intermediate_size=4864, num_hidden_layers=24)
    narrow = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    assert activation_bytes(wide, 512) > ACTIVATION_BUDGET_BYTES > activation_bytes(narrow, 512)
    assert activation_bytes(wide, 1024) == 2 * activation_bytes(wide, 512)


def test_student_replica_equals_the_quantized_graph(planted, tmp_path):
    """INT4 blocks, FP16 outlier rows and plain rounding, as ONNX Runtime runs them (on Phi-3, in the split layers
    that stand in for transformers' fused ones)."""
    folder, _, profile = planted
    quantize_model(folder, tmp_path / "q", make_recipe(**W4), profile, finishing=())
    graph, _ = load_graph(tmp_path / "q" / "model.onnx")
    layers, _, _ = block_scaled_layers(graph, [])
    assert layers and any(layer.outliers for layer in layers)
    student, modules = student_replica(folder, graph_weights(graph), layers)
    assert set(modules) == {layer.module for layer in layers}
    ids = token_ids(seed=4)
    with torch.no_grad():
        replica = student(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(replica, ort_logits_for_ids(tmp_path / "q", ids), rtol=1e-4, atol=1e-4)


def test_distillation_moves_only_scales_and_lowers_the_kl(planted, tmp_path):
    """The integers stay, the scales move in every layer (each one merged last into a parallel MatMul too: on
    Phi-3 these are the layers transformers fuses), the file keeps its size and the KL drops."""
    folder, text, profile = planted
    quantize_model(folder, tmp_path / "plain", make_recipe(**W4), profile)
    manifest = quantize_model(folder, tmp_path / "distilled",
                              make_recipe(**W4, distill_steps=40, distill_lr=2e-2, distill_samples=6), profile)
    note = next(note for note in manifest["notes"] if note.startswith("distill_scales"))
    assert "trained" in note and "left as they were" not in note and "float32 products" in note
    plain, distilled = stored_initializers(tmp_path / "plain"), stored_initializers(tmp_path / "distilled")
    assert plain.keys() == distilled.keys()
    scales = [name for name in plain if name.endswith("/weight_scale")]
    integers = [name for name in plain if name.endswith("/weight_quantized")]
    assert scales and integers
    for name in integers:
        np.testing.assert_array_equal(plain[name], distilled[name])
    assert all(distilled[name].dtype == np.float16 for name in scales)
    assert any(not np.array_equal(plain[name], distilled[name]) for name in scales)
    merged_scales = [name for name in plain if "/merged_with_" in name and "/outliers/" not in name
                     and plain[name].dtype == np.float16]
    assert merged_scales
    for name in merged_scales:  # each layer's columns of the merged scales, as the Split after the MatMul cuts them
        merged = name.rpartition("/")[0]
        sizes = next(plain[other] for other in plain if other.startswith(merged) and other.endswith("/Split/sizes"))
        bounds = np.cumsum(sizes)[:-1]
        for before, after in zip(np.split(plain[name], bounds, axis=1), np.split(distilled[name], bounds, axis=1)):
            assert not np.array_equal(before, after), name
    assert_same_size_and_lower_kl(folder, text, tmp_path / "distilled", tmp_path / "plain")
    recorded = json.loads((tmp_path / "distilled" / "manifest.json").read_text())["recipe"]
    assert recorded["distill"]["steps"] == 40


def test_a_weight_steps_budget_cuts_the_steps_or_skips_the_training(planted_model, profile, tmp_path):
    """distill.weight_steps: fewer steps where steps x trained weights would pass it (the note says of how many),
    none where fewer than eight would be left (the scales as they were, and the note says why)."""
    folder, _ = planted_model
    fields = dict(**W4, distill_steps=40, distill_lr=2e-2, distill_samples=6)
    quantize_model(folder, tmp_path / "plain", make_recipe(**W4), profile)
    skipped = quantize_model(folder, tmp_path / "skipped", make_recipe(**fields, distill_weight_steps=7),
                             profile)
    note = next(note for note in skipped["notes"] if note.startswith("distill_scales"))
    found = re.search(r"not trained: distill.weight_steps 7 allows 0 steps of ([\d,]+) trained weights, fewer "
                      r"than 8\)", note)
    assert found, note
    plain, untrained = stored_initializers(tmp_path / "plain"), stored_initializers(tmp_path / "skipped")
    for name in plain:
        np.testing.assert_array_equal(plain[name], untrained[name])
    weights = int(found.group(1).replace(",", ""))
    cut = quantize_model(folder, tmp_path / "cut", make_recipe(**fields, distill_weight_steps=12 * weights),
                         profile)
    note = next(note for note in cut["notes"] if note.startswith("distill_scales"))
    assert f"12 steps (of 40: distill.weight_steps over {weights:,} trained weights)" in note, note
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["recipe"]["distill"]["weight_steps"] == \
        12 * weights


def test_steps_for_a_budget():
    assert DistillConfig(steps=120).steps_for(10**9) == 120
    assert DistillConfig(steps=120, weight_steps=1200).steps_for(10) == 120
    assert DistillConfig(steps=120, weight_steps=1200).steps_for(40) == 30
    assert DistillConfig(steps=120, weight_steps=1200).steps_for(150) == 8
    assert DistillConfig(steps=120, weight_steps=1200).steps_for(151) == 0


def test_outlier_rows_train_with_the_scales(planted_model, profile, tmp_path):
    """distill.outlier_rows: the FP16 branch's weight rows move too (stored in FP16, same size), the integers do
    not, and the pass kept them for a lower held-out KL (on this tiny model's 60-token text the gain is within
    noise, so ONNX Runtime's KL is not compared here; the replica-equals-graph test covers the rows' numerics)."""
    # the rows' step is a tenth of the scales': 5e-3 moves the tiny model's ~0.02 weights by a few percent per step
    note, plain, rows = plain_and_trained(planted_model, profile, tmp_path, learning_rate=5e-3,
                                           distill_outlier_rows=True)
    assert "trained" in note and "outlier rows" in note
    branches = [name for name in plain if "/outliers/" in name and plain[name].dtype == np.float16]
    assert branches and all(rows[name].dtype == np.float16 for name in branches)
    assert any(not np.array_equal(plain[name], rows[name]) for name in branches)
    for name in (name for name in plain if plain[name].dtype.name == "int4"):
        np.testing.assert_array_equal(plain[name], rows[name])
    before, after = map(float, re.search(r"held-out ones ([\d.]+) -> ([\d.]+)", note).groups())
    assert after < before
    assert (tmp_path / "plain" / "model.onnx.data").stat().st_size == \
        (tmp_path / "trained" / "model.onnx.data").stat().st_size


def test_trainable_outlier_rows_leave_the_low_bit_rows_alone():
    """The trainable FP16 part is the outlier rows alone ([outliers, out]): they get x's outlier channels as
    gradient, and the low-bit rows' weights are the integers times the scales."""
    values = np.array([[1, -2], [0, 0], [3, 4]], dtype=np.int8)
    layer = BlockScaled("m", values, np.ones((1, 2), dtype=np.float32), block_size=4, outliers=(1,),
                        outlier_rows=np.array([[0.5, -0.25]], dtype=np.float32))
    linear = block_scaled_linear_class()(layer, None, outlier_rows=True)
    assert tuple(linear.outlier_rows.shape) == (1, 2) and linear.values.dtype == torch.int8
    linear.outlier_rows.requires_grad_(True)
    out = linear(torch.tensor([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(out.detach().numpy(), [[1 + 1.0 + 9, -2 - 0.5 + 12]])
    out.sum().backward()
    np.testing.assert_array_equal(linear.outlier_rows.grad.numpy(), [[2.0, 2.0]])


@pytest.mark.parametrize("rotated", [False, True])
def test_block_scaled_linear_equals_the_dense_weight(rotated):
    """The forward against an independent NumPy product: integers times block scales, the outlier rows on their
    own (read from x, not x @ R, when the integers read a rotated input), and no branch without outliers."""
    rng = np.random.default_rng(5)
    values = rng.integers(-8, 8, size=(8, 3)).astype(np.int8)
    scales = rng.uniform(0.5, 2.0, size=(2, 3)).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((8, 8)))[0].astype(np.float32) if rotated else None
    x = rng.standard_normal((2, 8)).astype(np.float32)
    for outliers in ((), (2, 6)):
        layer_values = values.copy()
        if outliers and not rotated:
            layer_values[list(outliers)] = 0
        rows = rng.standard_normal((len(outliers), 3)).astype(np.float32) if outliers else None
        layer = BlockScaled("m", layer_values, scales, block_size=4, outliers=outliers, outlier_rows=rows,
                            rotation=rotation)
        out = block_scaled_linear_class()(layer, None, outlier_rows=True)(torch.from_numpy(x)).detach().numpy()
        low_bit = layer_values.astype(np.float64) * np.repeat(scales, 4, axis=0)
        expected = (x @ rotation if rotated else x).astype(np.float64) @ low_bit
        if outliers:
            expected += x[:, list(outliers)].astype(np.float64) @ rows
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields, message", [
    (dict(name="w8a8", distill_steps=5), "distill.steps: trains weight-only INT4"),
    (dict(name="w4a16", distill_steps=-1), r"distill.steps: must be 0 \(off\) or positive"),
    (dict(name="w4a16", distill_norms=True), "distill.norms: trains along with the scales: give distill.steps"),
    (dict(name="w4a16", distill_outlier_rows=True), "distill.outlier_rows: trains along with the scales: give "
     "distill.steps"),
    (dict(name="w4a16", distill_steps=5, distill_outlier_rows=True, outliers=0), "outliers.channels = 0"),
    (dict(name="w4a16", distill_steps=5, distill_precision="float16"),
     "distill.precision: must be one of auto, float32, bfloat16, not 'float16'"),
    (dict(name="w4a16", distill_steps=5, distill_weight_steps=-1),
     r"distill.weight_steps: must be 0 \(no limit\) or positive, not -1"),
])
def test_bad_distillation_settings_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        make_recipe(**fields)


def test_bad_distill_config_and_names_are_refused():
    with pytest.raises(UserError, match="positive"):
        DistillConfig(steps=1, learning_rate=0)
    with pytest.raises(UserError, match="precision must be one of auto, float32, bfloat16, not 'half'"):
        DistillConfig(steps=1, precision="half")
    with pytest.raises(UserError, match=r"weight_steps must be 0 \(no limit\) or positive, not -5"):
        DistillConfig(steps=1, weight_steps=-5)
    with pytest.raises(UserError, match="not named like an exported linear layer"):
        module_of("/model/layers.0/mlp/Add")
    assert module_of("/model/layers.3/mlp/down_proj/MatMul") == "model.layers.3.mlp.down_proj"


def test_replica_needs_every_parameter(tiny_exports):
    _, folder = tiny_exports["llama"]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    weights.pop("model.norm.weight")
    with pytest.raises(UserError, match="no weight for model.norm.weight"):
        build_replica(folder, weights)


def test_split_layers_must_fill_the_fused_module(tiny_exports):
    """Phi-3's qkv_proj is read from the graph's q/k/v layers: one missing or of another width is refused."""
    _, folder = tiny_exports["phi3"]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    with pytest.raises(UserError, match="no weight for model.layers.1.self_attn.k_proj.weight"):
        build_replica(folder, {name: value for name, value in weights.items()
                               if name != "model.layers.1.self_attn.k_proj.weight"})
    narrowed = {**weights, "model.layers.0.mlp.up_proj.weight": weights["model.layers.0.mlp.up_proj.weight"][1:]}
    with pytest.raises(UserError, match="model.layers.0.mlp.gate_up_proj: the graph's gate_proj, up_proj hold"):
        build_replica(folder, narrowed)


@pytest.mark.parametrize("block,blocks", [(4, 2), (3, 3)])  # whole blocks; a short last block
@pytest.mark.parametrize("columns", [8192, 2])  # the scales' gradient in one part; in parts of 2 of the 5 columns
@pytest.mark.parametrize("built", [False, True])  # the float weight rebuilt; given, as the LM head's once a step
def test_the_scaled_integer_product_rebuilds_the_weight_with_exact_gradients(block, blocks, columns, built,
                                                                              monkeypatch):
    """The product's own backward (it keeps the integers, not the float weight, unless the weight is given) against
    finite differences and against autograd through the plain formula (each row's scale picked by index)."""
    import accullm_export.training.distill as distill

    monkeypatch.setattr(distill, "GRADIENT_COLUMNS", columns)
    product = distill._scaled_integer_product(torch)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    values = torch.randint(-8, 8, (8, 5), dtype=torch.int8, generator=generator)
    scales = (torch.rand(blocks, 5, dtype=torch.float64, generator=generator) + 0.5).requires_grad_(True)
    rows = torch.arange(8) // block

    def run(x, scales):
        weight = (values * scales[rows]).detach() if built else None
        return product(x, values, scales, block, weight)

    assert torch.autograd.gradcheck(run, (x, scales))
    weights = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator)
    ours = torch.autograd.grad((run(x, scales) * weights).sum(), (x, scales))
    plain = torch.autograd.grad(((x @ (values * scales[rows])) * weights).sum(), (x, scales))
    for mine, reference in zip(ours, plain):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block,blocks", [(4, 2), (3, 3)])  # whole blocks; a short last block
@pytest.mark.parametrize("built", [False, True])
def test_the_scaled_integer_product_in_bfloat16_is_the_float32_product_to_bfloat16_precision(block, blocks, built):
    """With dtype bfloat16 the forward product multiplies in bfloat16, with grad_dtype bfloat16 the backward's
    two (so they differ from float32's, each alone); all return float32 values and gradients within bfloat16's
    rounding of the float32 ones. A weight given in the backward's dtype is the one the backward uses."""
    import accullm_export.training.distill as distill

    product = distill._scaled_integer_product(torch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, generator=generator, requires_grad=True)
    values = torch.randint(-8, 8, (8, 40), dtype=torch.int8, generator=generator)
    scales = (torch.rand(blocks, 40, generator=generator) + 0.5).requires_grad_(True)
    rows = torch.arange(8) // block
    weights = torch.randn(2, 16, 40, generator=generator)
    low = torch.bfloat16
    results = {}
    for dtypes in [(None, None), (low, low), (None, low), (low, None)]:
        weight = (values * scales[rows]).detach() if built else None
        grad_weight = None if weight is None or dtypes[1] is None else weight.to(low)
        out = product(x, values, scales, block, weight, *dtypes, grad_weight)
        results[dtypes] = (out, *torch.autograd.grad((out * weights).sum(), (x, scales)))
    exact = results[None, None]
    for dtypes, result in results.items():
        for which, (value, reference) in enumerate(zip(result, exact)):
            rounded = dtypes[0] is not None if which == 0 else dtypes[1] is not None
            assert value.dtype == torch.float32 and torch.equal(value, reference) is not rounded
            torch.testing.assert_close(value, reference, rtol=0, atol=2e-2 * float(reference.detach().abs().max()))


def test_bfloat16_products_hold_only_in_the_training_steps(tiny_exports):
    """products_in sets the layers' products to bfloat16 for the block and back, never the LM head's forward:
    a step's loss and gradients stay within bfloat16's rounding of float32's."""
    from accullm_export.training.distill import products_in

    _, folder = tiny_exports["llama"]
    graph, _ = load_graph(folder / "model.onnx")
    weights = graph_weights(graph)
    layers = rounded_layers(weights)
    ids = token_ids(seed=2).reshape(1, -1)
    tokens = torch.from_numpy(ids)
    teacher = teacher_outputs(folder, weights, ids)
    results = []
    for precision in ("float32", "bfloat16"):
        student, modules = student_replica(folder, weights, layers)
        thetas = [module.theta.requires_grad_(True) for module in modules.values()]
        with products_in(student, modules, precision):
            expected = torch.bfloat16 if precision == "bfloat16" else None
            assert all(module.dtype is (None if module is student.lm_head else expected)
                       and module.grad_dtype is expected for module in modules.values())
            loss = kl_step(teacher, student, tokens, [0])
        assert all(module.dtype is None and module.grad_dtype is None for module in modules.values())
        results.append((loss, torch.cat([theta.grad.flatten() for theta in thetas])))
    (loss, gradient), (low_loss, low_gradient) = results
    assert loss > 0 and low_loss != loss and low_loss == pytest.approx(loss, rel=2e-2)
    assert float(torch.nn.functional.cosine_similarity(gradient, low_gradient, dim=0)) > 0.99


def test_auto_precision_is_bfloat16_only_where_the_device_multiplies_it_natively(monkeypatch):
    from accullm_export.training import distill

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert distill.resolved_precision("auto", cpu) == expected
        assert distill.resolved_precision("float32", cpu) == "float32"
        assert distill.resolved_precision("bfloat16", cpu) == "bfloat16"
    layer = block_scaled_linear_class()(BlockScaled("m", np.ones((8, 4), np.int8), np.ones((1, 4), np.float32), 8),
                                        None)
    student = torch.nn.Module()
    student.lm_head = torch.nn.Identity()
    with distill.products_in(student, {"m": layer}, "auto"):
        assert layer.dtype is torch.bfloat16  # the last case above: AMX
    assert layer.dtype is None
