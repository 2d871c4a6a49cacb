"""The yardstick: what users would pick instead of accullm-export, each validated against our fp32 export.

For one model (``--model``: the sample, SmolLM2-135M-Instruct, or the second model, Qwen2.5-Coder-0.5B-Instruct)
this script builds, in one run:

* ``ours-fp32``: our fp32 export (``accullm-export export MODEL``). It is also the reference of every
  comparison, so its row compares it with itself: KL 0 and full agreement are the sanity check.
* ``genai-int4``: onnxruntime-genai's model builder, ``-p int4 -e cpu`` at its default settings.
* ``genai-int4-b128``: the same at block size 128 (``--extra_options block_size=128``, the key 0.18 reads).
* ``genai-int4-b64-asym``: block 64 with zero points (``--extra_options block_size=64 is_symmetric=false
  shared_embeddings=false``; the shared table fails to load in ONNX Runtime 1.32),
  the peer of ``ours-w4a16`` (asymmetric INT4 at block 64 in its ONNX Runtime form).
* ``genai-int8``: the builder's ``-p int8 -e cpu``.
* ``ort-dynamic-int8``: ONNX Runtime's ``quantize_dynamic`` (int8 weights, per channel) on our fp32 export.
* ``ours-<preset>``: ``accullm-export quantize --preset <preset>`` (its ONNX Runtime form) on our fp32 export,
  one row per preset, with one shared calibration profile (``calibrate``, 64 x 512 tokens of
  ``wiki:calibration``); ``ours-w4a16-fast-no-outliers`` is w4a16-fast with ``--outliers 0`` (the ablation that
  shows what the exact outlier channels buy). A preset that distills is allowed a 40-minute build.
* ``ort-rtn-b128``, ``ort-gptq-b128``, ``ort-hqq-b128``: ONNX Runtime's ``MatMulNBitsQuantizer`` (4-bit,
  block 128) on our fp32 export with RTN, GPTQ (calibrated on windows of the ``wiki:calibration`` split) and
  HQQ. The quantizer's default is asymmetric; when that fails, the row says why and uses symmetric.

Every quantized row reports what the built model really holds, read from its graph: the block sizes, bits and
accuracy levels of its MatMulNBits nodes, and whether the LM head and the token embedding were quantized.
(The sample's weights come from a Q4_1 GGUF with block 32, so 4-bit rows at block 32 sit on a grid close to
the one the weights were made on; compare such rows with that in mind.)

Measurements, per row:

* size MB: model.onnx plus its external data files, 1 MB = 10^6 bytes.
* bits/weight: ``8 * B / W``. ``B`` is the stored bytes of every tensor the model holds: the initializers of
  its main graph (external data length, raw bytes, or typed values) and the tensors of its Constant nodes,
  so scales, zero points, norms, rotary tables and any float copy of the tied embedding that a quantizer
  kept all count. ``W`` is the weight-parameter count of the fp32 model's linear layers and token embedding:
  the elements of each distinct initializer that our fp32 export feeds to a MatMul as its weight or to the
  token-embedding Gather (the tied embedding / LM head matrix counts once). W is computed from the export,
  the same W for every row, so fp32 lands a little above 32 (norms and rotary tables are in B, not in W).
* accuracy: ``accullm_export.validate.pipeline.validate(our fp32 export, candidate)`` with the settings
  printed in the output: perplexity change, mean KL divergence and top-1 agreement on held-out text windows
  (``wiki:evaluation``), the mean teacher-forced greedy prefix over prompts, and golden-probe agreement.
  Both sides run at the ONNX Runtime optimization level printed with the table ("basic" unless a row needs
  another); MatMulNBits runs at "basic" with the accuracy_level stored in the node.
* decode tok/s: greedy decoding of 64 tokens after a 32-token prompt of real text at batch 1, with
  ``OrtCausalLM`` (ORT_ENABLE_ALL, ONNX Runtime's default thread count) and ``generate``; all rows stay
  loaded and are timed in interleaved rounds, the median is reported. A shared machine swings this easily.

Outputs under --out: peers.md, peers.json, peers_accuracy_vs_size.png, the built models under work/ and
each row's validation report under reports/. It measures; it never asserts on a time.

Run from the repository root (--quick for a smoke run)::

    .venv/bin/python benchmarks/peers.py
    .venv/bin/python benchmarks/peers.py --quick --only ours-fp32,genai-int4
    .venv/bin/python benchmarks/peers.py --reuse
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import io
import json
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
from cpu_meter import CpuMeter  # benchmarks/ is on sys.path when a script here runs

from accullm_export.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger("peers")

# the kit's model name -> its Hugging Face id and a title; the genai builder picks its graph recipe from the id
MODELS = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
          "qwen2.5-coder-0.5b": ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen2.5-Coder-0.5B-Instruct")}
# where the model's fp32 weights come from, for the notes under the table
ORIGINS = {"smollm2-135m": "The sample's weights come from a Q4_1 GGUF with block 32.",
           "qwen2.5-coder-0.5b": "The model's weights come from a Q4_K_M GGUF (converted from an AWQ checkpoint): "
                                 "Q4_K blocks of 32, Q6_K of 16, Q5_0/Q8_0 of 32."}
SAMPLE_MODEL = "smollm2-135m"
REFERENCE = "ours-fp32"
BLOCK_SIZE = 128
MB = 1e6
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "genai_config.json", "config.json", "chat_template.jinja")
BUILD_RECORD = "peers_build.json"
DECODE_PROMPT_TOKENS = 32
KL_PLOT_FLOOR = 1e-7  # a KL of exactly 0 (the reference against itself) is drawn here on the log axis


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How much to measure; --quick swaps in the small preset."""

    windows: int
    seq_len: int
    num_prompts: int
    new_tokens: int
    probes_per_task: int
    accuracy_optimization: str
    speed_optimization: str
    decode_tokens: int
    speed_rounds: int
    gptq_windows: int
    gptq_seq_len: int
    calib_samples: int
    calib_seq_len: int
    second_text: str | None = None  # a second validation text (another domain than Wikipedia)

    def llm_config(self):
        from accullm_export.validate.llm import LLMValidationConfig

        return LLMValidationConfig(windows=self.windows, seq_len=self.seq_len, num_prompts=self.num_prompts,
                                   new_tokens=self.new_tokens, probes_per_task=self.probes_per_task,
                                   optimization=self.accuracy_optimization)


# Sized to keep a full run short. GPTQ's 6 x 128 calibration tokens exceed the hidden size (576), so the Hessians
# of every MatMul input but down_proj's (1536 wide) can be full rank; more windows cost build time (GPTQ reruns
# the whole model for each layer input).
FULL = Settings(windows=8, seq_len=256, num_prompts=8, new_tokens=64, probes_per_task=5,
                accuracy_optimization="basic", speed_optimization="all", decode_tokens=64, speed_rounds=3,
                gptq_windows=6, gptq_seq_len=128, calib_samples=64, calib_seq_len=512)
QUICK = Settings(windows=2, seq_len=64, num_prompts=2, new_tokens=8, probes_per_task=1,
                 accuracy_optimization="basic", speed_optimization="all", decode_tokens=16, speed_rounds=1,
                 gptq_windows=2, gptq_seq_len=64, calib_samples=4, calib_seq_len=128)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildContext:
    """What every build needs; picklable, because some builds run in a child process."""

    reference: Path  # our fp32 export
    model: str  # a MODELS key
    hf_folder: Path
    work: Path
    settings: Settings
    timeout_s: int


BuildFunction = Callable[[BuildContext, Path, Path], list[str]]  # (context, empty output folder, log) -> notes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Peer:
    """One row: how to build it, and whether the build runs in a child process (in-process quantizers)."""

    name: str
    label: str
    build: BuildFunction
    in_child: bool = False
    expected_block_size: int | None = None
    build_minutes: int = 10  # the peer's build may run this long even under a lower --build-timeout


class BuildError(Exception):
    """A peer could not be built; the row records the message and the run goes on."""


# ----------------------------------------------------------------------------------------------- builds
def export_ours(context: BuildContext, folder: Path, log_path: Path) -> list[str]:
    """Our fp32 export, by the CLI in a child process."""
    command = [sys.executable, "-m", "accullm_export.cli.main", "export", context.model, "-o", str(folder),
               "--overwrite"]
    run_logged(command, log_path, context.timeout_s)
    return []


def ensure_profile(context: BuildContext) -> Path:
    """Our calibration profile of the reference export (work/profile), measured once and reused while the
    reference is unchanged."""
    from accullm_export.calibration.profile import FEEDS, MANIFEST, model_fingerprint

    profile = context.work / "profile"
    if (profile / MANIFEST).is_file() and (profile / FEEDS).is_file():  # older profiles lack the stored inputs
        manifest = json.loads((profile / MANIFEST).read_text())
        if manifest["model"]["sha256"] == model_fingerprint(context.reference):
            return profile
    settings = context.settings
    command = [sys.executable, "-m", "accullm_export.cli.main", "calibrate", str(context.reference), "-o",
               str(profile), "--samples", str(settings.calib_samples), "--seq-len", str(settings.calib_seq_len),
               "--overwrite"]
    run_logged(command, context.work / "profile.build.log", context.timeout_s)
    return profile


def build_ours(context: BuildContext, folder: Path, log_path: Path, *, recipe: tuple[str, ...]) -> list[str]:
    """``accullm-export quantize`` on our fp32 export with the shared calibration profile."""
    profile = ensure_profile(context)
    command = [sys.executable, "-m", "accullm_export.cli.main", "quantize", str(context.reference), "--profile",
               str(profile), "-o", str(folder), "--overwrite", *recipe]
    run_logged(command, log_path, context.timeout_s)
    settings = context.settings
    return [f"accullm-export quantize {' '.join(recipe)} (profile: {settings.calib_samples} x "
            f"{settings.calib_seq_len} tokens of wiki:calibration)"]


def build_genai(context: BuildContext, folder: Path, log_path: Path, *, precision: str,
                extra_options: tuple[str, ...]) -> list[str]:
    """onnxruntime-genai's model builder for the CPU, offline from the checkpoint's Hugging Face folder."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", MODELS[context.model][0],
               "-i", str(context.hf_folder), "-o", str(folder), "-p", precision, "-e", "cpu",
               "-c", str(context.work / "genai_cache")]
    if extra_options:
        command += ["--extra_options", *extra_options]
    run_logged(command, log_path, context.timeout_s)
    return [f"builder options: -p {precision} -e cpu" + (f" --extra_options {' '.join(extra_options)}"
                                                         if extra_options else " (defaults)")]


def build_dynamic_int8(context: BuildContext, folder: Path, log_path: Path) -> list[str]:
    """ONNX Runtime's quantize_dynamic on our fp32 export: int8 weights, one scale per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul only: ORT 1.32's quantizer takes the standard opset-23 Attention node for its com.microsoft
    # Attention and writes a QAttention node that ONNX Runtime then refuses to load.
    quantize_dynamic(str(context.reference / "model.onnx"), str(folder / "model.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, use_external_data_format=True, op_types_to_quantize=["MatMul"])
    copy_side_files(context.reference, folder)
    return ["quantize_dynamic(weight_type=QInt8, per_channel=True, op_types_to_quantize=['MatMul']); the default "
            "op list turns the standard Attention node into an invalid com.microsoft QAttention"]


def build_matmul_nbits(context: BuildContext, folder: Path, log_path: Path, *, method: str) -> list[str]:
    """ONNX Runtime's MatMulNBitsQuantizer, 4-bit at block 128, on our fp32 export.

    The quantizer's default (asymmetric) is tried first; if it raises, symmetric is tried and the note says
    why. HQQ has no symmetric switch (its zero points are floats), so it gets one attempt.
    """
    import onnx

    attempts = (False,) if method == "hqq" else (False, True)
    notes: list[str] = []
    for symmetric in attempts:
        model = onnx.load(str(context.reference / "model.onnx"))  # the quantizers edit the model in place
        try:
            quantized = _quantize_nbits(model, method, symmetric, context)
        except Exception as exc:  # noqa: BLE001 -- any failure of the third-party quantizer is recorded
            if symmetric or len(attempts) == 1:
                raise
            notes.append(f"asymmetric (the quantizer's default) failed: {type(exc).__name__}: {exc}; "
                         "used is_symmetric=True")
            log.warning("%s asymmetric failed (%s); trying symmetric", method, exc)
            continue
        onnx.save_model(quantized, str(folder / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
        copy_side_files(context.reference, folder)
        notes.insert(0, f"MatMulNBitsQuantizer(bits=4, block_size={BLOCK_SIZE}, is_symmetric={symmetric}) "
                        f"with {method.upper()}" + _calibration_note(method, context.settings))
        return notes
    raise BuildError("no attempt succeeded")  # not reached: the last attempt raises


def _quantize_nbits(model, method: str, symmetric: bool, context: BuildContext):
    """Run one MatMulNBitsQuantizer pass; returns the quantized ModelProto."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    # RTN and GPTQ take their group size from the quantizer's block_size (GPTQ's own block_size is the
    # number of columns it updates at a time); HQQ takes it from its config.
    algo_configs = {
        "rtn": lambda: nbits.RTNWeightOnlyQuantConfig(),
        "gptq": lambda: nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=FeedReader(calibration_feeds(
            context.reference, context.settings.gptq_windows, context.settings.gptq_seq_len))),
        "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=4),
    }
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK_SIZE, is_symmetric=symmetric,
                                           algo_config=algo_configs[method]())
    quantizer.process()
    return quantizer.model.model  # ORT's ONNXModel (HQQ) and the neural-compressor one (RTN, GPTQ) both hold it


def _calibration_note(method: str, settings: Settings) -> str:
    if method != "gptq":
        return ""
    return (f", calibrated on {settings.gptq_windows} windows of {settings.gptq_seq_len} tokens of "
            "wiki:calibration (other GPTQ arguments at their defaults)")


class FeedReader:
    """A CalibrationDataReader over prepared feeds (ORT's GPTQ deep-copies it and iterates the copy)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds, self.position = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.position += 1
        return self.feeds[self.position - 1] if self.position <= len(self.feeds) else None

    def __iter__(self):
        return iter(self.feeds)


def calibration_feeds(reference: Path, num_windows: int, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Full input dicts for our export: real-text windows from wiki:calibration and an empty KV cache."""
    import onnx
    from tokenizers import Tokenizer

    from accullm_export.data.text import load_text_source, token_windows

    tokenizer = Tokenizer.from_file(str(reference / "tokenizer.json"))
    windows = token_windows(load_text_source("wiki:calibration").documents, lambda text: tokenizer.encode(text).ids,
                            num_windows=num_windows, seq_len=seq_len)
    graph = onnx.load(str(reference / "model.onnx"), load_external_data=False).graph
    empty_past = {}
    for value in graph.input:
        if value.name.startswith("past_key_values."):
            dims = [dim.dim_value for dim in value.type.tensor_type.shape.dim]  # [batch, kv heads, past, head]
            empty_past[value.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)
    return [{"input_ids": window[None, :], "attention_mask": np.ones((1, seq_len), dtype=np.int64),
             "position_ids": np.arange(seq_len, dtype=np.int64)[None, :], **empty_past} for window in windows]


def copy_side_files(source: Path, folder: Path) -> None:
    """Tokenizer and configs, so a quantized model.onnx makes a loadable folder."""
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def run_logged(command: list[str], log_path: Path, timeout_s: int) -> None:
    """Run a command with its output to ``log_path``; BuildError with the log's tail on failure or timeout."""
    log.info("running %s", " ".join(command[1:6]) + " ...")
    with open(log_path, "wb") as log_file:
        try:
            completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
        except subprocess.TimeoutExpired:
            raise BuildError(f"stopped after {timeout_s} s (see {log_path})") from None
    if completed.returncode != 0:
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
        raise BuildError(f"exit code {completed.returncode}: {tail} (see {log_path})")


PEERS: dict[str, Peer] = {}


def register(peer: Peer) -> None:
    if peer.name in PEERS:
        raise ValueError(f"peer {peer.name} registered twice")
    PEERS[peer.name] = peer


register(Peer(name=REFERENCE, label="accullm-export fp32 (reference)", build=export_ours))
register(Peer(name="genai-int4", label="onnxruntime-genai int4 (defaults)",
              build=functools.partial(build_genai, precision="int4", extra_options=())))
register(Peer(name="genai-int4-b128", label="onnxruntime-genai int4, block 128", expected_block_size=BLOCK_SIZE,
              build=functools.partial(build_genai, precision="int4", extra_options=(f"block_size={BLOCK_SIZE}",))))
register(Peer(name="genai-int4-b64", label="onnxruntime-genai int4, block 64", expected_block_size=64,
              build=functools.partial(build_genai, precision="int4", extra_options=("block_size=64",))))
register(Peer(name="genai-int4-b64-asym", label="onnxruntime-genai int4, block 64, asymmetric (zero points)",
              expected_block_size=64,
              # with the default shared_embeddings=true the builder writes an embedding Reshape whose uint8 output
              # ONNX Runtime 1.32 refuses to load ("does not match expected type (tensor(float))")
              build=functools.partial(build_genai, precision="int4",
                                      extra_options=("block_size=64", "is_symmetric=false",
                                                     "shared_embeddings=false"))))
register(Peer(name="genai-int8", label="onnxruntime-genai int8",
              build=functools.partial(build_genai, precision="int8", extra_options=())))
register(Peer(name="ort-dynamic-int8", label="ORT quantize_dynamic int8", build=build_dynamic_int8, in_child=True))
def _register_presets() -> None:
    """One row per preset (its ONNX Runtime form), plus the w4a16-fast build without outlier channels: the
    ablation that shows what keeping them exact buys. A preset that distills gets a longer build."""
    from accullm_export.recipes.presets import all_presets

    for name, preset in all_presets().items():
        if "onnxruntime" not in preset.backends:
            continue
        distills = preset.resolve("onnxruntime").distill.steps > 0
        register(Peer(name=f"ours-{name}", label=f"accullm-export --preset {name}",
                      build=functools.partial(build_ours, recipe=("--preset", name)),
                      build_minutes=40 if distills else 10))
    register(Peer(name="ours-w4a16-fast-no-outliers", label="accullm-export --preset w4a16-fast --outliers 0",
                  build=functools.partial(build_ours, recipe=("--preset", "w4a16-fast", "--outliers", "0"))))


_register_presets()
for _method in ("rtn", "gptq", "hqq"):
    register(Peer(name=f"ort-{_method}-b128", label=f"ORT MatMulNBits 4-bit {_method.upper()}, block 128",
                  build=functools.partial(build_matmul_nbits, method=_method), in_child=True,
                  expected_block_size=BLOCK_SIZE))


# ----------------------------------------------------------------------------------------------- running builds
def ensure_built(peer: Peer, context: BuildContext, reuse: bool) -> dict:
    """Build ``peer`` into work/<name> through a staging folder (reused when asked and present).

    Returns the build record: notes and seconds (reused: the record of the build that made the folder).
    """
    folder = context.work / peer.name
    if reuse and (folder / "model.onnx").is_file():
        log.info("reusing %s", folder)
        record_path = folder / BUILD_RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else {"notes": [], "seconds": None}
        return record | {"reused": True}
    staging = folder.with_name(f".{peer.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log.info("building %s", peer.name)
    context = dataclasses.replace(context, timeout_s=max(context.timeout_s, 60 * peer.build_minutes))
    started = time.perf_counter()
    log_path = context.work / f"{peer.name}.build.log"
    try:
        if peer.in_child:
            notes = run_in_child(peer.build, context, staging, log_path)
        else:
            notes = peer.build(context, staging, log_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record = {"notes": notes, "seconds": time.perf_counter() - started}
    atomic_write_text(staging / BUILD_RECORD, json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return record | {"reused": False}


def run_in_child(build: BuildFunction, context: BuildContext, folder: Path, log_path: Path) -> list[str]:
    """Run an in-process quantizer in a spawned child: its memory is returned and a stuck one can be stopped."""
    result_path = folder.with_name(folder.name + ".result.json")
    result_path.unlink(missing_ok=True)
    child = multiprocessing.get_context("spawn").Process(
        target=_child_main, args=(build, context, folder, log_path, result_path))
    child.start()
    child.join(context.timeout_s)
    if child.is_alive():
        child.terminate()
        child.join()
        raise BuildError(f"stopped after {context.timeout_s} s (see {log_path})")
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result_path.unlink(missing_ok=True)
    if "notes" not in result:
        raise BuildError(result.get("error") or f"child exited with code {child.exitcode} (see {log_path})")
    return result["notes"]


def _child_main(build: BuildFunction, context: BuildContext, folder: Path, log_path: Path, result_path: Path) -> None:
    """Entry point of a build child: output to the log file, result (notes or error) to a JSON file."""
    with open(log_path, "wb") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        result = {"notes": build(context, folder, log_path)}
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which records the row as failed
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    result_path.write_text(json.dumps(result))
    if "error" in result:
        sys.exit(1)


# ----------------------------------------------------------------------------------------------- inspection
def model_files(folder: Path) -> list[Path]:
    """model.onnx and the external data files it names."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    locations = {ExternalDataInfo(tensor).location for tensor in model.graph.initializer
                 if tensor.data_location == onnx.TensorProto.EXTERNAL}
    return [folder / "model.onnx", *(folder / location for location in sorted(locations))]


def stored_tensor_bytes(tensor) -> int:
    """Bytes a TensorProto holds: its external length, its raw bytes, or its typed values."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = ExternalDataInfo(tensor)
        if info.length:
            return int(info.length)
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            return (count + 1) // 2  # two 4-bit values a byte
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    if tensor.raw_data:
        return len(tensor.raw_data)
    return int(numpy_helper.to_array(tensor).nbytes)


def total_tensor_bytes(folder: Path) -> int:
    """Stored bytes of the main graph's initializers and Constant-node tensors (B in the docstring)."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    total = sum(stored_tensor_bytes(tensor) for tensor in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            total += sum(stored_tensor_bytes(attribute.t) for attribute in node.attribute if attribute.HasField("t"))
    return total


def weight_parameters(reference: Path) -> int:
    """Elements of the distinct initializers our fp32 export feeds to MatMul weights and the token embedding."""
    import onnx

    graph = onnx.load(str(reference / "model.onnx"), load_external_data=False).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    names = {node.input[1] for node in graph.node if node.op_type == "MatMul" and node.input[1] in initializers}
    names |= {node.input[0] for node in graph.node
              if node.op_type == "Gather" and "input_ids" in node.input and node.input[0] in initializers}
    return sum(int(np.prod(initializers[name].dims)) for name in names)


def describe_quantization(folder: Path, vocab_size: int) -> dict:
    """What the built graph really holds: quantized op counts, MatMulNBits settings, LM head and embedding."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    nbits = collections.Counter()
    lm_head = embedding = "not found"
    for node in graph.node:
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        if node.op_type == "MatMulNBits":
            nbits[(attributes.get("bits", 4), attributes.get("block_size"), attributes.get("accuracy_level", 0))] += 1
            if attributes.get("N") == vocab_size:
                lm_head = (f"MatMulNBits {attributes.get('bits', 4)}-bit, block {attributes.get('block_size')}, "
                           f"accuracy_level {attributes.get('accuracy_level', 0)}")
        elif node.op_type in ("MatMul", "MatMulInteger") and node.input[1] in initializers:
            if list(initializers[node.input[1]].dims)[-1:] == [vocab_size]:
                lm_head = f"{node.op_type}, weight {_dtype_name(initializers[node.input[1]])}"
        elif node.op_type == "MatMul" and producers.get(node.input[1]) is not None:
            dequantize = producers[node.input[1]]  # our graphs: a stored low-bit weight behind DequantizeLinear
            stored = initializers.get(dequantize.input[0]) if dequantize.op_type == "DequantizeLinear" else None
            if stored is not None and list(stored.dims)[-1:] == [vocab_size]:
                block = {a.name: onnx.helper.get_attribute_value(a) for a in dequantize.attribute}.get("block_size")
                lm_head = (f"MatMul of a DequantizeLinear {_dtype_name(stored)} weight"
                           + (f", block {block}" if block else ", per channel"))
        if "input_ids" in node.input and node.op_type in ("Gather", "GatherBlockQuantized"):
            data = _source_initializer(node.input[0], initializers, producers)
            if data is not None and len(data.dims) < 2:
                continue  # a per-token scale gathered beside an integer table, not the table
            bits = f"{attributes.get('bits', 4)}-bit, block {attributes.get('block_size')}"
            embedding = (f"GatherBlockQuantized {bits}" if node.op_type == "GatherBlockQuantized"
                         else f"Gather, table {_dtype_name(data) if data is not None else 'computed'}")
    counts = collections.Counter(node.op_type for node in graph.node)
    float_weights = sum(1 for node in graph.node if node.op_type == "MatMul" and node.input[1] in initializers
                        and initializers[node.input[1]].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    return {"ops": {op: counts[op] for op in ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger",
                                             "DynamicQuantizeLinear", "DequantizeLinear") if counts[op]},
            "matmul_nbits": [{"bits": bits, "block_size": block, "accuracy_level": level, "count": count}
                             for (bits, block, level), count in sorted(nbits.items())],
            "block_sizes": sorted({block for _, block, _ in nbits}),
            "float_matmul_weights": float_weights, "lm_head": lm_head, "embedding": embedding}


def _source_initializer(name: str, initializers: dict, producers: dict):
    """The initializer behind ``name``, looking through Reshape/Transpose/Cast producers."""
    for _ in range(4):
        if name in initializers:
            return initializers[name]
        node = producers.get(name)
        if node is None or node.op_type not in ("Reshape", "Transpose", "Cast", "Identity"):
            return None
        name = node.input[0]
    return None


def _dtype_name(tensor) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(tensor.data_type).lower()


# ----------------------------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class Row:
    """One peer's build, graph facts and measurements (None where a stage failed or did not run)."""

    name: str
    label: str
    folder: str
    status: str = "ok"
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    build_seconds: float | None = None
    reused: bool = False
    quantization: dict | None = None
    size_mb: float | None = None
    tensor_bytes: int | None = None
    bits_per_weight: float | None = None
    metrics: dict | None = None
    greedy: dict | None = None
    probe_agreement: float | None = None
    validate_seconds: float | None = None
    decode_tokens_per_second: float | None = None
    decode_samples: list[float] = dataclasses.field(default_factory=list)
    second_metrics: dict | None = None  # the same accuracy metrics on --second-text

    def fail(self, stage: str, exc: BaseException) -> None:
        message = str(exc).splitlines()[0] if str(exc) else ""
        self.status, self.error = "failed", f"{stage}: {type(exc).__name__}: {message}"
        log.error("%s %s", self.name, self.error)


def inspect_row(row: Row, peer: Peer, weights: int, vocab_size: int) -> None:
    """Size, bits per weight and the quantization facts; checks the block size a row asked for."""
    folder = Path(row.folder)
    row.size_mb = sum(path.stat().st_size for path in model_files(folder)) / MB
    row.tensor_bytes = total_tensor_bytes(folder)
    row.bits_per_weight = 8 * row.tensor_bytes / weights
    row.quantization = describe_quantization(folder, vocab_size)
    found = row.quantization["block_sizes"]
    log.info("%s: MatMulNBits block sizes %s, LM head %s, embedding %s", row.name, found or "none",
             row.quantization["lm_head"], row.quantization["embedding"])
    if peer.expected_block_size is not None and found != [peer.expected_block_size]:
        raise BuildError(f"asked for block size {peer.expected_block_size} but the model's MatMulNBits "
                         f"nodes have {found or 'none'}")


def validate_row(row: Row, reference: Path, settings: Settings, reports: Path) -> None:
    """Accuracy against our fp32 export, through the kit's validate()."""
    from accullm_export.validate.pipeline import ValidateOptions, validate

    started = time.perf_counter()
    report = validate(reference, Path(row.folder),
                      ValidateOptions(llm=settings.llm_config(), report_dir=str(reports / row.name)))
    row.validate_seconds = time.perf_counter() - started
    row.metrics = report["metrics"]
    row.greedy = {key: value for key, value in report["greedy"].items() if key != "prompts"}
    row.probe_agreement = report.get("probes", {}).get("agreement")
    log.info("%s: KL %.4g, top-1 %.3f, greedy prefix %.1f (%.0f s)", row.name, row.metrics["kl_mean"],
             row.metrics["top1_agreement"], row.greedy["mean_prefix"], row.validate_seconds)
    if settings.second_text:  # the held-out metrics on another text domain (no greedy prompts or probes)
        llm = dataclasses.replace(settings.llm_config(), text=settings.second_text, num_prompts=1, new_tokens=8,
                                  probes_per_task=0)
        second = validate(reference, Path(row.folder),
                          ValidateOptions(llm=llm, report_dir=str(reports / f"{row.name}-second-text")))
        row.second_metrics = second["metrics"]
        log.info("%s on %s: KL %.4g", row.name, settings.second_text, row.second_metrics["kl_mean"])


def print_report(report: str, out: Path | None) -> None:
    """Print a benchmark's markdown table, and write it to ``out`` too when given (the side-by-side scripts)."""
    print(report)
    if out:
        atomic_write_text(out, report + "\n")


def decode_prompt(reference: Path) -> list[int]:
    """The first DECODE_PROMPT_TOKENS tokens of the first held-out document."""
    from accullm_export.data.text import load_text_source
    from accullm_export.runtime.tokenizer import FolderTokenizer

    tokenizer = FolderTokenizer(reference)
    for document in load_text_source("wiki:evaluation").documents:
        ids = tokenizer.encode(document)
        if len(ids) >= DECODE_PROMPT_TOKENS:
            return ids[:DECODE_PROMPT_TOKENS]
    raise BuildError("no held-out document is long enough for the decode prompt")


def measure_decode(rows: list[Row], prompt: list[int], settings: Settings) -> float | None:
    """Greedy decode tokens/s of every row at batch 1; all loaded, interleaved rounds, median kept.

    Returns the share of all CPUs' time that other processes took while timing (None without /proc).
    """
    from accullm_export.runtime import GenerationConfig, OrtCausalLM, generate

    loaded = []
    for row in rows:
        try:
            model = OrtCausalLM.from_path(row.folder, device="cpu", optimization=settings.speed_optimization)
            generate(model, [prompt], GenerationConfig(max_new_tokens=8))  # warm-up
            loaded.append((row, model))
        except Exception as exc:  # noqa: BLE001 -- the row records it
            row.fail("decode", exc)
    # No EOS: every run decodes exactly decode_tokens steps after the prefill's token.
    config = GenerationConfig(max_new_tokens=settings.decode_tokens + 1)
    meter = CpuMeter()
    meter.start()
    for round_index in range(settings.speed_rounds):
        log.info("decode round %d of %d", round_index + 1, settings.speed_rounds)
        for index in np.roll(np.arange(len(loaded)), -round_index):
            row, model = loaded[index]
            row.decode_samples.append(generate(model, [prompt], config).decode_tokens_per_second)
    for row, _ in loaded:
        row.decode_tokens_per_second = statistics.median(row.decode_samples)
    return meter.others_share()


def measure_all(peers: list[Peer], context: BuildContext, reuse: bool, out: Path,
                prebuilt: dict[str, dict]) -> tuple[list[Row], dict]:
    """Build, inspect and validate every peer (a failure stays in its row), then time decoding.

    ``prebuilt`` maps a peer name to its build record when it was built already (the reference).
    Returns the rows and run-wide facts (the weight count W, the CPU share others took while timing).
    """
    weights = weight_parameters(context.reference)
    vocab_size = _vocab_size(context.reference)
    rows = []
    for peer in peers:
        row = Row(name=peer.name, label=peer.label, folder=str(context.work / peer.name))
        rows.append(row)
        stages = (("build", functools.partial(_record_build, row, peer, context, reuse, prebuilt)),
                  ("inspect", functools.partial(inspect_row, row, peer, weights, vocab_size)),
                  ("validate", functools.partial(validate_row, row, context.reference, context.settings,
                                                 out / "reports")))
        for stage, step in stages:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 -- one peer's failure must not stop the others
                row.fail(stage, exc)
                break
    others = measure_decode([row for row in rows if row.status == "ok"], decode_prompt(context.reference),
                            context.settings)
    return rows, {"weight_parameters": weights, "others_cpu_share_while_timing": others}


def _record_build(row: Row, peer: Peer, context: BuildContext, reuse: bool, prebuilt: dict[str, dict]) -> None:
    record = prebuilt.get(peer.name) or ensure_built(peer, context, reuse)
    row.notes, row.build_seconds, row.reused = record["notes"], record["seconds"], record["reused"]


def _vocab_size(reference: Path) -> int:
    import onnx

    graph = onnx.load(str(reference / "model.onnx"), load_external_data=False).graph
    logits = next(value for value in graph.output if value.name == "logits")
    return logits.type.tensor_type.shape.dim[-1].dim_value


# ----------------------------------------------------------------------------------------------- reporting
TABLE_HEADER = ("| Peer | Block | Size MB | Bits/weight | Δppl % | KL mean | Top-1 | Greedy prefix | Probes "
                "| Decode tok/s |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")


def _number(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _percent(share: float | None) -> str:
    return "an unknown share" if share is None else f"{100 * share:.0f}%"


def table_row(row: Row) -> str:
    """One markdown line; a row that failed before validation says so in its accuracy cells."""
    block = "/".join(str(size) for size in (row.quantization or {}).get("block_sizes", [])) or "—"
    head = f"| {row.name} | {block} | {_number(row.size_mb, '.1f')} | {_number(row.bits_per_weight, '.2f')} "
    if row.metrics is None:
        return head + "| failed | | | | | |"
    metrics, greedy = row.metrics, row.greedy
    prefix = f"{greedy['mean_prefix']:.1f} of {greedy['new_tokens']} ({greedy['full_matches']}/{greedy['count']} full)"
    return (head + f"| {metrics['ppl_delta_pct']:+.2f} | {metrics['kl_mean']:.4g} | {metrics['top1_agreement']:.3f} "
            f"| {prefix} | {_number(row.probe_agreement, '.2f')} | {_number(row.decode_tokens_per_second, '.1f')} |")


def second_text_table(rows: list[Row], text: str) -> list[str]:
    """The rows' accuracy on the second text, beside their Wikipedia figures."""
    lines = [f"Accuracy on `{text}` (same windows and length as above):", "",
             "| Peer | Δppl % | KL mean | Top-1 | KL on Wikipedia |", "|---|--:|--:|--:|--:|"]
    for row in rows:
        if row.second_metrics and row.metrics:
            second = row.second_metrics
            lines.append(f"| {row.name} | {second['ppl_delta_pct']:+.2f} | {second['kl_mean']:.4g} | "
                         f"{second['top1_agreement']:.3f} | {row.metrics['kl_mean']:.4g} |")
    return lines + [""]


def stdlib_code_text(path: Path) -> Path:
    """A code-domain text: the Python sources of a few standard-library packages, concatenated in name order
    (the same text for one Python version), written to ``path``."""
    import email
    import http
    import json as json_package

    sources = [file for package in (email, http, json_package)
               for file in sorted(Path(package.__file__).parent.glob("*.py"))]
    path.write_text("\n\n".join(file.read_text(encoding="utf-8") for file in sources), encoding="utf-8")
    return path


def details(row: Row) -> str:
    """What the row's graph holds, how it was built, and what went wrong."""
    lines = [f"- **{row.name}** ({row.label})"]
    quant = row.quantization
    if quant:
        nbits = ", ".join(f"{item['count']}× {item['bits']}-bit block {item['block_size']} "
                          f"accuracy_level {item['accuracy_level']}" for item in quant["matmul_nbits"])
        ops = ", ".join(f"{op} ×{count}" for op, count in quant["ops"].items()) or "none (float graph)"
        lines.append(f"  - quantized ops: {ops}" + (f"; MatMulNBits: {nbits}" if nbits else ""))
        lines.append(f"  - LM head: {quant['lm_head']}; token embedding: {quant['embedding']}; "
                     f"MatMuls left with a float weight: {quant['float_matmul_weights']}")
    for note in row.notes:
        lines.append(f"  - {note}")
    if row.build_seconds is not None:
        lines.append(f"  - build {row.build_seconds:.0f} s" + (" (reused folder)" if row.reused else "")
                     + (f", validation {row.validate_seconds:.0f} s" if row.validate_seconds else ""))
    if row.error:
        lines.append(f"  - **FAILED** at {row.error}")
    return "\n".join(lines)


def render_markdown(rows: list[Row], environment: dict, settings: Settings, facts: dict) -> str:
    """peers.md: the table, how it was measured, and per-row details."""
    llm = settings.llm_config()
    return "\n".join([
        f"# Peers: alternatives to accullm-export for {environment['model']}, validated against our fp32 export",
        "",
        TABLE_HEADER,
        *(table_row(row) for row in rows),
        "",
        *(second_text_table(rows, settings.second_text) if settings.second_text else []),
        f"- Accuracy: `validate(reference={REFERENCE}, candidate=row)` at ONNX Runtime optimization "
        f"**{settings.accuracy_optimization}** on both sides, for every row; text `{llm.text}`, {llm.windows} windows "
        f"of {llm.seq_len} tokens; greedy prefix over {llm.num_prompts} prompts of {llm.prompt_tokens} tokens, "
        f"{llm.new_tokens} new tokens; golden probes {llm.probes_per_task} per task, {llm.probe_tokens} tokens.",
        f"- Decode tok/s: batch 1, greedy, {settings.decode_tokens} decode steps after a {DECODE_PROMPT_TOKENS}-token "
        f"prompt, optimization **{settings.speed_optimization}**, ONNX Runtime's default threads, median of "
        f"{settings.speed_rounds} interleaved round(s) on {environment['cpus']} CPUs; other processes took "
        f"{_percent(facts['others_cpu_share_while_timing'])} of the CPU time meanwhile. Times, not gates.",
        f"- Bits/weight: 8 × (stored bytes of all initializers and Constant tensors) / "
        f"{facts['weight_parameters']:,} weight "
        "parameters (linear layers + token embedding of the fp32 model, the tied matrix once).",
        "- Block: block sizes of the model's MatMulNBits nodes (— where there are none). "
        f"{ORIGINS[environment['model_name']]}",
        f"- Versions: {', '.join(f'{key} {value}' for key, value in environment['versions'].items())}; "
        f"{environment['platform']}; run took {environment['run_seconds'] / 60:.1f} min on {environment['date']}.",
        "",
        "## Details",
        "",
        *(details(row) for row in rows),
        "",
    ])


def render_plot(rows: list[Row], title: str) -> bytes | None:
    """KL mean (log) and top-1 agreement against bits per weight, each point labelled; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [row for row in rows if row.metrics and row.bits_per_weight]
    if not points:
        return None
    figure, (kl_axis, top1_axis) = plt.subplots(1, 2, figsize=(13, 5.2))
    for index, row in enumerate(sorted(points, key=lambda row: row.bits_per_weight)):
        bits, kl = row.bits_per_weight, max(row.metrics["kl_mean"], KL_PLOT_FLOOR)
        kl_label = row.name + (f" (KL 0, drawn at {KL_PLOT_FLOOR:g})" if row.metrics["kl_mean"] < KL_PLOT_FLOOR else "")
        offset = (6, 6 if index % 2 == 0 else -11)  # alternate above/below: neighbours often sit close
        for axis, value, label in ((kl_axis, kl, kl_label), (top1_axis, row.metrics["top1_agreement"], row.name)):
            axis.scatter(bits, value, color=f"C{index}")
            axis.annotate(label, (bits, value), textcoords="offset points", xytext=offset, fontsize=8)
    kl_axis.set(yscale="log", xlabel="bits per weight", ylabel="mean KL(reference ‖ candidate), nats",
                title="KL divergence vs size (lower is better)")
    top1_axis.set(xlabel="bits per weight", ylabel="top-1 agreement with fp32",
                  title="Top-1 agreement vs size (higher is better)")
    for axis in (kl_axis, top1_axis):
        axis.grid(True, which="both", alpha=0.3)
        axis.margins(x=0.15)  # room for the labels of the rightmost points
    figure.suptitle(f"{title}: peers validated against our fp32 export")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def environment(run_seconds: float, model: str) -> dict:
    import onnx
    import onnxruntime

    import accullm_export

    versions = {"accullm_export": accullm_export.__version__, "onnxruntime": onnxruntime.__version__,
                "onnx": onnx.__version__}
    try:
        import onnxruntime_genai

        versions["onnxruntime-genai"] = onnxruntime_genai.__version__
    except ImportError:
        versions["onnxruntime-genai"] = "not installed"
    return {"model_name": model, "model": MODELS[model][1], "versions": versions, "platform": platform.platform(), "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "date": datetime.date.today().isoformat(), "run_seconds": run_seconds}


def write_outputs(out: Path, rows: list[Row], settings: Settings, facts: dict, run_seconds: float,
                  model: str = SAMPLE_MODEL) -> str:
    """peers.md, peers.json and the plot under ``out``, each written atomically; returns the markdown."""
    from accullm_export.validate.report import json_safe

    env = environment(run_seconds, model)
    markdown = render_markdown(rows, env, settings, facts)
    document = {"kind": "accullm-export/peers", "version": 1, "environment": env,
                "settings": dataclasses.asdict(settings), "validation": dataclasses.asdict(settings.llm_config()),
                **facts, "rows": [dataclasses.asdict(row) for row in rows]}
    atomic_write_text(out / "peers.md", markdown)
    atomic_write_text(out / "peers.json", json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")
    png = render_plot(rows, env["model"])
    if png is not None:
        atomic_write_bytes(out / "peers_accuracy_vs_size.png", png)
    return markdown


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=SAMPLE_MODEL,
                        help="the model every row is built from (default: the sample)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/peers"), help="output folder")
    parser.add_argument("--reuse", action="store_true", help="skip builds whose folder already exists")
    parser.add_argument("--only", type=lambda text: [name for name in text.split(",") if name],
                        help=f"comma-separated rows to run, from: {', '.join(PEERS)} (the reference is built anyway)")
    parser.add_argument("--quick", action="store_true", help="tiny validation and timing settings for smoke runs")
    parser.add_argument("--speed-rounds", type=int, help="interleaved decode rounds (more on a noisy machine)")
    parser.add_argument("--windows", type=int, help="held-out validation windows per row (default: the settings')")
    parser.add_argument("--second-text", metavar="SOURCE",
                        help="also validate every row on this text (a .txt/.jsonl file, or 'stdlib-code': Python "
                             "standard-library sources, a code domain)")
    parser.add_argument("--build-timeout", type=int, default=600, metavar="SECONDS",
                        help="a build running longer is stopped and its row recorded as failed (a peer may be "
                        "given more: a preset that distills, 40 minutes)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(PEERS))
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    from accullm_export.models.checkpoint import resolve_checkpoint_folder

    started = time.perf_counter()
    settings = QUICK if args.quick else FULL
    if args.speed_rounds is not None:
        settings = dataclasses.replace(settings, speed_rounds=args.speed_rounds)
    if args.windows is not None:
        settings = dataclasses.replace(settings, windows=args.windows)
    work = (args.out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.second_text:
        text = stdlib_code_text(work / "stdlib-code.txt") if args.second_text == "stdlib-code" else args.second_text
        settings = dataclasses.replace(settings, second_text=str(text))
    context = BuildContext(reference=work / REFERENCE, model=args.model,
                           hf_folder=Path(resolve_checkpoint_folder(args.model)),
                           work=work, settings=settings, timeout_s=args.build_timeout)
    try:
        prebuilt = {REFERENCE: ensure_built(PEERS[REFERENCE], context, args.reuse)}
    except Exception as exc:  # noqa: BLE001 -- without the reference nothing can be compared
        print(f"error: cannot export the reference: {exc}", file=sys.stderr)
        return 1
    peers = [peer for name, peer in PEERS.items() if not args.only or name in args.only]
    rows, facts = measure_all(peers, context, args.reuse, args.out, prebuilt)
    markdown = write_outputs(args.out, rows, settings, facts, time.perf_counter() - started, args.model)
    print(markdown)
    print(f"wrote {args.out / 'peers.md'}, {args.out / 'peers.json'}, {args.out / 'peers_accuracy_vs_size.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
