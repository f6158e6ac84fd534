"""Rewrite: store keys and values in a changed basis of head_dim, exactly in float.

What it matches
  For each chosen cache tensor of decomposed attention: the Concat that appends the new entries
  and the MatMul that reads the cache (Q.K^T for keys, P.V for values), from the analysis.

What it rewrites, for an invertible per-KV-head transform M (d x d)
  keys:    new' = new M (along head_dim)   and   q' = q M^-T  before Q.K^T
  values:  new' = new M (along head_dim)   and   o  = (P.V') M^-1  after P.V
  q'.k'^T = q M^-T M^T k^T = q.k^T and (P.V M) M^-1 = P.V: the float model computes the same
  function (tested: logits unchanged). Query heads use the transform of the KV head they read
  (grouped-query attention). Keys are transformed after RoPE (the new entries are the cached,
  post-RoPE keys), so RoPE itself is untouched. Every added op acts on the new token or the
  query only (O(d^2) or O(d) per head), never on the cache.

Two transforms are used:
  - rotation (`--rotate hadamard`): M = H, a normalised Hadamard matrix. It spreads every
    channel's energy over all channels, so outlier channels no longer force a wide range on a
    per-tensor or per-token grid (QuaRot, SpinQuant).
  - scale folding (`--fold-scales`): M = diag(1 / s) with s the per-channel scales. The cache
    then holds k / s, which one per-tensor scale of 1.0 quantizes exactly as the per-channel
    scales s would: per-channel quality on targets that only take per-tensor Q/DQ (QNN HTP).
    Keys are transformed after RoPE, so s need not respect RoPE's channel pairs.
  Diagonal transforms are applied with Mul, others with MatMul.

Keys may also be shifted first: new' = (new - c) M, with c a per-channel center (static graphs:
`targets.static`). No reader-side change is needed: every score of one query moves by the same
q'.(c M), and softmax ignores a per-query constant. Values are never shifted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, KVGraph, KVTensor
from kvcompile.passes.kv_codec import FragmentBuilder
from kvcompile.passes.conditions import require_cache_inputs
from kvcompile.passes.find_kv_cache import CacheNodes, cache_nodes
from kvcompile.passes.manager import shapes_inferred
from kvcompile.passes.names import NameAllocator


def hadamard(size: int) -> np.ndarray:
    """Normalised Sylvester-Hadamard matrix (orthonormal and symmetric); size a power of two."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {size}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return (matrix / np.sqrt(size)).astype(np.float32)


@dataclass(frozen=True)
class KVTransform:
    """Per KV head: a full matrix [H, d, d] or a diagonal [H, d] (new' = new * diagonal), either
    after an optional shift [H, d] (keys only: new' = (new - shift) M)."""

    matrix: np.ndarray | None = None
    diagonal: np.ndarray | None = None
    shift: np.ndarray | None = None

    @property
    def shift_only(self) -> bool:
        return self.matrix is None and self.diagonal is None

    @staticmethod
    def rotation(tensor: KVTensor) -> "KVTransform":
        if tensor.head_dim & (tensor.head_dim - 1):
            raise UnsupportedModelError(
                f"--rotate hadamard needs head_dim to be a power of two; this model's is {tensor.head_dim}"
            )
        return KVTransform(matrix=np.broadcast_to(hadamard(tensor.head_dim), (tensor.num_heads, tensor.head_dim, tensor.head_dim)).copy())

    @staticmethod
    def scaling(scale: np.ndarray) -> "KVTransform":
        """Divide channel c of head h by scale[h, c]."""
        return KVTransform(diagonal=(1.0 / scale).astype(np.float32))

    def reader_side(self, kind: str) -> "KVTransform":
        """What the query (keys: M^-T) or the attention output (values: M^-1) is multiplied by
        (a shift needs nothing: see the module docstring)."""
        if self.diagonal is not None:
            return KVTransform(diagonal=(1.0 / self.diagonal).astype(np.float32))
        inverse = np.linalg.inv(self.matrix.astype(np.float64))
        return KVTransform(matrix=(np.swapaxes(inverse, -1, -2) if kind == "key" else inverse).astype(np.float32))


class TransformKVPass(ir.passes.InPlacePass):
    def __init__(self, kv: KVGraph, transforms: dict[str, KVTransform]):
        super().__init__()
        self.kv = kv
        self.transforms = transforms

    def requires(self, model: ir.Model) -> None:
        """The caches to transform are graph inputs. Run after `manager.shapes_inferred()`: the
        number of query heads is read from the query's shape."""
        require_cache_inputs(model, [t for t in self.kv.tensors if t.past_input in self.transforms])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        for tensor in self.kv.tensors:
            transform = self.transforms.get(tensor.past_input)
            if transform is None:
                continue
            located = cache_nodes(graph, tensor)
            if tensor.attention != DECOMPOSED or located.reader is None or located.concat is None:
                raise UnsupportedModelError(
                    f"{tensor.label}: --rotate / --fold-scales need decomposed attention (the cache "
                    f"is read by {tensor.attention}, which applies RoPE inside the op)"
                )
            self._transform(graph, names, tensor, located, transform)
        return ir.passes.PassResult(model, modified=bool(self.transforms))

    def _transform(self, graph: ir.Graph, names: NameAllocator, tensor: KVTensor, located: CacheNodes,
                   transform: KVTransform) -> None:
        concat, reader, operand = located.concat, located.reader, located.reader_operand
        dtype = next(v for v in graph.inputs if v.name == tensor.past_input).dtype
        numpy_dtype = np.float16 if dtype == ir.DataType.FLOAT16 else np.float32
        # The past may reach the Concat through ops (a sliding-window cache's Slice, a Cast): the
        # new entries are the other operand, not whatever is not named like the past input.
        new_index = next(i for i, v in enumerate(concat.inputs) if v is not None and i != located.cache_operand)
        builder = FragmentBuilder(graph, names, f"kvcompile/{tensor.label}/transform")
        new_entries = concat.inputs[new_index]
        if transform.shift is not None:
            if tensor.kind != "key":
                raise ValueError(f"{tensor.label}: only keys can be shifted (softmax ignores a per-query constant)")
            new_entries = _subtract(builder, new_entries, transform.shift, tensor.num_heads, tensor.rank,
                                    tensor.axes.heads, tensor.axes.head_dim, numpy_dtype)
        if not transform.shift_only:
            new_entries = _apply(builder, new_entries, transform, tensor.num_heads, tensor.rank,
                                 tensor.axes.heads, tensor.axes.head_dim, numpy_dtype)
        graph.insert_before(concat, builder.nodes)
        concat.replace_input_with(new_index, new_entries)
        if transform.shift_only:
            return

        other = reader.inputs[1 - operand] if tensor.kind == "key" else reader.outputs[0]
        heads = _query_heads(other, tensor)
        side = _expand_to_query_heads(transform.reader_side(tensor.kind), tensor.num_heads, heads)
        rank = other.shape.rank() if other.shape is not None else tensor.rank
        builder = FragmentBuilder(graph, names, f"kvcompile/{tensor.label}/transform_reader")
        # The query and the attention output carry head_dim last, heads at axis 1 (if any).
        heads_axis = 1 if heads > 1 or tensor.axes.heads is not None else None
        if tensor.kind == "key":
            adjusted = _apply(builder, other, side, heads, rank, heads_axis, rank - 1, numpy_dtype)
            graph.insert_before(reader, builder.nodes)
            reader.replace_input_with(1 - operand, adjusted)
        else:
            readers = list(other.uses())
            adjusted = _apply(builder, other, side, heads, rank, heads_axis, rank - 1, numpy_dtype)
            graph.insert_after(reader, builder.nodes)
            for use in readers:
                use.node.replace_input_with(use.idx, adjusted)


def _query_heads(value: ir.Value, tensor: KVTensor) -> int:
    """Number of heads on the query / attention-output side (more than KV heads under GQA)."""
    if tensor.axes.heads is None:
        return 1
    dims = value.shape.dims if value.shape is not None else ()
    heads = dims[1] if len(dims) == 4 else None
    if not isinstance(heads, int):
        if tensor.num_heads == 1:
            return 1
        raise UnsupportedModelError(
            f"{tensor.label}: cannot tell how many query heads read this cache (shape of "
            f"{value.name!r} unknown); --rotate / --fold-scales need it"
        )
    if heads % tensor.num_heads:
        raise UnsupportedModelError(f"{tensor.label}: {heads} query heads do not group over {tensor.num_heads} KV heads")
    return heads


def _expand_to_query_heads(transform: KVTransform, kv_heads: int, query_heads: int) -> KVTransform:
    """Query head h reads KV head h // (query_heads / kv_heads)."""
    repeat = query_heads // kv_heads
    if transform.diagonal is not None:
        return KVTransform(diagonal=np.repeat(transform.diagonal, repeat, axis=0))
    return KVTransform(matrix=np.repeat(transform.matrix, repeat, axis=0))


def _subtract(builder: FragmentBuilder, x: ir.Value, shift: np.ndarray, heads: int, rank: int,
              heads_axis: int | None, head_dim_axis: int, dtype) -> ir.Value:
    """x - shift_h along head_dim, head by head."""
    shape = [1] * rank
    shape[head_dim_axis] = shift.shape[-1]
    if heads_axis is not None:
        shape[heads_axis] = heads
    values = shift.reshape(heads if heads_axis is not None else 1, -1)
    return builder.op("Sub", [x, builder.const(values.reshape(shape).astype(dtype), "center")])


def _apply(builder: FragmentBuilder, x: ir.Value, transform: KVTransform, heads: int, rank: int,
           heads_axis: int | None, head_dim_axis: int, dtype) -> ir.Value:
    """x transformed along head_dim, head by head (x M_h, or x * diagonal_h)."""
    if transform.diagonal is not None:
        shape = [1] * rank
        shape[head_dim_axis] = transform.diagonal.shape[-1]
        if heads_axis is not None:
            shape[heads_axis] = heads
        diagonal = transform.diagonal.reshape(heads if heads_axis is not None else 1, -1)
        return builder.op("Mul", [x, builder.const(diagonal.reshape(shape).astype(dtype), "diagonal")])
    matrices = transform.matrix if heads_axis is not None else transform.matrix[:1]
    if head_dim_axis == rank - 1:  # [..., heads, seq, d] @ [heads, d, d]
        shape = [1] * (rank - 2) + list(matrices.shape[-2:])
        if heads_axis is not None:
            shape[heads_axis] = heads
        return builder.op("MatMul", [x, builder.const(matrices.reshape(shape).astype(dtype), "matrix")])
    # head_dim before seq (keys stored transposed): M^T @ x
    transposed = np.swapaxes(matrices, -1, -2)
    shape = [1] * (rank - 2) + list(transposed.shape[-2:])
    if heads_axis is not None:
        shape[heads_axis] = heads
    return builder.op("MatMul", [builder.const(transposed.reshape(shape).astype(dtype), "matrix"), x])


def transform_passes(kv: KVGraph, transforms: dict[str, KVTransform]) -> list[ir.passes.PassBase]:
    """Shapes inferred (the query heads), then the caches transformed."""
    return [*shapes_inferred(), TransformKVPass(kv, transforms)]
