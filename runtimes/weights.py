"""One copy of a model's weights for every onnxruntime session of a compile.

A compile runs several CPU sessions over graphs that hold the same weights: the input model,
the fusion check's float model and latency variants, the calibration model, the compiled
artifact it verifies and the static targets' CPU references. Each session reading its own
model's data file, and prepacking its MatMul weights (a private copy of each), costs the weight
bytes again per session (a 538 MB model: 0.5 GB of anonymous memory per session).

`WeightPool` maps each external-data file once, read-only, and hands every session the same
arrays through `SessionOptions.add_initializer` (onnxruntime then reads the initializer from that
memory instead of loading it; prepacking is turned off, or the session would still keep its packed
copy). A tensor another file holds with the same name and the same bytes (the float copy kvcompile
stages, an artifact it wrote) is compared once, byte for byte, and then served from the first
file's pages: the weights are resident once, however many sessions or files hold them. Sessions
running a kernel whose unpacked path is slow (`NEEDS_PREPACKING`) keep prepacking.

A weight a MatMul reads through a Transpose (a tied lm_head reads the embedding that way) is read
as stored instead (`read_transposed_weights_in_place`): onnxruntime would fold the Transpose into a
transposed copy of the weight, private to each session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import ExternalDataInfo

# Element types onnxruntime takes from a numpy array without a copy (int4, bfloat16, float8 and
# strings are left for onnxruntime to load itself).
_SHAREABLE = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_,
}
_COMPARE_BLOCK = 1 << 24
# Kernels whose path without prepacked weights is several times slower: MatMulNBits (int4 weights)
# ran a SmolLM2 decode step at batch 12 in 1,213 ms unpacked against 184 ms packed. A session
# running one keeps prepacking (its packed copy of 4-bit weights is small); float MatMul does not
# need it (75.7 vs 49.2 ms a step, and its packed copy is the weights' size).
NEEDS_PREPACKING = {"MatMulNBits"}
# Below this a tensor is not worth a shared mapping (onnxruntime loads it itself).
MIN_SHARED_BYTES = 1024


@dataclass(frozen=True)
class _Location:
    """Where an external tensor's bytes are: a data file (resolved path, and which file is there
    now: a folder rebuilt at the same path holds another file) and a byte range."""
    file: str
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    offset: int
    length: int


@dataclass(frozen=True)
class SharedInitializers:
    """What a session takes from the pool: initializer name -> shared value, whether its
    kernels must prepack (NEEDS_PREPACKING), and the graph to load instead of the model's file
    when transposed weights are read in place (None: load the file)."""
    values: dict[str, ort.OrtValue]
    prepack: bool
    graph: bytes | None = None


@dataclass
class PoolStats:
    """What the pool holds: bytes mapped and bytes served to sessions from another file's copy."""
    tensors: int = 0
    mapped_bytes: int = 0
    aliased_tensors: int = 0
    aliased_bytes: int = 0


class WeightPool:
    """Shared, read-only weight arrays for CPU sessions (see the module docstring)."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, tuple[int, int, int, int]], np.memmap] = {}
        self._values: dict[_Location, ort.OrtValue] = {}
        self._by_name: dict[str, tuple[_Location, int, tuple[int, ...]]] = {}  # first location of each name
        self._alias: dict[_Location, _Location] = {}
        self.stats = PoolStats()

    def initializers(self, model_path: Path) -> SharedInitializers:
        """The shared values for `model_path`'s external initializers, and whether the session
        must prepack them."""
        proto = onnx.load(str(model_path), load_external_data=False)
        shared = {}
        for tensor in proto.graph.initializer:
            location = self._location(tensor, model_path.parent)
            if location is None:
                continue
            value = self._value(tensor, location)
            if value is not None:
                shared[tensor.name] = value
        ops = {node.op_type for node in proto.graph.node}
        graph = proto.SerializeToString() if read_transposed_weights_in_place(proto, set(shared)) else None
        return SharedInitializers(shared, prepack=bool(ops & NEEDS_PREPACKING), graph=graph)

    def _location(self, tensor: onnx.TensorProto, base: Path) -> _Location | None:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type not in _SHAREABLE:
            return None
        info = ExternalDataInfo(tensor)
        itemsize = np.dtype(_SHAREABLE[tensor.data_type]).itemsize
        length = info.length if info.length is not None and info.length > 0 else int(np.prod(tensor.dims)) * itemsize
        if length < MIN_SHARED_BYTES or info.offset % itemsize or length != int(np.prod(tensor.dims)) * itemsize:
            return None
        path = os.path.realpath(base / info.location)
        if not os.path.isfile(path) or os.path.getsize(path) < info.offset + length:
            return None  # onnxruntime reports a broken reference in its own words
        stat = os.stat(path)
        return _Location(path, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns), info.offset, length)

    def _value(self, tensor: onnx.TensorProto, location: _Location) -> ort.OrtValue | None:
        dims = tuple(int(d) for d in tensor.dims)
        source = self._alias.get(location, location)
        if source not in self._values:
            first = self._by_name.get(tensor.name)
            if first is not None and first[1] == tensor.data_type and first[2] == dims and \
                    first[0].length == location.length and first[0] != location and self._same_bytes(first[0], location):
                self._alias[location] = source = first[0]
                self.stats.aliased_tensors += 1
                self.stats.aliased_bytes += location.length
            else:
                self._values[location] = self._map(location, tensor.data_type, dims)
                self._by_name.setdefault(tensor.name, (location, tensor.data_type, dims))
                self.stats.tensors += 1
                self.stats.mapped_bytes += location.length
        return self._values[source]

    def _mapping(self, location: _Location) -> np.memmap:
        key = (location.file, location.identity)
        if key not in self._files:
            self._files[key] = np.memmap(location.file, dtype=np.uint8, mode="r")
        return self._files[key]

    def _map(self, location: _Location, data_type: int, dims: tuple[int, ...]) -> ort.OrtValue:
        raw = self._mapping(location)[location.offset : location.offset + location.length]
        return ort.OrtValue.ortvalue_from_numpy(raw.view(_SHAREABLE[data_type]).reshape(dims))

    def _same_bytes(self, pooled: _Location, other: _Location) -> bool:
        """Compare `other`'s bytes (read from its file, not mapped: they stay out of this
        process's resident memory) with the pooled tensor's."""
        mapped = self._mapping(pooled)
        block = bytearray(min(_COMPARE_BLOCK, other.length))
        with open(other.file, "rb") as f:
            f.seek(other.offset)
            done = 0
            while done < other.length:
                size = min(len(block), other.length - done)
                view = memoryview(block)[:size]
                if f.readinto(view) != size:
                    return False
                start = pooled.offset + done
                if not np.array_equal(np.frombuffer(view, dtype=np.uint8), mapped[start : start + size]):
                    return False
                done += size
        return True


def read_transposed_weights_in_place(proto: onnx.ModelProto, pooled: set[str]) -> int:
    """Matches MatMul(x, Transpose(W)) where W is a pooled 2-D float32 initializer and every
    reader of the Transpose is a MatMul taking it as its second input; rewrites each such MatMul
    to com.microsoft FusedMatMul(x, W, transB=1) and drops the Transpose. Returns how many
    Transposes it dropped.

    Why: onnxruntime's constant folding turns Transpose(initializer) into a new initializer, a
    transposed copy of the weight in each session, outside the pool. A tied lm_head reads the
    embedding that way: 113 MB per session for SmolLM2, 1.05 GB for a Llama-3.2-1B shape.
    FusedMatMul with transB reads the pooled weight as stored and computes the same product
    (identical logits, tests/test_weights.py). Only the session's copy of the graph changes; no
    file kvcompile writes does (float32 only: onnxruntime's CPU FusedMatMul has no float16 kernel)."""
    graph = proto.graph
    weights = {t.name for t in graph.initializer if t.name in pooled and len(t.dims) == 2
               and t.data_type == onnx.TensorProto.FLOAT} - {v.name for v in graph.input}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    dropped = []
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if node.op_type != "Transpose" or node.domain or node.input[0] not in weights or perm != [1, 0]:
            continue
        transposed = node.output[0]
        matmuls = readers.get(transposed, [])
        if transposed in outputs or not matmuls or any(
                m.op_type != "MatMul" or m.domain or list(m.input).count(transposed) != 1 or m.input[1] != transposed
                for m in matmuls):
            continue
        for matmul in matmuls:
            matmul.op_type, matmul.domain = "FusedMatMul", "com.microsoft"
            matmul.input[1] = node.input[0]
            matmul.attribute.append(onnx.helper.make_attribute("transB", 1))
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    if dropped and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(dropped)
