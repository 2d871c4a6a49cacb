"""build --golden: the golden folder's layout and manifest, golden output equal to the verifier's own, the w8
verifier against a NumPy emulation of its two INT4 planes, its bytes shared with the draft, ONNX Runtime's
fusion, refusals of tampered or swapped pairs, and no half-written golden folder, on tiny models built in code."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from accullm_export.build import golden
from accullm_export.cli.main import main
from accullm_export.errors import UserError
from accullm_export.hashing import sha256_file
from accullm_export.recipes.presets import get_preset
from accullm_export.recipes.toml_io import dump_toml
from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate
from accullm_export.runtime.speculative import first_divergence, speculative_generate
from tests.helpers.cli import assert_user_error, run_cli
from tests.helpers.graphs import fused_at_level_1, llm_feed, ort_logits
from tests.helpers.models import TEXT, make_tiny_checkpoint

# the tiny Llama's calibration and validation, kept small; the cpu preset in full with a short distillation
SMALL = ["--calib-samples", "4", "--calib-seq-len", "40", "--validation-windows", "2", "--validation-seq-len", "32",
         "--max-kl", "5"]
PROMPTS = ("The river ran", "Seven candles burned in", "In the garden, a rabbit")


def _config(path: Path, backend: str, preset: str = "w4a16", steps: int = 5) -> str:
    data = get_preset(preset).resolve(backend).to_dict()
    if data["distill"]["steps"]:
        data["distill"]["steps"] = steps
    path.write_text(dump_toml(data))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Llama (varied text at this initializer range) as a checkpoint and as an export, its calibration
    text, and the cpu target's preset as a config with a short distillation."""
    from accullm_export.models.export import export_model

    root = tmp_path_factory.mktemp("golden-inputs")
    checkpoint = make_tiny_checkpoint(root / "hf", "llama", seed=3, initializer_range=0.2)
    export_model(str(checkpoint), root / "onnx")
    (root / "text.txt").write_text(TEXT)
    return {"hf": checkpoint, "onnx": root / "onnx", "text": root / "text.txt",
            "config": _config(root / "cpu.toml", "onnxruntime")}


def build_args(inputs, model, out, *extra):
    return ["build", str(model), "--target", "cpu", "-o", str(out), "--calib", str(inputs["text"]), *SMALL,
            "--config", inputs["config"], *extra]


@pytest.fixture(scope="module")
def builds(inputs, tmp_path_factory):
    """kind -> build folder: --golden from the export (reference verifier), --golden --verifier w8 from the
    checkpoint (exported by the build)."""
    root = tmp_path_factory.mktemp("golden-builds")
    made = {}
    for kind, model, extra in (("reference", inputs["onnx"], []), ("w8", inputs["hf"], ["--verifier", "w8"])):
        assert main(build_args(inputs, model, root / kind, "--golden", *extra)) == 0
        made[kind] = root / kind
    return made


def reference_folder(builds, kind) -> Path:
    manifest = json.loads((builds[kind] / "manifest.json").read_text())
    return Path(manifest["model"]) if kind == "reference" else builds[kind] / "work/export"


# ------------------------------------------------------------------------------------------ layout and manifest
@pytest.mark.parametrize("kind", ["reference", "w8"])
def test_the_golden_folder_and_its_manifest(builds, kind):
    from accullm_export.calibration.profile import model_fingerprint

    out = builds[kind]
    root = out / "golden"
    manifest = json.loads((root / "golden.json").read_text())
    build_manifest = json.loads((out / "manifest.json").read_text())
    assert build_manifest["status"] == "ok" and build_manifest["options"]["golden"] == kind
    assert [step["name"] for step in build_manifest["steps"]][-2:] == ["target", "golden"]
    assert build_manifest["golden"]["path"] == "golden" and build_manifest["golden"]["verifier"] == kind
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "golden.json"} <= {p.name for p in root.iterdir()}
    # the draft is the deliverable the build validated, file for file
    deliverable = out / build_manifest["deliverable"]["path"]
    assert sorted(p.name for p in (root / "draft").iterdir()) == sorted(p.name for p in deliverable.iterdir())
    for path in deliverable.iterdir():
        assert sha256_file(root / "draft" / path.name) == sha256_file(path), path.name
    assert manifest["kind"] == "accullm-export/golden" and manifest["verifier"]["kind"] == kind
    assert manifest["draft"]["model"] == "draft/model.onnx" and manifest["draft"]["recipe"] == "w4a16"
    assert manifest["verifier"]["model"] == "model.onnx" and manifest["verifier"]["dtype"] == "fp32"
    assert manifest["source"]["sha256"] == model_fingerprint(reference_folder(builds, kind))
    assert manifest["tokenizer_sha256"] == sha256_file(root / "tokenizer.json")
    shared = {"draft/model.onnx.data"} if kind == "w8" else set()
    assert set(manifest["draft"]["files"]) == {"draft/model.onnx", "draft/model.onnx.data", "draft/tokenizer.json"}
    assert set(manifest["verifier"]["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"} | shared
    for role in ("draft", "verifier"):
        for relative, digest in manifest[role]["files"].items():
            assert sha256_file(root / relative) == digest, relative
    validation = manifest["verifier"]["validation"]
    total = sum((root / name).stat().st_size for name in manifest["size"]["model_bytes"])
    assert manifest["size"]["bits_per_weight"]["folder_per_parameter"] == pytest.approx(
        8 * total / manifest["size"]["parameters"], rel=1e-4)
    if kind == "reference":  # the reference's own files; the verifier's data is not the draft's
        assert validation["kl_mean"] == 0.0 and validation["top1_agreement"] == 1.0
        assert sha256_file(root / "model.onnx.data") == sha256_file(reference_folder(builds, kind) /
                                                                      "model.onnx.data")
    else:  # measured against the reference: far closer than the draft
        draft_kl = build_manifest["accuracy"]["metrics"]["kl_mean"]
        assert 0 < validation["kl_mean"] < draft_kl / 3 and validation["top1_agreement"] > 0


# ------------------------------------------------------------------------------------------ golden output
@pytest.mark.parametrize("kind", ["reference", "w8"])
def test_golden_output_is_the_verifiers_own(builds, kind, capsys):
    """Token for token the verifier's own greedy output, through the command line and the API. The verifier
    loads ``exact`` (its MatMulNBits on float32 activations), so a k-token pass computes each token as a one-token
    pass does (with ONNX Runtime's default 8-bit activations a w8 verifier's golden output parts from its own)."""
    root = builds[kind] / "golden"
    for prompt in PROMPTS:
        code, plain, _ = run_cli(capsys, "generate", str(root), prompt, "--max-new-tokens", "40", "--device", "cpu")
        assert code == 0
        code, text, err = run_cli(capsys, "generate", str(root), prompt, "--max-new-tokens", "40", "--device", "cpu",
                                  "--golden")
        assert code == 0 and "acceptance" in err and text == plain
    verifier = OrtCausalLM.from_path(root, device="cpu", exact=True)
    draft = OrtCausalLM.from_path(root / "draft", device="cpu")
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 256, size=2 + 5 * index).tolist() for index in range(8)]
    config = GenerationConfig(max_new_tokens=48)
    accepted = 0
    for prompt in prompts:
        expected = generate(verifier, [prompt], config).tokens[0]
        for draft_tokens in (2, None):
            result = speculative_generate(draft, verifier, prompt, config, draft_tokens=draft_tokens)
            accepted += result.accepted
            assert result.tokens == expected, (prompt, draft_tokens,
                                               first_divergence(draft, verifier, prompt, result.tokens, expected))
        if kind == "reference":  # the verifier is the reference: golden output is the reference's own
            source = OrtCausalLM.from_path(reference_folder(builds, kind), device="cpu")
            assert generate(source, [prompt], config).tokens[0] == expected
    assert accepted > 0


def test_a_gpu_target_pairs_its_bundle_with_an_fp16_reference(inputs, tmp_path, capsys):
    """orin without TensorRT: the draft is the bundle's ONNX model, the verifier the checkpoint exported in fp16."""
    out = tmp_path / "orin"
    config = _config(tmp_path / "orin.toml", "tensorrt", "w4a16-fast")
    code = main(["build", str(inputs["hf"]), "--target", "orin", "-o", str(out), "--calib", str(inputs["text"]),
                 *SMALL, "--config", config, "--golden"])
    assert code == 0, capsys.readouterr().err
    root = out / "golden"
    manifest = json.loads((root / "golden.json").read_text())
    assert manifest["verifier"]["dtype"] == "fp16" and manifest["draft"]["recipe"] == "w4a16-fast"
    assert json.loads((root / "manifest.json").read_text())["dtype"] == "fp16"
    assert sha256_file(root / "draft/model.onnx") == sha256_file(out / "bundle/model/model.onnx")
    assert 0 < manifest["verifier"]["validation"]["kl_mean"] < 1e-3  # fp16 against the fp32 reference
    capsys.readouterr()
    code, plain, _ = run_cli(capsys, "generate", str(root), PROMPTS[0], "--max-new-tokens", "32", "--device", "cpu")
    code_golden, text, _ = run_cli(capsys, "generate", str(root), PROMPTS[0], "--max-new-tokens", "32", "--device",
                                   "cpu", "--golden")
    assert code == code_golden == 0 and text == plain


# ------------------------------------------------------------------------------------------ the w8 verifier
class Constants:
    """A model's constant tensors, evaluated in NumPy: initializers, and the DequantizeLinear, Cast, Mul, Add
    and Exp nodes computed from them (blocked INT4 with zero points, 8-bit scale codes, FP16 scales)."""

    def __init__(self, path: Path):
        self.model = onnx.load(str(path))
        self.values = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        self.producers = {output: node for node in self.model.graph.node for output in node.output}

    def __call__(self, name: str) -> np.ndarray:
        if name in self.values:
            return self.values[name]
        node = self.producers[name]
        inputs = [self(tensor) for tensor in node.input if tensor]
        if node.op_type == "Cast":
            return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(node.attribute[0].i))
        if node.op_type in ("Mul", "Add"):
            return (inputs[0] * inputs[1] if node.op_type == "Mul" else inputs[0] + inputs[1]).astype(np.float32)
        if node.op_type == "Exp":
            return np.exp(inputs[0]).astype(np.float32)
        assert node.op_type == "DequantizeLinear", node.op_type
        block = next(a.i for a in node.attribute if a.name == "block_size")
        integers = inputs[0].astype(np.int32)
        zero_points = inputs[2].astype(np.int32) if len(inputs) > 2 else np.zeros_like(inputs[1], dtype=np.int32)
        rows = np.arange(integers.shape[0]) // block
        return ((integers - zero_points[rows]) * inputs[1].astype(np.float32)[rows]).astype(np.float32)

    def node(self, tensor: str) -> onnx.NodeProto:
        return self.producers[tensor]


def draft_weight(draft: Constants, output: str, source: str) -> np.ndarray:
    """The draft's [in, out] weight from ``source`` to ``output``: its INT4 plane read through outlier planes (a
    Concat of the input and two copies of its outlier channels) or an input rotation, plus the refined
    vocabulary rows scattered onto the head's columns."""
    node, refined = draft.node(output), None
    if node.op_type == "ScatterElements":
        refined = (draft(draft.node(node.input[1]).input[0]).reshape(-1), draft.node(node.input[2]))
        node = draft.node(node.input[0])
    plane = draft(node.input[1])
    reads = draft.node(node.input[0]) if node.input[0] != source else None
    mixing = np.eye(plane.shape[0], dtype=np.float32)  # x -> what the layer reads, for a rotation
    if reads is not None and reads.op_type == "Concat":
        channels = draft(draft.node(reads.input[1]).input[1])
        hidden, count = plane.shape[0] - 2 * len(channels), len(channels)
        weight = plane[:hidden].copy()
        weight[channels] += plane[hidden:hidden + count] + plane[hidden + count:]
    else:
        if reads is not None:  # Mul(x, signs) -> blocks -> MatMul(H) -> back: x R, R = diag(signs) (I (x) H)
            matmul = draft.node(reads.input[0])
            multiply = draft.node(draft.node(matmul.input[0]).input[0])
            signs, hadamard = draft(multiply.input[1]), draft(matmul.input[1])
            mixing = np.kron(np.eye(len(signs) // len(hadamard)), hadamard) * signs[:, None]
        weight = mixing @ plane
    if refined is not None:
        columns, matmul = refined
        weight[:, columns] += mixing @ draft(matmul.input[1])
    return weight


def source_layers(draft_layer: str) -> list[str]:
    """The source layers whose columns a draft MatMul computes (q/k/v and gate/up are merged)."""
    first = draft_layer.split("/merged_with_")[0]
    if draft_layer.endswith("/merged_with_2"):
        return [first.replace("q_proj", part) for part in ("q_proj", "k_proj", "v_proj")]
    if draft_layer.endswith("/merged_with_1"):
        return [first, first.replace("gate_proj", "up_proj")]
    return [first]


def test_w8_weights_equal_a_numpy_emulation(builds):
    root = builds["w8"] / "golden"
    draft, verifier = Constants(root / "draft/model.onnx"), Constants(root / "model.onnx")
    reference = Constants(reference_folder(builds, "w8") / "model.onnx")
    reference_weights = {node.name: reference(node.input[1]) for node in reference.model.graph.node
                         if node.op_type == "MatMul" and node.input[1] in reference.values}
    residual_matmuls = [node for node in verifier.model.graph.node if node.name.endswith("/residual_plane/MatMul")]
    manifest = json.loads((builds["w8"] / "model/manifest.json").read_text())
    assert len(residual_matmuls) == 9  # per layer: q/k/v merged, o, gate/up merged, down; and the head
    covered = []
    for node in residual_matmuls:
        output = node.name.removesuffix("/residual_plane/MatMul")
        source = node.input[0]
        producer = draft.node(output)
        if producer.op_type == "ScatterElements":
            producer = draft.node(producer.input[0])
        layers = source_layers(producer.name)
        covered += layers
        target = np.concatenate([reference_weights[layer] for layer in layers], axis=1)
        effective = draft_weight(draft, output, source)
        residual = target - effective
        # the residual plane: symmetric INT4 in the draft's blocks of 64 rows, FP16 scales absmax / 7
        blocks = residual.reshape(-1, 64, residual.shape[1])
        scales = (np.abs(blocks).max(axis=1) / 7).astype(np.float16).astype(np.float32)
        scales[scales == 0] = 1.0
        integers = np.clip(np.rint(blocks / scales[:, None]), -8, 7).reshape(residual.shape)
        dequantize = verifier.node(node.input[1])
        stored = verifier(dequantize.input[0]).astype(np.int32)
        assert verifier.values[dequantize.input[0]].dtype == ml_dtypes.int4
        # ONNX Runtime decodes the draft's scale codes (Exp) on its own; an ulp there may move a scale by one FP16
        # step or an integer by one, rarely
        np.testing.assert_allclose(verifier(dequantize.input[1]), scales, rtol=1e-3)
        assert np.mean(stored != integers) < 1e-3 and np.abs(stored - integers).max() <= 1, output
        total = effective + verifier(node.input[1])
        error = np.linalg.norm(total - target) / np.linalg.norm(target)
        assert error < np.linalg.norm(residual) / np.linalg.norm(target) / 4, output
    assert sorted(covered) == sorted(layer["node"] for layer in manifest["layers"] if layer["precision"] == "int4")


def test_w8_stores_the_shared_bytes_once(builds):
    root = builds["w8"] / "golden"
    manifest = json.loads((root / "golden.json").read_text())
    verifier = onnx.load(str(root / "model.onnx"), load_external_data=False)
    draft = onnx.load(str(root / "draft/model.onnx"), load_external_data=False)
    locations = {t.name: {e.key: e.value for e in t.external_data} for t in verifier.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL}
    drafted = {t.name: {e.key: e.value for e in t.external_data} for t in draft.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}
    shared = {name for name, entry in locations.items() if entry["location"] == "draft/model.onnx.data"}
    assert shared == set(drafted)  # every INT4 plane, the INT8 embeddings, the rotary tables
    for name in shared:
        assert (locations[name]["offset"], locations[name]["length"]) == (drafted[name]["offset"],
                                                                          drafted[name]["length"])
    own = [int(entry["length"]) for entry in locations.values() if entry["location"] == "model.onnx.data"]
    assert (root / "model.onnx.data").stat().st_size == sum(own) <= manifest["verifier"]["residual_bytes"]
    assert manifest["verifier"]["shared_bytes"] == (root / "draft/model.onnx.data").stat().st_size
    # bits per linear weight: the draft's, plus 4 bits and an FP16 scale per 64 rows
    draft_size = json.loads((root / "draft/manifest.json").read_text())["size"]
    residual_bits = 8 * manifest["verifier"]["residual_bytes"] / draft_size["linear_weights"]
    assert residual_bits == pytest.approx(4 + 16 / 64, rel=0.02)
    assert manifest["size"]["bits_per_weight"]["linear"] == pytest.approx(
        draft_size["linear_bits_per_weight"] + residual_bits, abs=1e-3)


def test_w8_fuses_into_two_matmulnbits_per_layer(builds, tmp_path):
    root = builds["w8"] / "golden"
    counts = {}
    for name, path in (("draft", root / "draft/model.onnx"), ("verifier", root / "model.onnx")):
        (tmp_path / name).mkdir()
        session, nodes = fused_at_level_1(path, tmp_path / name)
        counts[name] = Counter(node.op_type for node in nodes)
        assert not counts[name]["DequantizeLinear"], name
        feed = llm_feed(root)  # the fused graph computes what the unfused one does
        np.testing.assert_allclose(session.run(["logits"], feed)[0], ort_logits(path, feed), rtol=1e-4, atol=1e-4)
    assert counts["verifier"]["MatMulNBits"] == counts["draft"]["MatMulNBits"] + 9


def test_w8_puts_back_gains_a_pass_trained(builds, tmp_path):
    """A draft whose norm gain was trained (here: scaled by 1.25) gets the source's gain in the verifier, which
    then stays close to the reference while the draft does not."""
    source = builds["w8"] / "golden/draft"
    root = tmp_path / "golden"
    root.mkdir()
    shutil.copytree(source, root / "draft")
    model = onnx.load(str(root / "draft/model.onnx"), load_external_data=False)
    gain = next(t for t in model.graph.initializer if t.name == "model.layers.1.input_layernorm.weight")
    gain.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gain) * np.float32(1.25), gain.name))
    onnx.save(model, str(root / "draft/model.onnx"))
    reference = reference_folder(builds, "w8")
    summary = golden.write_w8_verifier(reference, root / "draft/model.onnx", root)
    assert any("model.layers.1.input_layernorm.weight" in note for note in summary["notes"])
    restored = next(t for t in onnx.load(str(root / "model.onnx")).graph.initializer if t.name == gain.name)
    expected = next(t for t in onnx.load(str(reference / "model.onnx")).graph.initializer if t.name == gain.name)
    np.testing.assert_array_equal(numpy_helper.to_array(restored), numpy_helper.to_array(expected))
    feed = llm_feed(reference)
    logits = ort_logits(reference / "model.onnx", feed)
    verifier_error = np.abs(ort_logits(root / "model.onnx", feed) - logits).max()
    draft_error = np.abs(ort_logits(root / "draft/model.onnx", feed) - logits).max()
    assert verifier_error < draft_error / 3


# ------------------------------------------------------------------------------------------ refusals and failures
def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("edit", ["draft data", "verifier data", "verifier model", "tokenizer"])
def test_a_tampered_golden_folder_is_refused(builds, tmp_path, capsys, edit):
    root = tmp_path / "golden"
    shutil.copytree(builds["w8"] / "golden", root)
    if edit == "draft data":
        _flip_byte(root / "draft/model.onnx.data")
    elif edit == "verifier data":
        _flip_byte(root / "model.onnx.data")
    elif edit == "verifier model":  # the draft's graph in the verifier's place
        shutil.copy2(root / "draft/model.onnx", root / "model.onnx")
    else:
        (root / "tokenizer.json").write_text((root / "tokenizer.json").read_text() + " ")
    code, out, err = run_cli(capsys, "generate", str(root), "hi", "--golden", "--device", "cpu")
    assert_user_error(code, err, "does not match")
    assert out == ""


def test_a_swapped_pair_and_a_folder_without_golden_json_are_refused(builds, tmp_path, capsys):
    root = builds["w8"] / "golden"
    code, _, err = run_cli(capsys, "generate", str(root / "draft"), "hi", "--golden", str(root), "--device", "cpu")
    assert_user_error(code, err, "may be swapped")
    code, _, err = run_cli(capsys, "generate", str(root), "hi", "--golden", str(builds["reference"] / "golden/draft"),
                           "--device", "cpu")
    assert_user_error(code, err, "is not the draft")
    code, _, err = run_cli(capsys, "generate", str(builds["w8"] / "model"), "hi", "--golden", "--device", "cpu")
    assert_user_error(code, err, "has no golden.json")
    copied = tmp_path / "golden"
    shutil.copytree(root, copied)
    (copied / "golden.json").write_text(json.dumps({"kind": "something else"}))
    code, _, err = run_cli(capsys, "generate", str(copied), "hi", "--golden", "--device", "cpu")
    assert_user_error(code, err, "is not a golden manifest")


@pytest.mark.parametrize("args, message", [
    (["--verifier", "w8"], "--verifier needs --golden"),
    (["--golden", "--verifier", "w8", "--target", "orin"], "target orin runs tensorrt"),
    (["--golden", "--verifier", "w8", "--preset", "fp16"], "its layers are not INT4"),
    (["--golden", "--target", "orin"], "is an fp32 ONNX model"),
], ids=["verifier-alone", "w8-tensorrt", "w8-fp16", "gpu-fp32-onnx"])
def test_golden_requests_that_cannot_be_met_are_refused_before_any_work(inputs, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = ["build", str(inputs["onnx"]), "-o", str(out), *args]
    if "--target" not in args:
        argv += ["--target", "cpu"]
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, message)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_failing_golden_step_leaves_no_golden_folder(inputs, tmp_path, monkeypatch, capsys):
    """A UserError in the golden step: the validated build stands, without a golden folder, and exits 2; a bug
    leaves nothing at all."""
    def refuse(*args, **kwargs):
        raise UserError("planted failure")

    monkeypatch.setattr(golden, "residual_plans", refuse)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *build_args(inputs, inputs["onnx"], out, "--golden", "--verifier", "w8"))
    assert_user_error(code, err, "planted failure")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed-golden-step" and manifest["golden"] is None
    assert "planted failure" in manifest["error"] and (out / "model/model.onnx").is_file()
    assert not (out / "golden").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(golden, "residual_plans", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        main(build_args(inputs, inputs["onnx"], tmp_path / "crashed", "--golden", "--verifier", "w8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
