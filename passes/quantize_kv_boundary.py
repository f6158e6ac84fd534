"""Rewrite: store the KV cache as packed low-bit codes at the graph boundary.

What it matches
  For each cache tensor with a codec, the pattern the analysis found: the past input reaches a
  Concat that appends the new entries along the sequence axis, and that Concat becomes the
  present output,
      cat     = Concat(pre(past), new, axis=seq)  # attention (decomposed or an op) reads `cat`
      present = post(cat)                         # a graph output
  where `pre` and `post` are chains of copies (Cast, Identity) and Slices along the sequence
  axis: empty for most exports; a sliding-window cache keeps its last `window - 1` entries
  (`post` = Slice(-window+1:), and for some exporters `pre` too).

What it rewrites it to
      past_q    : graph input, uint8 codes packed along head_dim (same name as `past`)
      new_q     = encode(new)                               # quantize + pack (passes.kv_codec)
      present_q = post(Concat(pre(past_q), new_q, axis=seq)) # graph output (same name as `present`)
  with the Slices of `pre`/`post` repeated on the codes (they never touch head_dim); every
  reader of the float `past` (the Concat's chain, Shapes, masks) reads decode(past_q), computed
  once, and a Shape reader gets the logical shape computed from the packed one instead.
  Codecs with dynamic (per-token / per-group) scales also get `<past>_scale` (float16) and,
  asymmetric, `<past>_zero_point` (uint8) inputs, carried along the same chain into
  `<present>_scale` / `<present>_zero_point` outputs.

  Static graphs with `float_positions` P > 0 (slot mode): the last P of the past's positions are
  not codes but a float16 input `<past>_float_slots` (the runner's copies of the sink and newest
  tokens), so the codes input holds P positions fewer and every reader of the past reads
      past = Concat(decode(past_q), Cast(float_slots), axis=seq)
  (the same length as before: the exporter's shape arithmetic is untouched). An output
  `<present>_float`, the new entries in float16, is what the runner writes into those positions.

Why
  Concatenating in the code domain means every token is quantized exactly once, when it enters
  the cache, and old entries are never re-quantized (which matters once scales are dynamic).
  Attention reads every past entry as stored (4-bit), while the tokens being fed in this step
  attend to their own keys and values in float, which they hold anyway: quantization error only
  ever comes from the cache (as in HF QuantizedCache, and in the NPU form where the new K/V slot
  is computed in-graph next to the fixed buffer). This lowered the mean next-token KL by about
  30% at the same storage on the fixture. Caches without a codec are left in float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import KVGraph, KVTensor
from kvcompile.manifest import float_slots_name, new_float_name, packed_dims, param_shape, scale_name, zero_point_name
from kvcompile.passes.kv_codec import ONNX, Encoded, FragmentBuilder, emit_decode, emit_encode
from kvcompile.passes.conditions import ensure_stored_as, require_cache_inputs
from kvcompile.passes.constants import constant_ints
from kvcompile.passes.find_kv_cache import cache_nodes
from kvcompile.passes.names import NameAllocator
from kvcompile.quant import Codec

# Ops a chain between the cache and its Concat, or the Concat and the present output, may hold.
COPIES = frozenset({"Cast", "Identity"})
CHAIN_OPS = COPIES | {"Slice"}


class QuantizeKVBoundaryPass(ir.passes.InPlacePass):
    def __init__(self, kv: KVGraph, codecs: dict[str, Codec], slot_outputs: bool = False, style: str = ONNX,
                 float_positions: int = 0):
        """`slot_outputs`: the present outputs carry only the new tokens' entries (static NPU
        graphs, where the runner writes them into its fixed buffer) instead of the whole cache.
        `style`: the ops the codec is spelled with (passes.kv_codec). `float_positions`: slot
        mode only, past positions read from float16 copies instead of codes (module docstring)."""
        super().__init__()
        if float_positions and not slot_outputs:
            raise ValueError("float positions in the past are for static graphs (slot outputs)")
        self.kv = kv
        self.codecs = codecs
        self.slot_outputs = slot_outputs
        self.style = style
        self.float_positions = float_positions

    def _planned(self) -> list[KVTensor]:
        return [t for t in self.kv.tensors if self.codecs.get(t.past_input) is not None]

    def requires(self, model: ir.Model) -> None:
        """Every planned cache is a graph input; no codec is centered (that takes the fused
        kernel: `targets.base.legalize` re-plans a centered tensor for the Q/DQ form)."""
        require_cache_inputs(model, self._planned())
        centered = [t.label for t in self._planned() if self.codecs[t.past_input].center is not None]
        if centered:
            raise ValueError(f"the Q/DQ boundary does not take centered storage ({', '.join(centered)})")

    def ensures(self, model: ir.Model) -> None:
        ensure_stored_as(model, self._planned(), ir.DataType.UINT8)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for tensor in self.kv.tensors:
            codec = self.codecs.get(tensor.past_input)
            if codec is None:
                continue
            concat = cache_nodes(graph, tensor).concat
            if concat is None:
                raise UnsupportedModelError(
                    f"{tensor.label} ({tensor.past_input}) is kept by {tensor.attention} itself; the Q/DQ "
                    "boundary rewrite handles caches grown by a Concat. Attention ops that own the cache "
                    "are lowered by the fused path (--fuse-attention)"
                )
            self._rewrite(graph, names, tensor, concat, codec)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _rewrite(self, graph: ir.Graph, names: NameAllocator, tensor: KVTensor, concat: ir.Node, codec: Codec) -> None:
        past = next(v for v in graph.inputs if v.name == tensor.past_input)
        present = next(v for v in graph.outputs if v.name == tensor.present_output)
        pre, cache_index = _chain_to_concat(past, concat, tensor)
        post = _chain_to_present(concat.outputs[0], present, tensor)
        others = [i for i, v in enumerate(concat.inputs) if i != cache_index and v is not None]
        if len(others) != 1:
            raise UnsupportedModelError(f"{tensor.label}: the Concat that appends to the cache has {len(others)} "
                                        "new-entry operands, not one; describe the cache with --kv-map")
        new_entries = concat.inputs[others[0]]
        float_dtype = past.dtype
        new_dtype = new_entries.dtype if new_entries.dtype is not None else float_dtype
        logical = list(tensor.past_shape)
        seq = tensor.axes.seq

        coded_dims = list(past.shape.dims)
        if self.float_positions:
            if not isinstance(coded_dims[seq], int) or coded_dims[seq] <= self.float_positions:
                raise UnsupportedModelError(f"{tensor.label}: the static buffer ({coded_dims[seq]} positions) must be "
                                            f"longer than the {self.float_positions} float slots; raise --max-context")
            coded_dims[seq] -= self.float_positions
        past_stored = Encoded(_graph_value(names.name(f"{past.name}__packed"), ir.DataType.UINT8,
                                           packed_dims(coded_dims, tensor.axes.head_dim, codec.per_byte)))
        if codec.dynamic:
            param_dims = param_shape(past.shape.dims, tensor.axes.head_dim, codec.group)
            past_stored.scale = _graph_value(_io_name(names, scale_name(past.name)), ir.DataType.FLOAT16, param_dims)
            if not codec.symmetric:
                past_stored.zero_point = _graph_value(_io_name(names, zero_point_name(past.name)), ir.DataType.UINT8,
                                                      param_dims)

        # The new entries are encoded, appended in the code domain and carried to the output.
        builder = FragmentBuilder(graph, names, f"kvcompile/{tensor.label}")
        new = emit_encode(builder, new_entries, codec, new_dtype, logical, self.style)
        if self.float_positions:
            self._float_output(graph, names, tensor, concat, new_entries, present)
        if self.slot_outputs:
            present_stored = new
        else:
            operands = [None] * len(concat.inputs)
            operands[cache_index] = _mirror(builder, pre, past_stored)
            operands[others[0]] = new
            joined = Encoded(*(builder.op("Concat", [getattr(o, part) for o in operands], axis=seq)
                               if getattr(new, part) is not None else None
                               for part in ("codes", "scale", "zero_point")))
            present_stored = _mirror(builder, post, joined)
        graph.insert_after(present.producer(), builder.nodes)

        # Every float reader of the past cache reads it decoded (decoded once).
        self._redirect_readers(graph, names, past, past_stored, tensor, codec)

        present_dims = list(present.shape.dims) if present.shape is not None else list(logical)
        if self.slot_outputs:
            present_dims[seq] = new_entries.shape.dims[seq] if new_entries.shape is not None else 1
        present_stored.codes.type = ir.TensorType(ir.DataType.UINT8)
        present_stored.codes.shape = ir.Shape(packed_dims(present_dims, tensor.axes.head_dim, codec.per_byte))
        graph.outputs[graph.outputs.index(present)] = present_stored.codes
        graph.inputs[graph.inputs.index(past)] = past_stored.codes

        input_name, output_name = past.name, present.name
        names.rename(past, f"{input_name}__float")
        names.rename(present, f"{output_name}__float")
        past_stored.codes.name, present_stored.codes.name = input_name, output_name
        for kind, past_param, present_param in (
            ("scale", past_stored.scale, present_stored.scale),
            ("zero_point", past_stored.zero_point, present_stored.zero_point),
        ):
            if past_param is None:
                continue
            present_param.name = _io_name(names, f"{output_name}_{kind}")
            present_param.type = past_param.type
            present_param.shape = ir.Shape(param_shape(present_dims, tensor.axes.head_dim, codec.group))
            graph.inputs.append(past_param)
            graph.outputs.append(present_param)

    def _float_output(self, graph: ir.Graph, names: NameAllocator, tensor: KVTensor, concat: ir.Node,
                      new_entries: ir.Value, present: ir.Value) -> None:
        """`<present>_float`: the new entries in float16, for the runner to write into the float
        positions the static graph reads (module docstring)."""
        builder = FragmentBuilder(graph, names, f"kvcompile/{tensor.label}/float_slots")
        new_float = builder.op("Cast", [new_entries], to=ir.DataType.FLOAT16)
        new_float.name = _io_name(names, new_float_name(present.name))
        dims = [1 if d == "batch" else d for d in tensor.past_shape]
        dims[tensor.axes.seq] = new_entries.shape.dims[tensor.axes.seq] if new_entries.shape is not None else 1
        new_float.type, new_float.shape = ir.TensorType(ir.DataType.FLOAT16), ir.Shape(dims)
        graph.insert_before(concat, builder.nodes)
        graph.outputs.append(new_float)

    def _with_float_positions(self, graph: ir.Graph, builder: FragmentBuilder, names: NameAllocator,
                              tensor: KVTensor, past: ir.Value, decoded: ir.Value) -> ir.Value:
        """The decoded codes followed by the `<past>_float_slots` input: the whole past."""
        dims = list(past.shape.dims)
        dims[tensor.axes.seq] = self.float_positions
        slots = _graph_value(_io_name(names, float_slots_name(past.name)), ir.DataType.FLOAT16, dims)
        graph.inputs.append(slots)
        return builder.op("Concat", [decoded, builder.op("Cast", [slots], to=past.dtype)], axis=tensor.axes.seq)

    def _redirect_readers(self, graph: ir.Graph, names: NameAllocator, past: ir.Value, past_stored: Encoded,
                          tensor: KVTensor, codec: Codec) -> None:
        """Readers of the float `past`: a Shape gets the logical shape computed from the packed one
        (no data touched); everything else reads the cache decoded once, before its first reader."""
        uses = list(past.uses())
        order = {id(node): i for i, node in enumerate(graph)}
        first = min((u.node for u in uses), key=lambda node: order[id(node)])
        builder = FragmentBuilder(graph, names, f"kvcompile/{tensor.label}/past")
        decoded = None
        for use in uses:
            if use.node.op_type == "Shape" and not self.float_positions:
                start = use.node.attributes["start"].as_int() if "start" in use.node.attributes else 0
                end = use.node.attributes["end"].as_int() if "end" in use.node.attributes else None
                stored_shape = builder.op("Shape", [past_stored.codes], **{
                    k: a.as_int() for k, a in use.node.attributes.items() if k in ("start", "end")})
                factor = np.ones(tensor.rank, np.int64)
                factor[tensor.axes.head_dim] = codec.per_byte
                logical_shape = builder.op("Mul", [stored_shape, builder.const(factor[start:end], "factor")])
                use.node.outputs[0].replace_all_uses_with(logical_shape, replace_graph_outputs=True)
            else:
                if decoded is None:
                    decoded = emit_decode(builder, past_stored, codec, list(tensor.past_shape), past.dtype, self.style)
                    if self.float_positions:
                        decoded = self._with_float_positions(graph, builder, names, tensor, past, decoded)
                use.node.replace_input_with(use.idx, decoded)
        graph.insert_before(first, builder.nodes)
        for use in uses:
            if use.node.op_type == "Shape" and not use.node.outputs[0].uses():
                graph.remove(use.node, safe=True)


def _chain_to_concat(past: ir.Value, concat: ir.Node, tensor: KVTensor) -> tuple[list[ir.Node], int]:
    """The nodes from the past input to the Concat operand it becomes, and that operand's index."""
    for index, operand in enumerate(concat.inputs):
        chain, value = [], operand
        while value is not None and value is not past:
            node = value.producer()
            if node is None or node.op_type not in CHAIN_OPS:
                break
            chain.insert(0, node)
            value = node.inputs[0]
        if value is past:
            _check_chain(chain, tensor, "the past cache input and its Concat")
            return chain, index
    raise UnsupportedModelError(
        f"{tensor.label}: between {tensor.past_input!r} and the Concat that appends to it sit ops other than "
        f"{', '.join(sorted(CHAIN_OPS))}; kvcompile can only carry packed codes through those. Describe the "
        "cache with --kv-map or re-export")


def _chain_to_present(concat_output: ir.Value, present: ir.Value, tensor: KVTensor) -> list[ir.Node]:
    """The nodes from the Concat's output to the present graph output."""
    chain, value = [], present
    while value is not concat_output:
        node = value.producer()
        if node is None or node.op_type not in CHAIN_OPS:
            raise UnsupportedModelError(
                f"{tensor.label}: the present cache {tensor.present_output!r} is made from the appended cache by "
                f"{node.op_type if node is not None else 'nothing'}, not by copies or Slices along the sequence; "
                "describe the cache with --kv-map")
        chain.insert(0, node)
        value = node.inputs[0]
    _check_chain(chain, tensor, "the appended cache and the present output")
    return chain


def _check_chain(chain: list[ir.Node], tensor: KVTensor, where: str) -> None:
    """Slices in a chain must leave head_dim (the packed axis) whole: their axes are constants
    naming other axes."""
    for node in chain:
        if node.op_type != "Slice":
            continue
        starts = node.inputs[1] if len(node.inputs) > 1 else None
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        if axes is not None:
            listed = constant_ints(axes)
        elif starts is not None and starts.shape is not None and isinstance(starts.shape.dims[0], int):
            listed = list(range(starts.shape.dims[0]))
        else:
            listed = None
        if listed is None or tensor.axes.head_dim in [a % tensor.rank for a in listed]:
            raise UnsupportedModelError(
                f"{tensor.label}: a Slice between {where} ({node.name}) may cut head_dim, the axis kvcompile packs "
                "the codes along; describe the cache with --kv-map or re-export")


def _mirror(builder: FragmentBuilder, chain: list[ir.Node], stored: Encoded) -> Encoded:
    """Apply the chain's Slices (same parameters) to the codes and their per-token parameters;
    copies (Cast, Identity) do not apply to codes."""
    for node in chain:
        if node.op_type == "Slice":
            stored = Encoded(*(builder.op("Slice", [part, *node.inputs[1:]]) if part is not None else None
                               for part in (stored.codes, stored.scale, stored.zero_point)))
    return stored


def _io_name(names: NameAllocator, name: str) -> str:
    """A graph I/O name the manifest derives from a cache name: it must be exactly `name`."""
    if names.name(name) != name:
        raise UnsupportedModelError(f"the model already has a value named {name!r}, the name kvcompile gives a "
                                    "stored cache's scales; rename it in the export")
    return name


def _graph_value(name: str, dtype: ir.DataType, dims) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
