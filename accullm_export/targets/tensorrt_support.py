"""Will TensorRT's ONNX parser take this model? A static check against the support table ``tensorrt_ops.toml``.

Every node is checked for the TensorRT version asked: the op (and the release that added it), the model's opset,
the dtypes of the inputs the operator matrix constrains, the inputs that must be initializers or build-time
constants (quantization scales, zero points, reduction axes), inputs, outputs and attributes the importer
refuses, and, for the accullm plugin ops, the op type, ``plugin_version``, ``plugin_namespace`` and domain the
plugin library registers.

Dtypes and ranks come from ``onnx.shape_inference`` run on the model without its external weights, plus the
initializers' declared types: no weight is read, so models larger than 2 GB check as well. Where a dtype or
rank cannot be inferred (after a plugin op, say), the check passes that input rather than guess: a model that
passes may still fail to build, but a reported finding names a real mismatch with the table.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from accullm_export.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("tensorrt_ops.toml")
DEFAULT_TENSORRT_VERSION = "10.3"  # the TensorRT of JetPack 6 on the Orin targets (the table's jetpack-6 source)
_STANDARD_DOMAINS = ("", "ai.onnx")
_NOT_CONSTANT = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                           "Multinomial", "Bernoulli", "If", "Loop", "Scan"})
_DTYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
                TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4", TensorProto.UINT4: "UINT4"}
if hasattr(TensorProto, "FLOAT4E2M1"):
    _DTYPE_NAMES[TensorProto.FLOAT4E2M1] = "FP4"


@functools.cache
def _table() -> dict:
    with TABLE_PATH.open("rb") as handle:
        return tomllib.load(handle)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


KNOWN_TENSORRT_VERSIONS: tuple[str, ...] = tuple(sorted(_table()["versions"], key=_version_key))


def parse_tensorrt_version(text: str) -> str:
    """"10.3", "10.3.0" or "10.3.0.30" -> "10.3"; UserError (listing the known versions) for any other."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+){0,2}\s*", str(text))
    version = f"{int(match.group(1))}.{int(match.group(2))}" if match else None
    if version not in KNOWN_TENSORRT_VERSIONS:
        raise UserError(f"unknown TensorRT version {text!r}; the support table knows "
                        f"{', '.join(KNOWN_TENSORRT_VERSIONS)}")
    return version


@dataclasses.dataclass(frozen=True)
class Finding:
    """One node the parser of that TensorRT version would refuse, and why (reasons joined by "; ")."""

    node: str
    op: str
    domain: str
    reason: str

    def __str__(self) -> str:
        op = self.op if self.domain in _STANDARD_DOMAINS else f"{self.domain}::{self.op}"
        return f"{self.node} ({op}: {self.reason})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_model(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, str]:
    """The model proto without its external weights, and its display name; a folder means its model.onnx."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model"
    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False), str(path)
    except Exception as exc:  # protobuf raises its own DecodeError, not a subclass of anything useful
        raise UserError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from exc


def check_model(model: onnx.ModelProto | str | Path, version: str) -> list[Finding]:
    """Every node of ``model`` that TensorRT ``version``'s ONNX parser would refuse (empty: it parses).

    Args:
        model: a ModelProto, an .onnx file or a folder holding model.onnx; weights are never loaded.
        version: a TensorRT version, as ``parse_tensorrt_version`` accepts it.

    A dtype, rank or constant value that cannot be known statically is not reported (see the module docstring).
    """
    version = parse_tensorrt_version(version)
    proto, _ = load_model(model)
    facts = _Facts(proto)
    findings = _check_opsets(proto, version)
    for node, name in _nodes(proto):
        reasons = _check_node(node, facts, version)
        if reasons:
            findings.append(Finding(name, node.op_type, node.domain, "; ".join(reasons)))
    return findings


def check_or_raise(model: onnx.ModelProto | str | Path, version: str, what: str) -> None:
    """UserError (one line: the count of nodes and the first few, with their reasons) when ``model`` fails."""
    version = parse_tensorrt_version(version)
    findings = check_model(model, version)
    if findings:
        raise UserError(summary_line(findings, version, what))


def summary_line(findings: list[Finding], version: str, what: str, shown: int = 3) -> str:
    """"what: N nodes TensorRT V cannot parse: first (reason), ... and K more"."""
    nodes = len({finding.node for finding in findings})
    listed = ", ".join(str(finding) for finding in findings[:shown])
    more = f", ... and {len(findings) - shown} more" if len(findings) > shown else ""
    return (f"{what}: {nodes} node{'s' if nodes != 1 else ''} TensorRT {version} cannot parse: {listed}{more} "
            f"(`accullm-export check-trt {what} --tensorrt-version {version}` lists them all)")


# ---------------------------------------------------------------------------------------------- model facts
class _Facts:
    """Dtypes, ranks, constant-ness and (where stored in the file) values of the model's tensors."""

    def __init__(self, model: onnx.ModelProto):
        self.dtypes: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        self.initializers: set[str] = set()
        self.constants: set[str] = set()
        self.values: dict[str, onnx.TensorProto] = {}
        self.functions = {(function.domain, function.name) for function in model.functions}
        self.opset = next((entry.version for entry in model.opset_import if entry.domain in _STANDARD_DOMAINS), None)
        self._collect(_inferred(model).graph)

    def _collect(self, graph: onnx.GraphProto) -> None:
        for info in list(graph.input) + list(graph.output) + list(graph.value_info):
            tensor = info.type.tensor_type
            if tensor.elem_type:
                self.dtypes[info.name] = tensor.elem_type
            if tensor.HasField("shape"):
                self.shapes[info.name] = [dim.dim_value if dim.HasField("dim_value") else None
                                          for dim in tensor.shape.dim]
        for initializer in graph.initializer:
            self.dtypes[initializer.name] = initializer.data_type
            self.shapes[initializer.name] = list(initializer.dims)
            self.initializers.add(initializer.name)
            self.constants.add(initializer.name)
            self.values[initializer.name] = initializer
        for node in graph.node:  # topological order (an ONNX requirement), so one pass propagates constants
            if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS:
                self.initializers.update(node.output)
                self.constants.update(node.output)
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.values[node.output[0]] = attribute.t
                        self.dtypes.setdefault(node.output[0], attribute.t.data_type)
            elif (node.domain in _STANDARD_DOMAINS and node.op_type not in _NOT_CONSTANT and node.input
                  and all(not name or name in self.constants for name in node.input)):
                self.constants.update(name for name in node.output if name)
            for attribute in node.attribute:
                for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    self._collect(subgraph)

    def dtype(self, name: str) -> str | None:
        code = self.dtypes.get(name)
        if not code:
            return None
        return _DTYPE_NAMES.get(code) or TensorProto.DataType.Name(code)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def value(self, name: str) -> np.ndarray | None:
        """The stored value, or None when it lives in an external file (never read here) or is computed."""
        tensor = self.values.get(name)
        if tensor is None or tensor.data_location == TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # a dtype numpy cannot hold: the value stays unknown
            return None


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value_info (shape inference works on a serialized copy); the model itself when
    inference fails, so that only the declared types are known."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # a model ONNX's own inference rejects: check it with what it declares
        log.debug("shape inference failed (%s); checking with declared types only", exc)
        return model


def _nodes(model: onnx.ModelProto):
    """(node, display name) of every node: the graph's, its subgraphs' and its local functions' bodies."""
    def walk(nodes, prefix: str):
        for index, node in enumerate(nodes):
            name = f"{prefix}{node.name or f'{node.op_type}#{index}'}"
            yield node, name
            for attribute in node.attribute:
                for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    yield from walk(subgraph.node, f"{name}/{attribute.name}/")

    yield from walk(model.graph.node, "")
    for function in model.functions:
        yield from walk(function.node, f"{function.domain}::{function.name}/")


# ------------------------------------------------------------------------------------------------- checks
def _check_opsets(model: onnx.ModelProto, version: str) -> list[Finding]:
    limits = _table()["versions"][version]
    low, high = limits["opset_min"], limits["opset_max"]
    findings = []
    for entry in model.opset_import:
        if entry.domain in _STANDARD_DOMAINS and not low <= entry.version <= high:
            findings.append(Finding("(model)", "opset_import", entry.domain,
                                    f"opset {entry.version} is outside TensorRT {version}'s parser range "
                                    f"{low}-{high}"))
    return findings


def _check_node(node: onnx.NodeProto, facts: _Facts, version: str) -> list[str]:
    if (node.domain, node.op_type) in facts.functions:
        return []  # a local function: the parser inlines it, and its body's nodes are checked one by one
    if node.domain in _STANDARD_DOMAINS:
        entry = _table()["ops"].get(node.op_type)
        if entry is None:
            return [f"no importer in TensorRT {version}'s ONNX parser (not in its operator matrix)"]
        return _check_standard(node, _resolve(entry, version), facts, version)
    return _check_plugin(node, version)


def _resolve(entry: dict, version: str) -> dict:
    """The entry as it reads for ``version``: its ``changes`` up to that version applied in order."""
    spec = dict(entry)
    for change in sorted(entry.get("changes", ()), key=lambda change: _version_key(change["version"])):
        if _version_key(change["version"]) <= _version_key(version):
            spec.update({key: value for key, value in change.items() if key != "version"})
    return spec


def _check_standard(node: onnx.NodeProto, spec: dict, facts: _Facts, version: str) -> list[str]:
    if _version_key(spec["since"]) > _version_key(version):
        return [f"added to the parser in {spec['since']}"]
    if "until" in spec and _version_key(spec["until"]) <= _version_key(version):
        return [f"removed from the parser in {spec['until']}"]
    reasons = _dtype_reasons(node, spec, facts, version)
    reasons += _constant_reasons(node, spec, facts)
    reasons += _io_reasons(node, spec, facts)
    reasons += _attribute_reasons(node, spec)
    reasons += _opset_reasons(node, spec, facts, version)
    if node.op_type == "DequantizeLinear":
        reasons += _dequantize_reasons(node, spec, facts)
    return reasons


def _allows(allowed: list[str], dtype: str) -> bool:
    # DOUBLE is cast down to FLOAT by the parser (the matrices' note), so it goes where FP32 goes
    return dtype in allowed or (dtype == "DOUBLE" and "FP32" in allowed)


def _dtype_reasons(node: onnx.NodeProto, spec: dict, facts: _Facts, version: str) -> list[str]:
    reasons = []
    indices = range(len(node.input)) if spec.get("inputs") == "all" else spec.get("inputs", [0])
    per_input = {int(index): dtypes for index, dtypes in spec.get("input_dtypes", {}).items()}
    checked = [(index, spec["dtypes"]) for index in indices if index not in per_input] + sorted(per_input.items())
    for index, allowed in checked:
        name = node.input[index] if index < len(node.input) else ""
        dtype = facts.dtype(name) if name else None
        if dtype and not _allows(allowed, dtype):
            reasons.append(f"input {index} is {dtype}; TensorRT {version} takes {', '.join(allowed)}")
    for index in spec.get("outputs", []):
        dtype = facts.dtype(node.output[index]) if index < len(node.output) and node.output[index] else None
        if dtype and not _allows(spec["dtypes"], dtype):
            reasons.append(f"output {index} is {dtype}; TensorRT {version} takes {', '.join(spec['dtypes'])}")
    if "to_attribute" in spec:
        for attribute in node.attribute:
            if attribute.name == spec["to_attribute"]:
                dtype = _DTYPE_NAMES.get(attribute.i) or TensorProto.DataType.Name(attribute.i)
                if not _allows(spec["dtypes"], dtype):
                    reasons.append(f"casts to {dtype}; TensorRT {version} takes {', '.join(spec['dtypes'])}")
    return reasons


def _constant_reasons(node: onnx.NodeProto, spec: dict, facts: _Facts) -> list[str]:
    reasons = []
    for index, must, kind in ([(i, facts.initializers, "an initializer") for i in spec.get("initializer_inputs", [])]
                              + [(i, facts.constants, "a build-time constant")
                                 for i in spec.get("constant_inputs", [])]):
        if index < len(node.input) and node.input[index] and node.input[index] not in must:
            reasons.append(f"input {index} ({node.input[index]}) must be {kind}")
    for index in spec.get("zero_inputs", []):
        if index < len(node.input) and node.input[index]:
            value = facts.value(node.input[index])
            if value is not None and np.any(value.astype(np.float64) != 0):
                reasons.append(f"input {index} ({node.input[index]}) must be all zeros (symmetric quantization only)")
    return reasons


def _io_reasons(node: onnx.NodeProto, spec: dict, facts: _Facts) -> list[str]:
    reasons = [f"input {index} ({node.input[index]}) is unsupported" for index in spec.get("unsupported_inputs", [])
               if index < len(node.input) and node.input[index]]
    reasons += [f"output {index} ({node.output[index]}) is unsupported"
                for index in spec.get("unsupported_outputs", []) if index < len(node.output) and node.output[index]]
    for index, rank in spec.get("ranks", {}).items():
        index = int(index)
        name = node.input[index] if index < len(node.input) else ""
        actual = facts.rank(name) if name else None
        if actual is not None and actual != rank:
            reasons.append(f"input {index} has rank {actual}; TensorRT takes rank {rank}")
    return reasons


def _attribute_reasons(node: onnx.NodeProto, spec: dict) -> list[str]:
    reasons = []
    values = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    for name, required in spec.get("attributes", {}).items():
        value = values.get(name)
        if isinstance(value, bytes):
            value = value.decode()
        if value is not None and value != required:
            reasons.append(f"attribute {name}={value!r} is unsupported (TensorRT takes {required!r})")
    return reasons


def _opset_reasons(node: onnx.NodeProto, spec: dict, facts: _Facts, version: str) -> list[str]:
    """The op's ONNX version at the model's opset (its schema's since_version) against the importer's range."""
    if "opsets" not in spec or facts.opset is None:
        return []
    try:
        since = onnx.defs.get_schema(node.op_type, facts.opset, "").since_version
    except onnx.defs.SchemaError:
        return []
    low, high = spec["opsets"]
    if not low <= since <= high:
        return [f"the opset-{since} form is not parsed by TensorRT {version} (it takes opset {low}-{high} forms)"]
    return []


def _dequantize_reasons(node: onnx.NodeProto, spec: dict, facts: _Facts) -> list[str]:
    reasons = []
    data = node.input[0]
    dtype = facts.dtype(data)
    block_size = next((attribute.i for attribute in node.attribute if attribute.name == "block_size"), 0)
    if dtype in spec.get("weight_only", ()) and data not in facts.constants:
        reasons.append(f"input 0 is {dtype}, which TensorRT takes for weights only: it must be a build-time constant")
    if block_size and dtype and dtype not in spec.get("block_dtypes", ()):
        reasons.append(f"block quantization (block_size {block_size}) is {'/'.join(spec.get('block_dtypes', ()))} "
                       f"only; input 0 is {dtype}")
    if block_size and len(node.input) > 1:
        data_rank, scale_rank = facts.rank(data), facts.rank(node.input[1])
        if data_rank is not None and scale_rank is not None and data_rank != scale_rank:
            reasons.append(f"a blocked scale must have the input's rank ({data_rank}), not {scale_rank}")
    shape = facts.shapes.get(data)
    if dtype in spec.get("even_last_dim", ()) and shape and shape[-1] is not None and shape[-1] % 2:
        reasons.append(f"{dtype} needs an even last dimension, not {shape[-1]}")
    return reasons


def _check_plugin(node: onnx.NodeProto, version: str) -> list[str]:
    """A node outside the standard domains: the parser looks up a plugin creator by (op type, version,
    namespace); the accullm ones must match what the plugin library registers."""
    table = _table()
    entry = table["plugins"].get(node.op_type)
    importer = table["plugin_importer"]
    if entry is None:
        known = ", ".join(f"{plugin['domain']}::{name}" for name, plugin in table["plugins"].items())
        return [f"custom op in domain {node.domain!r}: TensorRT imports it only as a plugin, and the support "
                f"table knows none by that name (it knows {known})"]
    if _version_key(importer["ipluginv3_since"]) > _version_key(version):
        return [f"IPluginV3 plugins are parsed from {importer['ipluginv3_since']} on"]
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    attributes = {key: value.decode() if isinstance(value, bytes) else value for key, value in attributes.items()}
    from_domain = _version_key(importer["namespace_from_domain_since"]) <= _version_key(version)
    namespace = attributes.get("plugin_namespace", node.domain if from_domain else "")
    plugin_version = str(attributes.get("plugin_version", "1"))
    reasons = []
    if node.domain != entry["domain"]:
        reasons.append(f"domain {node.domain!r}; the accullm plugins use {entry['domain']!r}")
    if plugin_version != entry["version"]:
        reasons.append(f"plugin_version {plugin_version!r}; the plugin library registers {entry['version']!r}")
    if namespace != entry["namespace"]:
        reasons.append(f"plugin namespace {namespace!r}; the plugin library registers {entry['namespace']!r}")
    return reasons
