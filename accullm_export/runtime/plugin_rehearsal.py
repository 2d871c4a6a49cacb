"""The plugin graph without TensorRT: ONNX Runtime runs a bundle's ``model_plugins/model.onnx`` on the CPU with
every ``accullm`` node executed by its NumPy reference (``plugins/<op>/reference.py``).

Each plugin node becomes an onnxruntime-extensions Python custom op in an in-memory copy of the model (the file
is never changed). onnxruntime-extensions registers Python ops in its own domain (``ai.onnx.contrib``) only and
passes a fixed set of element types, so the copy differs from the file in these ways, none of which changes what
the op computes:

* the node's domain is ``ai.onnx.contrib`` and its op type names the reference op and the input types;
* an int4 initializer goes in as its packed bytes (uint8, exactly the bytes TensorRT receives, low nibble first)
  and is unpacked by the reference's ``unpack_int4`` with the shape the ONNX tensor declares;
* a float16 initializer goes in as its bits (uint16) and is viewed back as float16;
* an activation goes in as float32 (exact for float16) and the output is cast back to the activation's type;
* an absent optional input goes in as an empty tensor and reaches the reference as ``None``;
* two string attributes are added (the node's name, the inputs' encodings); the node's own attributes reach the
  reference unchanged, ``plugin_version``/``plugin_namespace`` checked against the reference's VERSION/DOMAIN.

A Python exception inside an onnxruntime-extensions op ends the process, so the ops catch everything, return NaNs
and record the error; the runner raises it (``RehearsalError``) once ONNX Runtime returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import logging
from pathlib import Path

import numpy as np

import accullm_export
from accullm_export.errors import BackendError, UserError
from accullm_export.runtime.ort_runner import OrtCausalLM, _layout
from accullm_export.runtime.session import OPTIMIZATION_LEVELS
from accullm_export.safe_paths import inside

log = logging.getLogger(__name__)

PLUGIN_DOMAIN = "accullm"
INSTALL_HINT = "pip install 'accullm-export[rehearse]'"
_NODE_ATTRIBUTE, _INPUTS_ATTRIBUTE = "rehearsal_node", "rehearsal_inputs"
_ABSENT = "accullm_rehearsal/absent"


class RehearsalError(UserError):
    """A plugin node's reference refused its inputs or attributes: the plugin graph is mis-wired."""


@dataclasses.dataclass(frozen=True)
class PluginOp:
    """An ``accullm`` op and where its NumPy reference lives (``plugins/<folder>/reference.py``)."""

    op_type: str
    folder: str
    function: str


PLUGIN_OPS = {op.op_type: op for op in (PluginOp("OutlierSplitGemm", "outlier_split_gemm", "outlier_split_gemm"),
                                        PluginOp("SparseSkipMLP", "sparse_skip_mlp", "sparse_skip_mlp"))}
_REFERENCES: dict[str, object] = {}


def plugins_folder() -> Path:
    """The repository's plugins/ folder (the references are code of this installation, never of a bundle)."""
    return Path(accullm_export.__file__).resolve().parents[1] / "plugins"


def load_reference(op_type: str):
    """The reference module of an ``accullm`` op.

    Raises:
        UserError: no reference is known for ``op_type``.
        BackendError: the plugin sources are not beside this installation.
    """
    if op_type not in PLUGIN_OPS:
        raise UserError(f"no NumPy reference for {PLUGIN_DOMAIN}::{op_type}; known ops: {', '.join(PLUGIN_OPS)}")
    if op_type not in _REFERENCES:
        path = plugins_folder() / PLUGIN_OPS[op_type].folder / "reference.py"
        if not path.is_file():
            raise BackendError(f"the plugin references are not beside this installation ({path}); install "
                               "accullm-export from a source checkout (pip install -e .) to rehearse plugin graphs")
        spec = importlib.util.spec_from_file_location(f"accullm_rehearsal_{PLUGIN_OPS[op_type].folder}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _REFERENCES[op_type] = module
    return _REFERENCES[op_type]


# --- the custom ops --------------------------------------------------------------------------------------------

_FAILURES: dict[str, list[str]] = {}  # rehearsal id -> errors recorded by the ops during the current run
_REGISTERED: set[str] = set()
_SESSION_IDS = itertools.count()


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        raise UserError(f"rehearsing a plugin graph needs onnxruntime-extensions: {INSTALL_HINT}") from None
    return onnxruntime_extensions


def _decode(array: np.ndarray, encoding: str):
    """One input as the reference takes it, from what ONNX Runtime handed over (see the module docstring)."""
    if encoding == "absent":
        return None
    if encoding == "float16":
        return np.ascontiguousarray(array).view(np.float16)
    if encoding.startswith("int4:"):
        shape = tuple(int(size) for size in encoding[5:].split("x"))
        return load_reference("OutlierSplitGemm").unpack_int4(array, shape)
    return array


def _op_body(op: PluginOp):
    def body(*arrays, **attributes):
        rehearsal, node = attributes.pop(_NODE_ATTRIBUTE).split("|", 1)
        encodings = attributes.pop(_INPUTS_ATTRIBUTE).split(";")
        try:
            reference = load_reference(op.op_type)
            expected = {"plugin_version": str(reference.VERSION), "plugin_namespace": reference.DOMAIN}
            for name, value in expected.items():
                if name in attributes and attributes.pop(name) != value:
                    raise ValueError(f"attribute {name} is not {value!r}, the reference's")
            inputs = [_decode(array, encoding) for array, encoding in zip(arrays, encodings)]
            output = getattr(reference, op.function)(*inputs, **attributes)
            return np.asarray(output, dtype=np.float32)
        except Exception as error:  # an exception here would end the process (see the module docstring)
            _FAILURES.setdefault(rehearsal, []).append(f"{node}: {type(error).__name__}: {error}")
            return np.full(np.shape(arrays[0]), np.nan, dtype=np.float32)
    return body


def _register(name: str, op: PluginOp, input_types: list[str], attributes: dict[str, str]) -> None:
    """Register the Python op ``name`` once per process (registrations are global in onnxruntime-extensions)."""
    if name in _REGISTERED:
        return
    extensions = _extensions()
    kinds = extensions.PyCustomOpDef
    types = {kind: getattr(kinds, f"dt_{kind}") for kind in ("float", "uint8", "uint16", "int8", "int32", "int64",
                                                              "double", "string")}
    extensions.onnx_op(op_type=name, inputs=[types[kind] for kind in input_types], outputs=[kinds.dt_float],
                       attrs={key: types[kind] for key, kind in attributes.items()})(_op_body(op))
    _REGISTERED.add(name)


# --- the in-memory copy ----------------------------------------------------------------------------------------

# ONNX element type -> (the type handed to the Python op, the encoding the op decodes)
_INITIALIZER_TYPES = {"FLOAT": ("float", "plain"), "DOUBLE": ("double", "plain"), "INT8": ("int8", "plain"),
                      "UINT8": ("uint8", "plain"), "INT32": ("int32", "plain"), "INT64": ("int64", "plain"),
                      "FLOAT16": ("uint16", "float16"), "INT4": ("uint8", "int4")}
_ATTRIBUTE_TYPES = {"INT": "int64", "FLOAT": "float", "STRING": "string"}


@dataclasses.dataclass
class RehearsalModel:
    """The serialized copy, its external-data folder, and the plugin nodes it runs by reference (op -> count)."""

    model: bytes
    folder: Path
    plugin_ops: dict[str, int]
    rehearsal_id: str


def rehearsal_model(path: str | Path) -> RehearsalModel:
    """The copy of ``path`` that ONNX Runtime runs with the references (see the module docstring).

    Raises:
        UserError: the file is not an ONNX model, holds no ``accullm`` node, or a node's inputs or attributes are
            of a kind the references do not take; onnxruntime-extensions is missing.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not an ONNX model ({message})") from None
    rehearsal_id = f"r{next(_SESSION_IDS)}"
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    counts: dict[str, int] = {}
    nodes = []
    for node in graph.node:
        if node.domain != PLUGIN_DOMAIN:
            nodes.append(node)
            continue
        op = PLUGIN_OPS.get(node.op_type)
        if op is None:
            raise UserError(f"{path}: node {node.name} is {PLUGIN_DOMAIN}::{node.op_type}, which has no NumPy "
                            "reference")
        nodes += _rewrite_node(node, op, initializers, path, rehearsal_id)
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    if not counts:
        raise UserError(f"{path} holds no {PLUGIN_DOMAIN} plugin node: nothing to rehearse")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in initializers.values() if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if _ABSENT in used:
        graph.initializer.append(onnx.helper.make_tensor(_ABSENT, onnx.TensorProto.FLOAT, [0], []))
    domain = _extensions().default_opset_domain()
    imports = [entry for entry in model.opset_import if entry.domain not in (PLUGIN_DOMAIN, domain)]
    del model.opset_import[:]
    model.opset_import.extend([*imports, onnx.helper.make_opsetid(domain, 1)])
    return RehearsalModel(model=model.SerializeToString(), folder=path.parent, plugin_ops=counts,
                          rehearsal_id=rehearsal_id)


def _rewrite_node(node, op: PluginOp, initializers: dict, path: Path, rehearsal_id: str) -> list:
    """The Python-op node for ``node`` and the Casts around it (converted initializers join ``initializers``)."""
    import onnx

    handed = [_handed_input(node, index, name, initializers, path) for index, name in enumerate(node.input)]
    activations = [name for name, (_, _, encoding) in zip(node.input, handed) if encoding == "activation"]
    if not activations or len(node.output) != 1:
        raise UserError(f"{path}: {node.name} needs one activation input and one output to be rehearsed")
    casts = [onnx.helper.make_node("Cast", [name], [handed_name], name=f"{handed_name}/cast", to=onnx.TensorProto.FLOAT)
             for name, (handed_name, _, encoding) in zip(node.input, handed) if encoding == "activation"]
    input_types = [kind for _, kind, _ in handed]
    attributes, attribute_types = _attributes(node, path)
    attributes.update({_NODE_ATTRIBUTE: f"{rehearsal_id}|{node.name}",
                       _INPUTS_ATTRIBUTE: ";".join(encoding for _, _, encoding in handed)})
    attribute_types.update({_NODE_ATTRIBUTE: "string", _INPUTS_ATTRIBUTE: "string"})
    signature = repr((op.op_type, input_types, sorted(attribute_types.items())))
    op_name = f"{op.op_type}_{hashlib.sha256(signature.encode()).hexdigest()[:12]}"
    _register(op_name, op, input_types, attribute_types)
    output = f"{node.name}/rehearsal_output"
    python_op = onnx.helper.make_node(op_name, [name for name, _, _ in handed], [output], name=node.name,
                                      domain=_extensions().default_opset_domain(), **attributes)
    cast_back = onnx.helper.make_node("CastLike", [output, activations[0]], [node.output[0]],
                                      name=f"{output}/cast")
    return [*casts, python_op, cast_back]


def _handed_input(node, index: int, name: str, initializers: dict, path: Path) -> tuple[str, str, str]:
    """(tensor name, type handed to the Python op, encoding the op decodes) of one input of a plugin node."""
    import onnx

    if not name:
        return _ABSENT, "float", "absent"
    if name not in initializers:
        return f"{node.name}/rehearsal_input_{index}", "float", "activation"  # a Cast to float32 feeds it
    tensor = initializers[name]
    kind = onnx.TensorProto.DataType.Name(tensor.data_type)
    if kind not in _INITIALIZER_TYPES:
        raise UserError(f"{path}: input {index} of {node.name} is a {kind} tensor, which the rehearsal cannot "
                        f"hand to the reference ({', '.join(_INITIALIZER_TYPES)})")
    handed, encoding = _INITIALIZER_TYPES[kind]
    if encoding == "plain":
        return name, handed, encoding
    converted = initializers.get(f"{name}/rehearsal_{encoding}") or _reinterpreted(tensor, encoding, path)
    initializers[converted.name] = converted
    if encoding == "int4":
        encoding = "int4:" + "x".join(str(size) for size in tensor.dims)
    return converted.name, handed, encoding


def _attributes(node, path: Path) -> tuple[dict, dict]:
    """The node's attributes (name -> value) and their types as the Python op declares them."""
    import onnx

    values, types = {}, {}
    for attribute in node.attribute:
        kind = onnx.AttributeProto.AttributeType.Name(attribute.type)
        if kind not in _ATTRIBUTE_TYPES:
            raise UserError(f"{path}: attribute {attribute.name} of {node.name} is of type {kind}; the rehearsal "
                            "passes INT, FLOAT and STRING attributes")
        value = onnx.helper.get_attribute_value(attribute)
        values[attribute.name] = value.decode() if isinstance(value, bytes) else value
        types[attribute.name] = _ATTRIBUTE_TYPES[kind]
    return values, types


def _reinterpreted(tensor, encoding: str, path: Path):
    """A new initializer holding ``tensor``'s stored bytes as uint8 (int4, flat) or uint16 (float16, same dims)."""
    import onnx

    data = _stored_bytes(tensor, path)
    count = int(np.prod(tensor.dims))
    if len(data) != ((count + 1) // 2 if encoding == "int4" else 2 * count):
        raise UserError(f"{path}: tensor {tensor.name} of shape {list(tensor.dims)} stores {len(data)} bytes")
    name = f"{tensor.name}/rehearsal_{encoding}"
    if encoding == "int4":
        return onnx.helper.make_tensor(name, onnx.TensorProto.UINT8, [len(data)], data, raw=True)
    return onnx.helper.make_tensor(name, onnx.TensorProto.UINT16, list(tensor.dims), data, raw=True)


def _stored_bytes(tensor, path: Path) -> bytes:
    """The tensor's bytes as stored (raw_data, or its external-data range); typed fields are packed the ONNX way."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        source = inside(path.parent, entries.get("location", ""), named_by=path,
                        what=f"external data of tensor {tensor.name}")
        offset, length = int(entries.get("offset", 0)), entries.get("length")
        with open(source, "rb") as handle:
            handle.seek(offset)
            data = handle.read(int(length)) if length is not None else handle.read()
        return data
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    values = numpy_helper.to_array(tensor)
    if tensor.data_type == onnx.TensorProto.INT4:
        return load_reference("OutlierSplitGemm").pack_int4(values).tobytes()
    return np.ascontiguousarray(values).tobytes()


# --- the runner ------------------------------------------------------------------------------------------------

class RehearsalCausalLM(OrtCausalLM):
    """A plugin-graph decoder run by ONNX Runtime on the CPU, its ``accullm`` nodes by their NumPy references."""

    def __init__(self, model_path: Path, *, optimization: str = "basic", threads: int | None = None,
                 backend: str = "reference"):
        if backend != "reference":
            raise BackendError(f"the {backend!r} backend runs the plugin nodes by their CUDA kernels, which needs a "
                               "GPU and is not implemented here; tests/gpu/test_plugin_kernels.py compares the "
                               "kernels with the references")
        self.model_path = Path(model_path)
        self.folder = self.model_path.parent
        rehearsal = rehearsal_model(self.model_path)
        self.plugin_ops, self._rehearsal_id = rehearsal.plugin_ops, rehearsal.rehearsal_id
        self.session = _session(rehearsal, optimization, threads)
        self.layout = _layout(self.session, self.model_path)
        self._output_names = ["logits"] + [f"present.{i}.{kind}" for i in range(self.layout.num_layers)
                                           for kind in ("key", "value")]

    def forward(self, input_ids, attention_mask, position_ids, past):
        _FAILURES.pop(self._rehearsal_id, None)
        try:
            result = super().forward(input_ids, attention_mask, position_ids, past)
        except Exception:
            self._raise_failures()
            raise
        self._raise_failures()
        return result

    def _raise_failures(self) -> None:
        failures = _FAILURES.pop(self._rehearsal_id, None)
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise RehearsalError(f"{self.model_path}: the reference refused {failures[0]}{more}")


def _session(rehearsal: RehearsalModel, optimization: str, threads: int | None):
    """A CPU session of the copy with the onnxruntime-extensions library (where the Python ops live) registered."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise UserError(f"unknown optimization level {optimization!r}; choose from {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.register_custom_ops_library(_extensions().get_library_path())
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[optimization])
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(rehearsal.folder.resolve()))
    try:
        return ort.InferenceSession(rehearsal.model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph types
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"ONNX Runtime cannot load the rehearsal copy of {rehearsal.folder}: {message}") from None


_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}
