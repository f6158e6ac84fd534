"""Rewrite: let onnxruntime's GroupQueryAttention hold its KV cache in 4 bits itself.

What it matches
  Every `com.microsoft.GroupQueryAttention` node whose past/present key and value are the
  cache tensors of the plan (found by the analysis), with static symmetric per-tensor or
  per-channel scales (per-channel keys optionally centered).

What it rewrites
  - attributes `kv_cache_bit_width` (4), `k_quant_type` / `v_quant_type` (PER_TENSOR or
    PER_CHANNEL, the same for K and V: the CPU kernel requires it);
  - inputs 12 and 13 (`k_scale`, `v_scale`): float32 initializers holding kvcompile's calibrated
    scales, [1] or [kv_heads * head_dim];
  - the past inputs and present outputs become uint8 [batch, kv_heads, seq, head_dim / 2], two
    codes per byte along head_dim;
  - a centered key plan (a per-channel center c subtracted before quantizing): `Sub(key, c)` on
    the new keys the node takes (input 1). Exact in float: q . (k - c) = q . k - q . c, the same
    constant for every key a query scores, which softmax ignores. Only where the node does not
    rotate the keys itself (do_rotary = 0: RoPE(k) - c is not RoPE(k - c)) and takes K apart
    from Q and V (not packed QKV). Values are never centered: the same exact trick exists for
    them (the weights sum to one, so Add(output, c) would restore it), but on SmolLM2 centered
    values cost +9.06% where symmetric ones cost +6.42% with centered keys (README): the values
    of attention-sink tokens are near zero, and a symmetric grid holds zero exactly.

Why
  The fused CPU kernel dequantizes the cache on the fly inside attention instead of
  materialising a float copy of it at every step. Its storage is exactly kvcompile's: code =
  clip(round_half_even(x / scale), -8, 7) + 8, first code in the low nibble (checked against
  onnxruntime 1.32 in tests/test_quantize_gqa.py), so the manifest, runners and memory figures
  are the same as for the Q/DQ form. It quantizes each new token before attending to it, during
  prefill as well.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import GROUP_QUERY_ATTENTION, KVGraph, KVTensor
from kvcompile.passes.conditions import ensure_stored_as, require_cache_inputs
from kvcompile.passes.find_kv_cache import GQA_KEY_INPUT, key_centering_error
from kvcompile.passes.kv_codec import FragmentBuilder
from kvcompile.quant import Codec, codes_per_byte, symmetric_zero_point
from kvcompile.passes.names import NameAllocator

K_SCALE_INPUT, V_SCALE_INPUT = 12, 13
PAST_SLOTS = {"key": 3, "value": 4}
PRESENT_SLOTS = {"key": 1, "value": 2}


def gqa_storage_error(codec: Codec | None) -> str | None:
    """Why the fused kernel cannot store a tensor this way (None if it can)."""
    if codec is None:
        return "it keeps the cache in float"
    if codec.dynamic:
        return "GroupQueryAttention takes static scales only (no per-token scales)"
    if codec.bits != 4:
        return (f"its cache is 4-bit here ({codec.bits} asked; the kernel's 8-bit cache is int8, "
                "which kvcompile does not emit)")
    if not np.all(codec.zero_point == symmetric_zero_point(codec.bits)):
        return "GroupQueryAttention quantizes symmetrically (no zero points)"
    return None


class QuantizeGQACachePass(ir.passes.InPlacePass):
    def __init__(self, kv: KVGraph, codecs: dict[str, Codec]):
        super().__init__()
        self.kv = kv
        self.codecs = codecs

    def _planned(self) -> list[KVTensor]:
        return [t for t in self.kv.tensors if self.codecs.get(t.past_input) is not None]

    def requires(self, model: ir.Model) -> None:
        require_cache_inputs(model, self._planned())

    def ensures(self, model: ir.Model) -> None:
        ensure_stored_as(model, self._planned(), ir.DataType.UINT8)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for node, tensors in cache_attention_nodes(graph, self.kv):
            codecs = {kind: self.codecs.get(t.past_input) for kind, t in tensors.items()}
            if all(codec is None for codec in codecs.values()):
                continue  # this layer's cache stays in float
            for kind, codec in codecs.items():
                reason = gqa_storage_error(codec)
                if reason is not None:
                    raise UnsupportedModelError(
                        f"{tensors[kind].label} is read by {GROUP_QUERY_ATTENTION}, which cannot store it "
                        f"as planned: {reason}; use --scheme per-channel or per-tensor"
                    )
            if len({c.scale.size == 1 for c in codecs.values()}) != 1:
                raise UnsupportedModelError(
                    f"layer {tensors['key'].layer}: the CPU GroupQueryAttention needs K and V scales of one "
                    "kind (both per-tensor or both per-channel)")
            if codecs["value"].center is not None:
                raise UnsupportedModelError(f"{tensors['value'].label}: values are not stored centered")
            reason = key_centering_error(node) if codecs["key"].center is not None else None
            if reason is not None:
                raise UnsupportedModelError(f"{tensors['key'].label}: a centered cache plan cannot be applied: {reason}")
            self._quantize(graph, names, node, tensors, codecs, 4)
            if codecs["key"].center is not None:
                self._center_keys(graph, names, node, tensors["key"], codecs["key"])
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _quantize(self, graph: ir.Graph, names: NameAllocator, node: ir.Node, tensors, codecs, bits: int) -> None:
        layer = tensors["key"].layer
        node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", bits)
        if len(node.inputs) <= V_SCALE_INPUT:
            node.resize_inputs(V_SCALE_INPUT + 1)
        for kind, slot, attribute in (("key", K_SCALE_INPUT, "k_quant_type"), ("value", V_SCALE_INPUT, "v_quant_type")):
            codec, tensor = codecs[kind], tensors[kind]
            per_tensor = codec.scale.size == 1
            node.attributes[attribute] = ir.AttrString(attribute, "PER_TENSOR" if per_tensor else "PER_CHANNEL")
            scale = codec.scale.reshape(-1) if per_tensor else per_channel_row(codec.scale, tensor)
            name = names.name(f"kvcompile/L{layer}.{kind[0].upper()}/gqa_scale")
            value = ir.Value(name=name, const_value=ir.tensor(scale.astype(np.float32).copy(), name=name))
            value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(value.const_value.shape)
            graph.register_initializer(value)
            node.replace_input_with(slot, value)
            past = node.inputs[PAST_SLOTS[kind]]
            present = node.outputs[PRESENT_SLOTS[kind]]
            for cache in (past, present):
                dims = list(cache.shape.dims)
                dims[3] = tensor.head_dim // codes_per_byte(bits)
                cache.type = ir.TensorType(ir.DataType.UINT8)
                cache.shape = ir.Shape(dims)

    def _center_keys(self, graph: ir.Graph, names: NameAllocator, node: ir.Node, tensor: KVTensor,
                     codec: Codec) -> None:
        """Subtract a centered key plan's center from the new keys the node appends (see the
        module docstring for why this is exact; `call` checked that it is)."""
        builder = FragmentBuilder(graph, names, f"kvcompile/L{tensor.layer}/gqa_key_center")
        keys = node.inputs[GQA_KEY_INPUT]
        center = per_channel_row(codec.center, tensor).astype(tensor.dtype)  # the keys' dtype (float16: exact, plan.py)
        shifted = builder.op("Sub", [keys, builder.const(center, "center")])
        shifted.type, shifted.shape = keys.type, keys.shape
        node.replace_input_with(GQA_KEY_INPUT, shifted)
        graph.insert_before(node, builder.nodes)


def cache_attention_nodes(graph: ir.Graph, kv: KVGraph) -> Iterator[tuple[ir.Node, dict[str, KVTensor]]]:
    """Every GroupQueryAttention node whose past key and value are cache tensors of `kv`, with
    them ({"key": ..., "value": ...}); the nodes are listed first, so a caller may replace them."""
    by_input = {t.past_input: t for t in kv.tensors}
    for node in list(graph):
        if (node.domain, node.op_type) != ("com.microsoft", "GroupQueryAttention"):
            continue
        tensors = {kind: by_input.get(node.inputs[slot].name if node.inputs[slot] is not None else "")
                   for kind, slot in PAST_SLOTS.items()}
        if all(t is not None for t in tensors.values()):
            yield node, tensors


def per_channel_row(values: np.ndarray, tensor: KVTensor) -> np.ndarray:
    """Per-channel scales or centers (layout [1, kv_heads, 1, head_dim]) as one float32 row of
    kv_heads * head_dim: how the node takes scales and how its K/V inputs lay out a token."""
    return np.broadcast_to(values, (1, tensor.num_heads, 1, tensor.head_dim)).reshape(-1).astype(np.float32)
