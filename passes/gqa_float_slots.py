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
  4-bit cache. The slots' codes are gathered from the present cache and unpacked but never
  scaled into keys and values: q . k^_i and sum p_i v^_i are taken over the codes (unpacked in
  [even | odd] channel order), with the scales, permuted to match, moved into [D, D] matrices on
  the query and on the weighted sum; the slots stay float16 until the one Cast the correction
  reads. What a decode step pays is moving the slots (about five passes over them) and
  onnxruntime's per-node overhead, so keys and values share every op that moves them and the
  slot positions are computed once for all layers (from T: every batch row holds T positions,
  as kvcompile's runners feed them).

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
from kvcompile.passes.kv_codec import FragmentBuilder
from kvcompile.passes.names import NameAllocator
from kvcompile.passes.quantize_gqa import PRESENT_SLOTS, cache_attention_nodes
from kvcompile.quant import Codec

QUERY_INPUT, KEY_INPUT, VALUE_INPUT = 0, 1, 2
PROBABILITIES = 2  # qk_output: the softmax of the scores, [batch, heads, q_len, total]
INT64_MAX = np.iinfo(np.int64).max
SLOT_DTYPE = ir.DataType.FLOAT16  # what the slots are stored as, whatever the model's float type
CODE_BITS, ZERO_POINT = 4, 8  # GroupQueryAttention's 4-bit cache: symmetric codes, (c - 8) * scale
LOW_NIBBLE = (1 << CODE_BITS) - 1


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
    computed once, at the first node)."""

    in_cache: ir.Value  # [|F|] int64: the slot positions 0..min(sinks, T)-1 and T-m..T-1 of the cache
    recent: ir.Value  # [1]: m = min(recent, max(0, T - sinks)), the recent slots kept
    recent_start: ir.Value | None = None  # [1]: where the kept recent slots start among past slots + new entries


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
        total = b.op("Gather", [b.op("Shape", [present]), b.const(np.int64(2), "axis")])  # T, a scalar
        zero, one = b.const(np.int64(0), "zero"), b.const(np.int64(1), "one")
        sinks = b.op("Min", [b.const(np.int64(self.sinks), "sinks"), total])
        recent = b.op("Min", [b.const(np.int64(self.recent), "recent"),
                              b.op("Max", [zero, b.op("Sub", [total, b.const(np.int64(self.sinks), "sinks")])])])
        in_cache = b.op("Concat", [b.op("Range", [zero, sinks, one]),
                                   b.op("Range", [b.op("Sub", [total, recent]), total, one])], axis=0)
        return _Positions(in_cache, b.op("Unsqueeze", [recent, b.ints(0)]))

    def _rewrite(self, graph: ir.Graph, names: NameAllocator, node: ir.Node, tensors: dict[str, KVTensor],
                 positions: _Positions | None) -> _Positions:
        key, value = tensors["key"], tensors["value"]
        heads = node.attributes["num_heads"].as_int()
        kv_heads, head_dim = key.num_heads, key.head_dim
        scale_attr = node.attributes.get("scale")
        scale = scale_attr.as_float() if scale_attr is not None and scale_attr.as_float() != 0 else head_dim ** -0.5
        float_dtype = ir.DataType.FLOAT16 if key.dtype == "float16" else ir.DataType.FLOAT
        numpy_float = _numpy(float_dtype)
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

        # The slots, float16 as stored: keys and values stacked along the heads axis (keys first),
        # [B, 2 * kv_heads, n, D], so every op that moves them runs once for both.
        both = 2 * kv_heads
        new = b.op("Concat", [node.inputs[KEY_INPUT], node.inputs[VALUE_INPUT]], axis=2)
        new = b.op("Transpose", [b.op("Reshape", [new, b.ints(0, 0, both, head_dim)])], perm=[0, 2, 1, 3])
        pasts = [_graph_input(graph, slot_name(key.past_input, part), both, head_dim) for part in ("sink", "recent")]
        joined = b.op("Concat", [*pasts, _cast(b, new, float_dtype, SLOT_DTYPE)], axis=2)
        if positions.recent_start is None:  # past slots + new entries: the same length in every layer
            joined_end = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [joined]), b.const(np.int64(2), "axis")]),
                                            b.ints(0)])
            positions.recent_start = b.op("Sub", [joined_end, positions.recent])
        presents = {"sink": b.op("Slice", [joined, b.ints(0), b.ints(self.sinks), b.ints(2)]),
                    "recent": b.op("Slice", [joined, positions.recent_start, b.ints(INT64_MAX), b.ints(2)])}
        for part, stored in presents.items():
            stored.name = names.name(slot_name(key.present_output, part))
            stored.type, stored.shape = ir.TensorType(SLOT_DTYPE), ir.Shape(["batch", both, f"{part}_seq", head_dim])
            graph.outputs.append(stored)
        floats = _cast(b, b.op("Concat", list(presents.values()), axis=2), SLOT_DTYPE, float_dtype)  # [B, 2h, |F|, D]
        float_keys = b.op("Slice", [floats, b.ints(0), b.ints(kv_heads), b.ints(1)])
        float_values = b.op("Slice", [floats, b.ints(kv_heads), b.ints(both), b.ints(1)])

        # What the kernel read at the slot positions is (c - 8) * s per channel, c its 4-bit codes:
        # byte j of a row holds channel 2j in its low and 2j + 1 in its high four bits. The codes
        # are unpacked into [even channels | odd channels] order and never scaled into keys or
        # values; the scales go, permuted the same way, onto the query (keys) and onto the
        # probability-weighted sum (values): [D, D] matrices, a few KB per layer.
        def centered_codes(cache: ir.Value) -> ir.Value:
            codes = b.op("Gather", [cache, positions.in_cache], axis=2)  # [B, h, |F|, D/2] bytes
            halves = b.op("Concat", [b.op("BitwiseAnd", [codes, b.const(np.uint8(LOW_NIBBLE), "low_nibble")]),
                                     b.op("BitShift", [codes, b.const(np.uint8(CODE_BITS), "code_bits")],
                                          direction="RIGHT")], axis=-1)
            return b.op("Sub", [b.op("Cast", [halves], to=float_dtype), b.const(np.array(ZERO_POINT, numpy_float), "zero_point")])

        key_scale = _scale_to_unpacked(self.codecs[key.past_input], kv_heads, head_dim)
        value_scale = _scale_to_unpacked(self.codecs[value.past_input], kv_heads, head_dim)
        query = _grouped(b, node.inputs[QUERY_INPUT], heads, kv_heads, head_dim)  # [B, h, group * Sq, D]

        # Logit shift at slot i: scale * q . (k_i - k^_i).
        read_query = b.op("MatMul", [query, b.const((scale * key_scale).astype(numpy_float), "key_scale")])
        read_logits = _matmul_transposed(b, read_query, centered_codes(node.outputs[PRESENT_SLOTS["key"]]))
        logit_shift = b.op("Sub", [_matmul_transposed(b, query, float_keys, alpha=scale), read_logits])

        # The kernel's probabilities at the slots, query heads grouped by the kv head they read
        # ([B, kv_heads, group * Sq, |F|]: head h reads kv head h // group).
        p = b.op("Reshape", [b.op("Gather", [probabilities, positions.in_cache], axis=3), b.ints(0, kv_heads, -1, 0)])
        weights = b.op("Mul", [p, b.op("Exp", [logit_shift])])

        # sum_i p_i v^_i, back in channel order and scaled.
        code_sums = b.op("MatMul", [p, centered_codes(node.outputs[PRESENT_SLOTS["value"]])])
        read_sum = b.op("MatMul", [code_sums, b.const(value_scale.transpose(0, 1, 3, 2).astype(numpy_float),
                                                      "value_scale")])
        numerator = b.op("Sub", [b.op("MatMul", [weights, float_values]), read_sum])
        denominator = b.op("Add", [b.op("ReduceSum", [b.op("Sub", [weights, p]), b.ints(-1)], keepdims=1),
                                   b.const(np.array(1, numpy_float), "one")])
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


def _scale_to_unpacked(codec: Codec, kv_heads: int, head_dim: int) -> np.ndarray:
    """[1, kv_heads, D, D]: x @ it takes x's channels (scaled) into the order the codes unpack in,
    [0, 2, 4, ..., 1, 3, 5, ...]; its transpose takes them back (scaled)."""
    if codec.bits != CODE_BITS or not np.all(codec.zero_point == ZERO_POINT):
        raise ValueError("float slots read GroupQueryAttention's symmetric 4-bit cache")
    scale = np.broadcast_to(codec.scale, (1, kv_heads, 1, head_dim)).reshape(kv_heads, head_dim)
    unpacked = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    matrix = np.zeros((1, kv_heads, head_dim, head_dim), np.float32)
    matrix[0, :, unpacked, np.arange(head_dim)] = scale[:, unpacked].T
    return matrix


def _matmul_transposed(b: FragmentBuilder, a: ir.Value, x: ir.Value, alpha: float = 1.0) -> ir.Value:
    """alpha * a @ x^T over the last two axes (onnxruntime's FusedMatMul: no transposed copy of x)."""
    return b.op("FusedMatMul", [a, x], domain="com.microsoft", transB=1, alpha=alpha)


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
