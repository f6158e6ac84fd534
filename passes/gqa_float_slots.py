"""Rewrite: attention-sink and recent tokens read in float by a 4-bit GroupQueryAttention.

What it matches
  Every `com.microsoft.GroupQueryAttention` node whose cache `QuantizeGQACachePass` switched to
  4 bits, where the node takes keys already rotated and apart from Q and V (`do_rotary = 0`,
  not packed QKV: the same condition as centered keys), without softcap or a local window.

What it rewrites
  Next to the 4-bit cache, a float copy of the keys and values of a fixed number of positions:
  the first `sinks` (attention sinks) and the newest `recent` (the current token included).
  Two new graph inputs and outputs per layer (`<past key>_kv_sink`, `<past key>_kv_recent`, and
  `<present key>_kv_...`): keys and values stacked along the heads axis, keys first,
  [batch, 2 * kv_heads, n, head_dim], float16 whatever the model's float type
  (the bytes a phone would keep; rounding to float16 is far below 4-bit error), the keys as the
  node takes them, i.e. centered if the plan centers them). The node also returns its attention
  probabilities (`qk_output = 2`, [batch, heads, q_len, total]), and its output is corrected so
  that those positions count with their float keys and values:

      F     = positions [0, min(sinks, T)) and [T - m, T), m = min(recent, max(0, T - sinks))
      r_i   = exp(scale * q . (k_i - k^_i))         i in F; k^ = the 4-bit key the kernel read
      out*  = (out - sum_F p_i v^_i + sum_F p_i r_i v_i) / (1 + sum_F p_i (r_i - 1))

  which is exactly attention over the cache with the positions in F in float16 (p_i are the
  kernel's probabilities, normalised by its own sum; multiplying out both sums by it gives the
  float-slot attention). The cost is O(|F|) per query, not O(T): the kernel still streams the
  4-bit cache and nothing else is dequantized but the |F| positions. What a decode step pays is
  moving the slots and onnxruntime's per-node overhead, so keys and values share every op and the
  slot positions are computed once for all layers (from T: every batch row holds T positions, as
  kvcompile's runners feed them).

Why
  On SmolLM2 (`python -m bench.storage_sweep --window 1024 --windows 4 --sinks 4 --recent R`)
  keeping 4 sink and the newest 32 / 128 positions in float took centered 4-bit keys with
  symmetric 4-bit values from +6.42% to +2.60% / +1.52% perplexity (KL 0.099 -> 0.025 / 0.014):
  the error that adds up over 30 layers is mostly in the few positions that receive most of the
  attention. Compiled with 4 + 128, SmolLM2's default went from +6.01% to +0.89% (README). A
  fixed number of float slots is a fixed number of bytes, whatever the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import KVGraph, KVTensor
from kvcompile.manifest import slot_name
from kvcompile.passes.find_kv_cache import key_centering_error
from kvcompile.passes.kv_codec import Encoded, FragmentBuilder, emit_decode
from kvcompile.passes.names import NameAllocator
from kvcompile.passes.quantize_gqa import PRESENT_SLOTS, cache_attention_nodes
from kvcompile.quant import Codec

QUERY_INPUT, KEY_INPUT, VALUE_INPUT = 0, 1, 2
PROBABILITIES = 2  # qk_output: the softmax of the scores, [batch, heads, q_len, total]
INT64_MAX = np.iinfo(np.int64).max
SLOT_DTYPE = ir.DataType.FLOAT16  # what the slots are stored as, whatever the model's float type


def float_slots_error(node: ir.Node) -> str | None:
    """Why this GroupQueryAttention cannot take float slots (None if it can)."""
    reason = key_centering_error(node)
    if reason is not None:
        return reason
    for attribute in ("softcap", "local_window_size"):
        value = node.attributes.get(attribute)
        if value is not None and value.value not in (0, 0.0, -1):
            return f"it sets {attribute}"
    return None


def float_slot_layers(model: ir.Model, kv: KVGraph) -> set[int]:
    """Layers whose GroupQueryAttention can read float slots (`float_slots_error` is None)."""
    return {tensors["key"].layer for node, tensors in cache_attention_nodes(model.graph, kv)
            if float_slots_error(node) is None}


@dataclass
class _Positions:
    """Where the slots are with T positions cached after this step (the same for every layer:
    computed once, at the first node, from its present cache)."""

    sinks: ir.Value  # [1]: min(sinks, T)
    recent: ir.Value  # [1]: m = min(recent, max(0, T - sinks))
    tail: ir.Value  # [1]: T - m, the first recent position
    joined_end: ir.Value | None = None  # [1]: length of past slots + new entries (set at the first node)


class GQAFloatSlotsPass(ir.passes.InPlacePass):
    def __init__(self, kv: KVGraph, codecs: dict[str, Codec], sinks: int, recent: int):
        super().__init__()
        self.kv = kv
        self.codecs = codecs
        self.sinks = sinks
        self.recent = recent

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        positions = None
        for node, tensors in cache_attention_nodes(graph, self.kv):
            if any(self.codecs.get(t.past_input) is None for t in tensors.values()):
                continue
            reason = float_slots_error(node)
            if reason is not None:
                raise UnsupportedModelError(f"layer {tensors['key'].layer}: float sink and recent slots need "
                                            f"GroupQueryAttention's keys after RoPE ({reason}); use --float-slots 0 0")
            positions = self._rewrite(graph, names, node, tensors, positions)
        return ir.passes.PassResult(model, modified=positions is not None)

    def _positions(self, b: FragmentBuilder, present: ir.Value) -> _Positions:
        total = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [present]), b.const(np.int64(2), "axis")]),
                                   b.ints(0)])
        recent = b.op("Min", [b.ints(self.recent), b.op("Max", [b.ints(0), b.op("Sub", [total, b.ints(self.sinks)])])])
        return _Positions(b.op("Min", [b.ints(self.sinks), total]), recent, b.op("Sub", [total, recent]))

    def _rewrite(self, graph: ir.Graph, names: NameAllocator, node: ir.Node, tensors: dict[str, KVTensor],
                 positions: _Positions | None) -> _Positions:
        key, value = tensors["key"], tensors["value"]
        heads = node.attributes["num_heads"].as_int()
        kv_heads, head_dim = key.num_heads, key.head_dim
        scale_attr = node.attributes.get("scale")
        scale = scale_attr.as_float() if scale_attr is not None and scale_attr.as_float() != 0 else head_dim ** -0.5
        float_dtype = ir.DataType.FLOAT16 if key.dtype == "float16" else ir.DataType.FLOAT
        b = FragmentBuilder(graph, names, f"kvcompile/L{key.layer}/float_slots")

        node.attributes["qk_output"] = ir.AttrInt64("qk_output", PROBABILITIES)
        if len(node.outputs) < 4:  # outputs are fixed at construction: rebuild with a fourth
            node = _with_probabilities_output(graph, node)
        probabilities = node.outputs[3]
        probabilities.name = names.name(f"kvcompile/L{key.layer}/attention_probabilities")
        output = node.outputs[0]
        uses = list(output.uses())
        was_graph_output = output in graph.outputs
        if positions is None:
            positions = self._positions(b, node.outputs[PRESENT_SLOTS["key"]])

        def at_slots(x: ir.Value, axis: int) -> ir.Value:
            """x's entries at positions F along `axis` (x holds every position 0..T-1 there)."""
            axes = b.ints(axis)
            first = b.op("Slice", [x, b.ints(0), positions.sinks, axes])
            last = b.op("Slice", [x, positions.tail, b.ints(INT64_MAX), axes])
            return b.op("Concat", [first, last], axis=axis)

        # Keys and values go together, stacked along the heads axis (keys first): one slot tensor of
        # each kind per layer, [B, 2 * kv_heads, n, D], and every op below runs once for both.
        both = 2 * kv_heads
        new = b.op("Concat", [node.inputs[KEY_INPUT], node.inputs[VALUE_INPUT]], axis=2)
        new = b.op("Transpose", [b.op("Reshape", [new, b.ints(0, 0, both, head_dim)])], perm=[0, 2, 1, 3])
        pasts = [_graph_input(graph, slot_name(key.past_input, part), both, head_dim) for part in ("sink", "recent")]
        joined = b.op("Concat", [*(_cast(b, past, SLOT_DTYPE, float_dtype) for past in pasts), new], axis=2)
        if positions.joined_end is None:  # past slots + new entries: the same length in every layer
            positions.joined_end = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [joined]),
                                                                      b.const(np.int64(2), "axis")]), b.ints(0)])
        parts = {"sink": b.op("Slice", [joined, b.ints(0), b.ints(self.sinks), b.ints(2)]),
                 "recent": b.op("Slice", [joined, b.op("Sub", [positions.joined_end, positions.recent]),
                                          b.ints(INT64_MAX), b.ints(2)])}
        stored_slots = []
        for part, entries in parts.items():
            stored = _cast(b, entries, float_dtype, SLOT_DTYPE)
            stored.name = names.name(slot_name(key.present_output, part))
            stored.type, stored.shape = ir.TensorType(SLOT_DTYPE), ir.Shape(["batch", both, f"{part}_seq", head_dim])
            graph.outputs.append(stored)
            stored_slots.append(stored)
        floats = _cast(b, b.op("Concat", stored_slots, axis=2), SLOT_DTYPE, float_dtype)  # [B, 2 kv_heads, |F|, D]
        codes = b.op("Concat", [at_slots(node.outputs[PRESENT_SLOTS[kind]], axis=2) for kind in ("key", "value")],
                     axis=1)
        codec = _stacked_codec(self.codecs[key.past_input], self.codecs[value.past_input], kv_heads, head_dim)
        read = emit_decode(b, Encoded(codes), codec, ["batch", both, "slots", head_dim], float_dtype)

        def keys(x: ir.Value) -> ir.Value:
            return b.op("Slice", [x, b.ints(0), b.ints(kv_heads), b.ints(1)])

        def values(x: ir.Value) -> ir.Value:
            return b.op("Slice", [x, b.ints(kv_heads), b.ints(both), b.ints(1)])

        # Query heads grouped by the kv head they read ([B, kv_heads, group * Sq, ...]: head h reads
        # kv head h // group), so the slots are used as stored, without repeating them per head.
        p = b.op("Reshape", [at_slots(probabilities, axis=3), b.ints(0, kv_heads, -1, 0)])
        query = _grouped(b, node.inputs[QUERY_INPUT], heads, kv_heads, head_dim)
        error = b.op("Transpose", [keys(b.op("Sub", [floats, read]))], perm=[0, 1, 3, 2])
        logit_shift = b.op("Mul", [b.op("MatMul", [query, error]), b.const(np.array(scale, _numpy(float_dtype)), "scale")])
        weights = b.op("Mul", [p, b.op("Exp", [logit_shift])])
        numerator = b.op("Sub", [b.op("MatMul", [weights, values(floats)]), b.op("MatMul", [p, values(read)])])
        denominator = b.op("Add", [b.const(np.array(1, _numpy(float_dtype)), "one"),
                                   b.op("ReduceSum", [b.op("Sub", [weights, p]), b.ints(-1)], keepdims=1)])
        corrected = b.op("Div", [b.op("Add", [_grouped(b, output, heads, kv_heads, head_dim), numerator]), denominator])
        per_head = b.op("Reshape", [corrected, b.ints(0, heads, -1, head_dim)])
        result = b.op("Reshape", [b.op("Transpose", [per_head], perm=[0, 2, 1, 3]), b.ints(0, 0, heads * head_dim)])
        result.type, result.shape = output.type, output.shape
        for use in uses:
            use.node.replace_input_with(use.idx, result)
        if was_graph_output:
            graph.outputs[graph.outputs.index(output)] = result
        graph.insert_after(node, b.nodes)
        return positions


def _stacked_codec(key: Codec, value: Codec, kv_heads: int, head_dim: int) -> Codec:
    """One codec for keys and values stacked along the heads axis ([1, 2 kv_heads, 1, D] scales);
    the key center stays out: the slots and the codes both hold keys as the node takes them."""
    scales = [np.broadcast_to(c.scale, (1, kv_heads, 1, head_dim)) for c in (key, value)]
    return Codec(key.bits, np.concatenate(scales, axis=1), key.zero_point.reshape(-1)[0], pack_axis=3)


def _grouped(b: FragmentBuilder, x: ir.Value, heads: int, kv_heads: int, head_dim: int) -> ir.Value:
    """[B, Sq, heads * D] -> [B, kv_heads, group * Sq, D], query heads grouped by their kv head."""
    per_head = b.op("Transpose", [b.op("Reshape", [x, b.ints(0, 0, heads, head_dim)])], perm=[0, 2, 1, 3])
    return b.op("Reshape", [per_head, b.ints(0, kv_heads, -1, head_dim)])


def _cast(b: FragmentBuilder, value: ir.Value, dtype: ir.DataType, to: ir.DataType) -> ir.Value:
    """`value` (of `dtype`) as `to`: the slots are float16, the node's float type may not be."""
    return value if dtype == to else b.op("Cast", [value], to=to)


def _graph_input(graph: ir.Graph, name: str, heads: int, head_dim: int) -> ir.Value:
    part = name.rsplit("_", 1)[-1]
    value = ir.Value(name=name, type=ir.TensorType(SLOT_DTYPE),
                     shape=ir.Shape(["batch", heads, f"{part}_seq", head_dim]))
    graph.inputs.append(value)
    return value


def _with_probabilities_output(graph: ir.Graph, node: ir.Node) -> ir.Node:
    """The same node with four outputs (the fourth: attention probabilities), in its place."""
    replacement = ir.Node(node.domain, node.op_type, list(node.inputs), attributes=list(node.attributes.values()),
                          num_outputs=4, name=node.name)
    for old, new in zip(node.outputs, replacement.outputs):
        new.name, new.type, new.shape = old.name, old.type, old.shape
    graph.insert_before(node, replacement)
    for old, new in zip(node.outputs, replacement.outputs):
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    return replacement


def _numpy(dtype: ir.DataType) -> type:
    return np.float16 if dtype == ir.DataType.FLOAT16 else np.float32
