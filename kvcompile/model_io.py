"""Reading models safely and writing outputs atomically.

- `load_model` parses an ONNX file into an `onnx_ir.Model` without loading external data, after
  checking that every external-data location stays inside the model's folder (no absolute paths,
  no `..`, no symlinks out) and that the bytes it names exist.
- `save_model` writes a model deterministically, with external data when the input had it or the
  model is too large for one protobuf.

The output folder (checks, staging, the lock) is `kvcompile.output_dir`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from google.protobuf.message import DecodeError
from onnx.external_data_helper import _get_all_tensors

from kvcompile.errors import BadInputError

# Protobuf cannot hold more than 2 GiB; stay well below it before switching to external data.
INLINE_LIMIT_BYTES = 1 << 30


def _external_locations(proto: onnx.ModelProto) -> list[tuple[str, dict[str, str]]]:
    found = []
    for tensor in _get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            found.append((tensor.name, info))
    return found


def check_external_data(proto: onnx.ModelProto, model_dir: Path) -> list[Path]:
    """Refuse external-data locations that leave the model's folder; return the files used."""
    root = model_dir.resolve()
    files: dict[Path, int] = {}
    for name, info in _external_locations(proto):
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise BadInputError(
                f"tensor {name!r} points its external data at {location!r}, outside the model's "
                "folder; kvcompile only reads external data stored next to the model"
            )
        path = (model_dir / location).resolve()
        if not path.is_relative_to(root):
            raise BadInputError(
                f"tensor {name!r}: external data {location!r} is a link that leaves the model's "
                "folder; copy the data next to the model"
            )
        if not path.is_file():
            raise BadInputError(
                f"tensor {name!r}: external data file {location!r} is missing next to the model; "
                "copy it there (ONNX models above 2 GB keep their weights in such files)"
            )
        size = files.setdefault(path, path.stat().st_size)
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > size:
            raise BadInputError(
                f"tensor {name!r}: external data file {location!r} is truncated "
                f"({size} bytes, tensor needs {end}); re-export or re-copy the model"
            )
    return sorted(files)


def load_model(path: Path, check: bool = True) -> ir.Model:
    """Parse an ONNX model (external data stays on disk and is read lazily).

    `check=False` skips the graph checks (`check_graph`), for reloading a model the compile has
    already checked, e.g. once per variant `--scheme auto` measures; external data is always
    checked."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"model file {str(path)!r} does not exist")
    if not path.is_file():
        raise BadInputError(f"{str(path)!r} is not a file; pass the path of a .onnx model")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise BadInputError(f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node or not proto.graph.input:
        raise BadInputError(f"{str(path)!r} is not an ONNX model: it has no graph nodes or inputs")
    external = check_external_data(proto, path.parent)
    if check:
        check_graph(proto, path, checker=not external)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises a variety of errors on malformed protos
        raise BadInputError(f"{str(path)!r} holds a malformed ONNX graph: {exc}") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    _name_every_node(model)
    return model


def _name_every_node(model: ir.Model) -> None:
    """Give unnamed or duplicate-named nodes unique names (exporters may leave node names empty):
    the analysis records the nodes it found by name."""
    seen: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not node.name or node.name in seen:
            ir.passes.common.NameFixPass()(model)
            return
        seen.add(node.name)


def check_graph(proto: onnx.ModelProto, path: Path, checker: bool) -> None:
    """Refuse graphs that are not well formed before anything reads them: a value used before any
    node makes it (unsorted, dangling or cyclic edges), a graph output nothing produces, and, for
    self-contained models, whatever onnx's checker rejects (tensor sizes, attributes, schemas).
    Models with external data get the edge checks only: onnx's in-memory checker cannot resolve
    their data files, and its file checker would refuse the onnxruntime ops some exporters put in
    the ONNX domain."""
    graph = proto.graph
    defined = {""} | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        missing = next((name for name in node.input if name not in defined), None)
        if missing is not None:
            raise BadInputError(f"{str(path)!r} is not a valid ONNX graph: node {node.name or node.op_type!r} reads "
                                f"{missing!r}, which no earlier node, input or initializer defines; re-export it")
        defined.update(node.output)
    for output in graph.output:
        if output.name not in defined:
            raise BadInputError(f"{str(path)!r} is not a valid ONNX graph: output {output.name!r} is not produced "
                                "by any node; re-export it")
    if not checker:
        return
    patched = _structure_only(proto)
    for node in patched.graph.node:
        if node.domain == "" and node.op_type in ORT_OPS_IN_ONNX_DOMAIN:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in patched.opset_import):
        patched.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    try:
        onnx.checker.check_model(patched)
    except onnx.checker.ValidationError as exc:
        first = (str(exc).strip().splitlines() or ["invalid"])[0]
        raise BadInputError(f"{str(path)!r} is not a valid ONNX model ({first[:300]}); re-export it") from None


CHECKED_INITIALIZER_LIMIT = 1 << 16  # elements; larger initializers reach onnx's checker as typed inputs


def _structure_only(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model for onnx's checker with every large initializer replaced by a typed
    graph input: the checker sees every node, attribute and schema, and a model that keeps its
    weights inline (the TorchScript exporter's, up to 2 GB) is not copied twice more in memory.
    The replaced tensors' own data sizes are checked here instead (`_check_tensor_size`)."""
    patched = onnx.ModelProto(ir_version=proto.ir_version, producer_name=proto.producer_name,
                              producer_version=proto.producer_version, domain=proto.domain,
                              model_version=proto.model_version)
    patched.opset_import.extend(proto.opset_import)
    patched.functions.extend(proto.functions)
    graph, source = patched.graph, proto.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    for tensor in source.initializer:
        elements = 1
        for dim in tensor.dims:
            elements *= dim
        if elements <= CHECKED_INITIALIZER_LIMIT:
            graph.initializer.append(tensor)
        else:
            _check_tensor_size(tensor, elements)
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return patched


def _check_tensor_size(tensor: onnx.TensorProto, elements: int) -> None:
    """An inline tensor's data must hold exactly its dims' elements (what onnx's checker checks)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        raise BadInputError(f"initializer {tensor.name!r} has an unknown data type ({tensor.data_type}); "
                            "re-export the model") from None
    if tensor.HasField("raw_data"):
        held, expected = len(tensor.raw_data), elements * itemsize
    else:
        field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        held, expected = len(getattr(tensor, field)), elements
    if held != expected:
        raise BadInputError(f"initializer {tensor.name!r} holds {held} data entries for dims {list(tensor.dims)} "
                            f"(expected {expected}); the file is damaged or truncated: re-export it")


def model_files(path: Path) -> list[Path]:
    """The model file and the external-data files it reads (checked)."""
    proto = onnx.load(path, load_external_data=False)
    return [Path(path)] + check_external_data(proto, Path(path).parent)


def input_hash(path: Path) -> str:
    """sha256 over the model file and its external data, in a fixed order."""
    digest = hashlib.sha256()
    for file in model_files(path):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: Path, external_data: bool | None = None) -> list[Path]:
    """Write `model` to `path`; returns the files written. External data goes to `<name>.data`."""
    if external_data is None:
        external_data = initializer_bytes(model) > INLINE_LIMIT_BYTES or any(
            isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
        )
    if external_data:
        data_name = path.name + ".data"
        ir.save(model, path, external_data=data_name, size_threshold_bytes=1024)
        return [path, path.parent / data_name]
    ir.save(model, path)
    return [path]


def remove_model(path: Path) -> None:
    """Delete a model `save_model` wrote, its external data file (`<name>.data`) included: an
    intermediate model of a large input has one, and it must not stay in the output folder."""
    for file in (path, path.parent / (path.name + ".data")):
        file.unlink(missing_ok=True)


# onnxruntime contrib ops that exporters (the onnxruntime-genai builder) put in the ONNX domain,
# where onnx.checker has no schema for them.
ORT_OPS_IN_ONNX_DOMAIN = frozenset({"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"})


def check_onnx(path: Path) -> str:
    """Run onnx.checker on a written model; returns which check passed ("full" or "structural").

    The full check (with strict shape inference) is used whenever the model passes it. Models
    built by the onnxruntime-genai builder do not (onnxruntime ops in the ONNX domain, a Constant
    whose recorded shape disagrees with inference): they get the structural check, with those
    ops checked as the onnxruntime ops they are. onnxruntime loading the model is the final check.
    """
    try:
        onnx.checker.check_model(path, full_check=True)
        return "full"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        pass
    proto = onnx.load(path, load_external_data=False)
    for node in proto.graph.node:
        if node.domain == "" and node.op_type in ORT_OPS_IN_ONNX_DOMAIN:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    # Checked from a file next to the model so that its external data resolves.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx") as patched:
        onnx.save(proto, patched.name)
        onnx.checker.check_model(patched.name)
    return "structural"
