"""Rewrite: fuse decomposed attention into onnxruntime's GroupQueryAttention (float).

What it matches
  Per layer, the decomposed attention the analysis found, with caches laid out
  [batch, kv_heads, seq, head_dim] (not per head, keys not transposed):
      present_k = Concat(past_k, k_new)  -> (repeat KV heads) -> Q.K^T -> *c -> (+mask) -> Softmax
      present_v = Concat(past_v, v_new)  -> (repeat KV heads) -> P.V  -> attention output
  where q and k_new already carry RoPE, and every constant scalar between the cache and the
  Softmax (scaling of K, of the scores) is collected into one factor c.

What it rewrites it to
      out, present_k, present_v = GroupQueryAttention(
          query = q as [batch, seq, heads * head_dim], key = k_new, value = v_new (likewise),
          past_k, past_v, seqlens_k = past + new - 1, total_sequence_length = past + new,
          num_heads, kv_num_heads, scale = c, do_rotary = 0)
  and the attention output is `out` put back into [batch, heads, seq, head_dim]. The old
  Q.K^T / mask / Softmax / P.V nodes become dead and are removed by the cleanup.

Why
  The fused kernel reads the cache without materialising repeated heads or score matrices, and
  with a 4-bit cache (passes.quantize_gqa) it dequantizes on the fly instead of expanding the
  whole cache to float at every step. The causal mask is the kernel's own; sequences are taken
  to be unpadded (kvcompile's runners never pad). The pipeline checks the fused float model
  against the original on real tokens before using it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, KVGraph, KVTensor
from kvcompile.passes.conditions import require_cache_inputs
from kvcompile.passes.find_kv_cache import CacheNodes, cache_nodes
from kvcompile.passes.kv_codec import FragmentBuilder
from kvcompile.passes.manager import cleaned_up, shapes_inferred
from kvcompile.passes.names import NameAllocator
from kvcompile.passes.score_path import refuse_other_ops, score_path

# Ops that only move data between the cache and Q.K^T (repeating KV heads, transposing K).
_MOVES = frozenset({"Unsqueeze", "Expand", "Reshape", "Transpose", "Cast", "Identity", "Tile"})
# What the fused kernel represents between Q.K^T and the Softmax: scaling and the causal mask
# (additive or selective: GroupQueryAttention applies its own).
_FUSABLE_SCORE_OPS = frozenset({"Mul", "Div", "Add", "Where", "Cast", "Identity"})


def _scalar(value: ir.Value | None) -> float | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        tensor = value.producer().attributes["value"].as_tensor()
    if tensor is None:
        return None
    array = tensor.numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _scale_of(node: ir.Node, data_index: int) -> float | None:
    """The factor a Mul/Div by a scalar constant applies to its input `data_index`."""
    other = _scalar(node.inputs[1 - data_index])
    if other is None or (node.op_type == "Div" and data_index != 0):
        return None
    return other if node.op_type == "Mul" else 1.0 / other


def key_path_factor(concat_output: ir.Value, reader: ir.Node, operand: int) -> float:
    """Product of the scalar factors on the way from the cache to Q.K^T (SDPA scales K)."""
    factor, value = 1.0, reader.inputs[operand]
    while value is not concat_output:
        node = value.producer()
        if node is None:
            raise UnsupportedModelError("the key reaches Q.K^T from somewhere other than its cache")
        if node.op_type in _MOVES:
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div"):
            index = 0 if _scalar(node.inputs[0]) is None else 1
            scale = _scale_of(node, index)
            if scale is None:
                raise UnsupportedModelError(f"the key is scaled by a non-constant ({node.name}) before Q.K^T")
            factor *= scale
            value = node.inputs[index]
        else:
            raise UnsupportedModelError(f"{node.op_type} between the key cache and Q.K^T cannot be fused")
    return factor


def score_path_factor(matmul: ir.Node) -> float:
    """Product of the scalar factors from Q.K^T to the Softmax; masks (Add, Where) are dropped."""
    path = score_path(matmul)
    if path is None:
        raise UnsupportedModelError("no Softmax after Q.K^T")
    refuse_other_ops(path, _FUSABLE_SCORE_OPS, "the fused attention (one scale and the causal mask)")
    softmax = path.softmax
    axis = softmax.attributes["axis"].as_int() if "axis" in softmax.attributes else -1
    if axis != -1 and axis != 3:
        raise UnsupportedModelError(f"Softmax over axis {axis}, not the keys")
    factor = 1.0
    for node, index in path.between():
        if node.op_type in ("Mul", "Div"):
            scale = _scale_of(node, index)
            if scale is None:
                raise UnsupportedModelError(f"the scores are scaled by a non-constant ({node.name})")
            factor *= scale
    return factor


class FuseGroupQueryAttentionPass(ir.passes.InPlacePass):
    def __init__(self, kv: KVGraph, input_ids: str):
        super().__init__()
        self.kv = kv
        self.input_ids = input_ids

    def requires(self, model: ir.Model) -> None:
        """Every cache is a graph input. Run after `manager.shapes_inferred()`: the query heads
        are read from shapes onnx's own inference leaves unknown."""
        require_cache_inputs(model, self.kv.tensors)

    def ensures(self, model: ir.Model) -> None:
        """One GroupQueryAttention per layer now reads the cache."""
        fused = sum(node.op_type == "GroupQueryAttention" for node in model.graph)
        assert fused == len({t.layer for t in self.kv.tensors}), f"{fused} GroupQueryAttention nodes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        layers = sorted({t.layer for t in self.kv.tensors})
        pairs = []
        for layer in layers:
            key = next((t for t in self.kv.tensors if t.layer == layer and t.kind == "key"), None)
            value = next((t for t in self.kv.tensors if t.layer == layer and t.kind == "value"), None)
            located = [self._check(graph, tensor) for tensor in (key, value)]
            pairs.append((key, value, *located))
        lengths = self._lengths(graph, names, pairs[0][0])
        for key, value, key_nodes, value_nodes in pairs:
            self._fuse(graph, names, key, value, key_nodes, value_nodes, lengths)
        model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(pairs))

    @staticmethod
    def _check(graph: ir.Graph, tensor: KVTensor | None) -> CacheNodes:
        """The tensor's Concat and reader, or a refusal naming why this cache cannot be fused."""
        if tensor is None or tensor.attention != DECOMPOSED or tensor.head is not None:
            raise UnsupportedModelError("fusing needs one K and one V cache per layer, decomposed attention")
        if (tensor.axes.batch, tensor.axes.heads, tensor.axes.seq, tensor.axes.head_dim) != (0, 1, 2, 3):
            raise UnsupportedModelError(f"{tensor.label}: fusing needs caches laid out [batch, heads, seq, head_dim]")
        located = cache_nodes(graph, tensor)
        if located.reader is None or located.concat is None:
            raise UnsupportedModelError(f"{tensor.label}: its attention nodes were not found")
        if tensor.kept_entries is not None:
            raise UnsupportedModelError(
                f"{tensor.label} is a sliding-window cache (it keeps its last {tensor.kept_entries} entries); "
                "GroupQueryAttention's cache grows without bound")
        concat = located.concat
        if tensor.past_input not in [v.name for v in concat.inputs if v is not None] or \
                concat.outputs[0].name != tensor.present_output:
            raise UnsupportedModelError(f"{tensor.label}: ops sit between the cache input or output and its Concat")
        return located

    def _lengths(self, graph: ir.Graph, names: NameAllocator, key: KVTensor) -> tuple[ir.Value, ir.Value]:
        """seqlens_k [batch] (= past + new - 1) and total_sequence_length (scalar), int32."""
        inputs = {v.name: v for v in graph.inputs}
        builder = FragmentBuilder(graph, names, "kvcompile/gqa_lengths")
        past_shape = builder.op("Shape", [inputs[key.past_input]])
        ids_shape = builder.op("Shape", [inputs[self.input_ids]])
        past_len = builder.op("Gather", [past_shape, builder.const(np.array(2, np.int64), "axis_seq")], axis=0)
        new_len = builder.op("Gather", [ids_shape, builder.const(np.array(1, np.int64), "axis_seq")], axis=0)
        batch = builder.op("Gather", [ids_shape, builder.ints(0)], axis=0)
        total = builder.op("Add", [past_len, new_len])
        total32 = builder.op("Cast", [total], to=ir.DataType.INT32)
        last = builder.op("Sub", [total, builder.const(np.array(1, np.int64), "one")])
        seqlens = builder.op("Cast", [builder.op("Expand", [last, batch])], to=ir.DataType.INT32)
        graph.extend(builder.nodes)  # moved into place by the topological sort
        return seqlens, total32

    def _fuse(self, graph: ir.Graph, names: NameAllocator, key: KVTensor, value: KVTensor, key_nodes: CacheNodes,
              value_nodes: CacheNodes, lengths) -> None:
        qk, pv = key_nodes.reader, value_nodes.reader
        k_concat, v_concat = key_nodes.concat, value_nodes.concat
        query = qk.inputs[1 - key_nodes.reader_operand]
        heads = query.shape.dims[1] if query.shape is not None and query.shape.rank() == 4 else None
        if not isinstance(heads, int):
            raise UnsupportedModelError(f"layer {key.layer}: the number of query heads is not known")
        scale = key_path_factor(k_concat.outputs[0], qk, key_nodes.reader_operand) * score_path_factor(qk)
        past_k, past_v = (next(v for v in c.inputs if v is not None and v.name == t.past_input)
                          for c, t in ((k_concat, key), (v_concat, value)))
        new_k, new_v = (next(v for v in c.inputs if v is not None and v.name != t.past_input)
                        for c, t in ((k_concat, key), (v_concat, value)))

        builder = FragmentBuilder(graph, names, f"kvcompile/L{key.layer}/gqa")

        def bsd(x: ir.Value, n_heads: int) -> ir.Value:  # [b, h, s, d] -> [b, s, h * d]
            moved = builder.op("Transpose", [x], perm=[0, 2, 1, 3])
            return builder.op("Reshape", [moved, builder.ints(0, 0, n_heads * key.head_dim)])

        fused = ir.Node("com.microsoft", "GroupQueryAttention",
                        [bsd(query, heads), bsd(new_k, key.num_heads), bsd(new_v, value.num_heads),
                         past_k, past_v, lengths[0], lengths[1]],
                        attributes=[ir.AttrInt64("num_heads", heads), ir.AttrInt64("kv_num_heads", key.num_heads),
                                    ir.AttrFloat32("scale", scale), ir.AttrInt64("do_rotary", 0)],
                        num_outputs=3, name=names.name(f"kvcompile/L{key.layer}/GroupQueryAttention"))
        builder.nodes.append(fused)
        output = builder.op("Reshape", [fused.outputs[0], builder.ints(0, 0, heads, key.head_dim)])
        restored = builder.op("Transpose", [output], perm=[0, 2, 1, 3])
        graph.insert_before(pv, builder.nodes)
        pv.outputs[0].replace_all_uses_with(restored, replace_graph_outputs=True)
        for concat, present in ((k_concat, fused.outputs[1]), (v_concat, fused.outputs[2])):
            old = concat.outputs[0]
            present.type, present.shape = old.type, old.shape
            old.replace_all_uses_with(present, replace_graph_outputs=True)
            name = old.name
            names.rename(old, f"{name}__decomposed")
            present.name = name
        fused.outputs[0].name = names.name(f"kvcompile/L{key.layer}/gqa_output")


def fuse_attention_passes(kv: KVGraph, input_ids: str) -> list[ir.passes.PassBase]:
    """Shapes inferred (the query heads), attention fused, the decomposed nodes removed."""
    return [*shapes_inferred(), FuseGroupQueryAttentionPass(kv, input_ids), *cleaned_up()]
