"""Rewrite: a GroupQueryAttention that packs Q, K, V or rotates them itself takes them apart and rotated.

What it matches
  Every `com.microsoft.GroupQueryAttention` node reading a cache of the analysis that takes Q, K
  and V packed in its first input, or applies the rotary embedding itself (`do_rotary = 1`), as
  the onnxruntime-genai builder exports every model.

What it rewrites
  - packed QKV: three Slices of the last axis ([num_heads | kv_num_heads | kv_num_heads] heads);
  - `do_rotary = 1`: `com.microsoft.RotaryEmbedding` on Q and on K, with the node's own
    `cos_cache` / `sin_cache`, `rotary_interleaved` and, where the tables are narrower than a head,
    `rotary_embedding_dim`; the node then gets `do_rotary = 0` and no tables. The positions are
    the ones the node computes: for the first prompt (the new tokens are the whole sequence,
    `total_sequence_length`) 0..S-1 in every row; otherwise `seqlens_k[b] + 1 - S + j`.
  Exact: the same rotation of the same values (the CPU kernels share the rotary code); a compile
  checks it anyway, as every compile does, against the input model's logits.

Why
  Two things kvcompile does to the fused kernel's 4-bit cache need the rotated keys outside the
  node: subtracting a per-channel center from the new keys (RoPE(k) - c is not RoPE(k - c)) and
  the float sink and recent slots, whose correction scores the query against the slots' float
  keys. Without them SmolLM2's genai int4 export lost +15.39% at 4 bits where its dynamo export,
  fused by kvcompile with both, loses +0.88% (README).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvcompile.kvgraph import KVGraph
from kvcompile.passes.find_kv_cache import GQA_KEY_INPUT
from kvcompile.passes.kv_codec import FragmentBuilder
from kvcompile.passes.names import NameAllocator
from kvcompile.passes.quantize_gqa import cache_attention_nodes

SEQLENS_INPUT, TOTAL_LENGTH_INPUT, COS_INPUT, SIN_INPUT = 5, 6, 7, 8


def needs_unfusing(node: ir.Node) -> bool:
    """Whether the node packs Q, K, V or rotates them itself."""
    packed = len(node.inputs) <= GQA_KEY_INPUT or node.inputs[GQA_KEY_INPUT] is None
    rotary = node.attributes.get("do_rotary")
    return packed or (rotary is not None and rotary.as_int() != 0)


class UnfuseGQARotaryPass(ir.passes.InPlacePass):
    def __init__(self, kv: KVGraph):
        super().__init__()
        self.kv = kv

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        positions = None  # shared by every layer: computed at the first node
        for node, tensors in cache_attention_nodes(graph, self.kv):
            if not needs_unfusing(node):
                continue
            heads, kv_heads = node.attributes["num_heads"].as_int(), node.attributes["kv_num_heads"].as_int()
            head_dim = tensors["key"].head_dim
            builder = FragmentBuilder(graph, names, f"kvcompile/L{tensors['key'].layer}/gqa_unfused")
            q, k, v = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None, \
                node.inputs[2] if len(node.inputs) > 2 else None
            if k is None:
                q, k, v = self._split(builder, q, heads * head_dim, kv_heads * head_dim)
            rotary = node.attributes.get("do_rotary")
            if rotary is not None and rotary.as_int() != 0:
                if positions is None:
                    positions = self._positions(builder, node, q)
                cos, sin = node.inputs[COS_INPUT], node.inputs[SIN_INPUT]
                attributes = {"interleaved": node.attributes.get_int("rotary_interleaved", 0)}
                table = cos.shape[-1] if cos.shape is not None and len(cos.shape) else None
                if isinstance(table, int) and 2 * table < head_dim:
                    attributes["rotary_embedding_dim"] = 2 * table
                q = builder.op("RotaryEmbedding", [q, positions, cos, sin], domain="com.microsoft",
                               num_heads=heads, **attributes)
                k = builder.op("RotaryEmbedding", [k, positions, cos, sin], domain="com.microsoft",
                               num_heads=kv_heads, **attributes)
                node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 0)
                node.replace_input_with(COS_INPUT, None)
                node.replace_input_with(SIN_INPUT, None)
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            for slot, value in enumerate((q, k, v)):
                node.replace_input_with(slot, value)
            graph.insert_before(node, builder.nodes)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _split(builder: FragmentBuilder, qkv: ir.Value, q_width: int, kv_width: int) -> tuple[ir.Value, ...]:
        bounds = (0, q_width, q_width + kv_width, q_width + 2 * kv_width)
        return tuple(builder.op("Slice", [qkv, builder.ints(start), builder.ints(end), builder.ints(-1)])
                     for start, end in zip(bounds, bounds[1:]))

    @staticmethod
    def _positions(builder: FragmentBuilder, node: ir.Node, q: ir.Value) -> ir.Value:
        """[batch, S] int64: the positions the node's own rotary uses (module docstring)."""
        seqlens = builder.op("Cast", [node.inputs[SEQLENS_INPUT]], to=ir.DataType.INT64)  # [batch]
        total = builder.op("Cast", [node.inputs[TOTAL_LENGTH_INPUT]], to=ir.DataType.INT64)
        new = builder.op("Gather", [builder.op("Shape", [q]), builder.const(np.array(1, np.int64), "seq_axis")])
        first_prompt = builder.op("Equal", [builder.op("Reshape", [total, builder.ints(-1)]),
                                            builder.op("Reshape", [new, builder.ints(-1)])])
        past = builder.op("Sub", [builder.op("Add", [seqlens, builder.const(np.array(1, np.int64), "one")]), new])
        start = builder.op("Where", [first_prompt, builder.const(np.array(0, np.int64), "zero"), past])
        steps = builder.op("Range", [builder.const(np.array(0, np.int64), "zero"), new,
                                     builder.const(np.array(1, np.int64), "one")])
        return builder.op("Add", [builder.op("Unsqueeze", [start, builder.ints(1)]),
                                  builder.op("Unsqueeze", [steps, builder.ints(0)])])
