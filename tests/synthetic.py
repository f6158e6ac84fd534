"""Small synthetic decoders in the attention forms users' exports have, built with onnx.helper.

`build_decoder(...)` returns an onnx.ModelProto of a tiny decoder (embedding, attention layers,
LM head) whose KV cache is graph I/O, in one of these forms:
  - llama: separate Q/K/V projections, RoPE (Cos/Sin, rotate_half), GQA (Expand of KV heads),
    cache [batch, kv_heads, seq, head_dim], optimum-style names;
  - gpt2: one fused QKV projection with bias, Split, multi-head attention, keys stored
    transposed [batch, heads, head_dim, seq], names that say nothing (`in_7`, `out_3`), values
    listed before keys;
  - per_head: one cache tensor per head, [batch, seq, head_dim];
  - gqa_op: com.microsoft.GroupQueryAttention reading the cache.
Attention is not causal-masked (the graphs are for structure, not language modelling).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN = 32, 16


class _Graph:
    def __init__(self, dtype: np.dtype, seed: int = 0):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, array, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.normal(size=shape) / np.sqrt(shape[0])).astype(self.dtype), "w")

    def op(self, op_type: str, inputs: list[str], domain: str = "", outputs: int = 1, **attrs):
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name("n_" + op_type), domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, np.int64), "shape")


def _elem(dtype: np.dtype) -> int:
    return TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT


def _rope(g: _Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    half = head_dim // 2
    first = g.op("Slice", [x, g.ints(0), g.ints(half), g.ints(3)])
    second = g.op("Slice", [x, g.ints(half), g.ints(head_dim), g.ints(3)])
    rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=3)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def _heads(g: _Graph, x: str, heads: int, head_dim: int) -> str:
    """[b, s, heads*head_dim] -> [b, heads, s, head_dim]"""
    return g.op("Transpose", [g.op("Reshape", [x, g.ints(0, 0, heads, head_dim)])], perm=[0, 2, 1, 3])


def _merge(g: _Graph, x: str, heads: int, head_dim: int) -> str:
    """[b, heads, s, head_dim] -> [b, s, heads*head_dim]"""
    return g.op("Reshape", [g.op("Transpose", [x], perm=[0, 2, 1, 3]), g.ints(0, 0, heads * head_dim)])


def build_decoder(form: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  head_dim: int = 8, dtype=np.float32, present_outputs: bool = True,
                  shape_readers: int = 0, window: int | None = None, empty_concat: bool = False) -> onnx.ModelProto:
    """`shape_readers`: Shape nodes reading each past cache input besides its Concat (dynamo
    exports have several per input: one per mask or position computation).
    `window` (llama form): a sliding-window cache as transformers exports it: the past is cut to
    its last `window - 1` entries, appended to, and the present output keeps the last `window - 1`.
    `empty_concat` (llama form): the past is first concatenated onto an empty tensor, as the
    TorchScript exporter leaves it."""
    g = _Graph(dtype)
    elem = _elem(dtype)
    opaque = form == "gpt2"
    kv_heads = heads if form in ("gpt2", "per_head") else kv_heads
    g.inputs.append(helper.make_tensor_value_info("in_0" if opaque else "input_ids", TensorProto.INT64, ["batch", "seq"]))
    ids = g.inputs[0].name
    mask_name = "attention_mask"
    g.inputs.append(helper.make_tensor_value_info(mask_name, TensorProto.INT64, ["batch", "total"]))
    if form == "llama":
        g.inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    x = g.op("Gather", [g.weight(VOCAB, HIDDEN), ids])
    cos = sin = None
    if form == "llama":
        freqs = (1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
        freqs = np.concatenate([freqs, freqs]).astype(np.float32)
        positions = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT), g.ints(1, 3)])
        angles = g.op("Mul", [positions, g.const(freqs.reshape(1, 1, 1, head_dim), "freqs")])
        cos = g.op("Cast", [g.op("Cos", [angles])], to=elem)
        sin = g.op("Cast", [g.op("Sin", [angles])], to=elem)
    past_inputs, present_outputs_ = [], []
    for layer in range(layers):
        names = _cache_names(form, layer, heads if form == "per_head" else 1, opaque)
        layer_builder = {"llama": _llama_layer, "gpt2": _gpt2_layer, "per_head": _per_head_layer,
                         "gqa_op": _gqa_op_layer}[form]
        extra = {"window": window, "empty_concat": empty_concat} if form == "llama" else {}
        attn = layer_builder(g, x, names, heads, kv_heads, head_dim, cos, sin, mask_name, **extra)
        x = g.op("Add", [x, attn["out"]])
        for past, _, _ in attn["cache"]:
            x = _read_shape(g, x, past, shape_readers)
        for index, (past, present, shape) in enumerate(attn["cache"]):
            is_value = index % 2
            past_inputs.append((is_value, helper.make_tensor_value_info(past, elem, shape)))
            out_shape = [d if d != "past" else "total" for d in shape]
            present_outputs_.append(helper.make_tensor_value_info(present, elem, out_shape))
    logits = g.op("MatMul", [x, g.weight(HIDDEN, VOCAB)])
    if opaque:  # list every value cache before every key cache
        past_inputs.sort(key=lambda item: -item[0])
    g.inputs.extend(info for _, info in past_inputs)
    g.outputs.append(helper.make_tensor_value_info(logits, elem, ["batch", "seq", VOCAB]))
    if present_outputs:
        g.outputs.extend(present_outputs_)
    graph = helper.make_graph(g.nodes, f"synthetic_{form}", g.inputs, g.outputs, g.inits)
    opsets = [helper.make_opsetid("", 18)]
    if form == "gqa_op":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def _read_shape(g: _Graph, x: str, past: str, readers: int) -> str:
    """Add 0 * (a dim of `past`'s shape) to `x`, `readers` times, through differently sliced Shapes."""
    for reader in range(readers):
        spans = [{}, {"start": 2}, {"start": 0, "end": 3}, {"start": -2}]
        shape = g.op("Shape", [past], **spans[reader % len(spans)])
        dim = g.op("Cast", [g.op("ReduceMax", [shape], keepdims=0)], to=_elem(g.dtype))
        x = g.op("Add", [x, g.op("Mul", [dim, g.const(np.array(0, g.dtype), "zero")])])
    return x


def _cache_names(form: str, layer: int, per_head: int, opaque: bool) -> list[dict]:
    out = []
    for head in range(per_head):
        suffix = f".head{head}" if form == "per_head" else ""
        if opaque:  # names that say nothing about key or value
            base = 10 + 2 * layer
            out.append({"past_k": f"in_{base}", "present_k": f"out_{base}",
                        "past_v": f"in_{base + 1}", "present_v": f"out_{base + 1}"})
        else:
            out.append({"past_k": f"past_key_values.{layer}{suffix}.key", "present_k": f"present.{layer}{suffix}.key",
                        "past_v": f"past_key_values.{layer}{suffix}.value", "present_v": f"present.{layer}{suffix}.value"})
    return out


def _attend(g: _Graph, q: str, k_t: str, v: str) -> str:
    scores = g.op("Mul", [g.op("MatMul", [q, k_t]), g.const(np.array(0.35, g.dtype), "scale")])
    return g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])


def _repeat_kv(g: _Graph, x: str, heads: int, kv_heads: int, head_dim: int) -> str:
    if heads == kv_heads:
        return x
    expanded = g.op("Expand", [g.op("Unsqueeze", [x, g.ints(2)]), g.ints(1, 1, heads // kv_heads, 1, 1)])
    return g.op("Reshape", [expanded, g.ints(0, heads, -1, head_dim)])


def _llama_layer(g, x, names, heads, kv_heads, head_dim, cos, sin, _mask, window=None, empty_concat=False):
    n = names[0]
    q = _rope(g, _heads(g, g.op("MatMul", [x, g.weight(HIDDEN, heads * head_dim)]), heads, head_dim), cos, sin, head_dim)
    k = _rope(g, _heads(g, g.op("MatMul", [x, g.weight(HIDDEN, kv_heads * head_dim)]), kv_heads, head_dim), cos, sin, head_dim)
    v = _heads(g, g.op("MatMul", [x, g.weight(HIDDEN, kv_heads * head_dim)]), kv_heads, head_dim)
    appended = {}
    for kind, new in (("k", k), ("v", v)):
        past = n[f"past_{kind}"]
        if empty_concat:
            past = g.op("Concat", [g.const(np.zeros((1, kv_heads, 0, head_dim), g.dtype), "empty"), past], axis=2)
        if window is None:
            g.nodes.append(helper.make_node("Concat", [past, new], [n[f"present_{kind}"]], name=g.name("cat"), axis=-2))
            appended[kind] = n[f"present_{kind}"]
            continue
        keep = [g.ints(-(window - 1)), g.ints(np.iinfo(np.int64).max), g.ints(2)]
        appended[kind] = g.op("Concat", [g.op("Slice", [past, *keep]), new], axis=-2)
        g.nodes.append(helper.make_node("Slice", [appended[kind], *keep], [n[f"present_{kind}"]], name=g.name("keep")))
    k_all = _repeat_kv(g, appended["k"], heads, kv_heads, head_dim)
    v_all = _repeat_kv(g, appended["v"], heads, kv_heads, head_dim)
    out = _attend(g, q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2]), v_all)
    shape = ["batch", kv_heads, "past", head_dim]
    return {"out": g.op("MatMul", [_merge(g, out, heads, head_dim), g.weight(heads * head_dim, HIDDEN)]),
            "cache": [(n["past_k"], n["present_k"], shape), (n["past_v"], n["present_v"], shape)]}


def _gpt2_layer(g, x, names, heads, _kv_heads, head_dim, _cos, _sin, _mask):
    n = names[0]
    width = heads * head_dim
    qkv = g.op("Add", [g.op("MatMul", [x, g.weight(HIDDEN, 3 * width)]),
                       g.const(g.rng.normal(size=3 * width).astype(g.dtype), "bias")])
    q, k, v = g.op("Split", [qkv, g.ints(width, width, width)], axis=2, outputs=3)
    q, v = _heads(g, q, heads, head_dim), _heads(g, v, heads, head_dim)
    k_t = g.op("Transpose", [g.op("Reshape", [k, g.ints(0, 0, heads, head_dim)])], perm=[0, 2, 3, 1])
    g.nodes.append(helper.make_node("Concat", [n["past_k"], k_t], [n["present_k"]], name=g.name("cat_k"), axis=3))
    g.nodes.append(helper.make_node("Concat", [n["past_v"], v], [n["present_v"]], name=g.name("cat_v"), axis=2))
    out = _attend(g, q, n["present_k"], n["present_v"])
    return {"out": g.op("MatMul", [_merge(g, out, heads, head_dim), g.weight(width, HIDDEN)]),
            "cache": [(n["past_k"], n["present_k"], ["batch", heads, head_dim, "past"]),
                      (n["past_v"], n["present_v"], ["batch", heads, "past", head_dim])]}


def _per_head_layer(g, x, names, heads, _kv_heads, head_dim, _cos, _sin, _mask):
    q = _heads(g, g.op("MatMul", [x, g.weight(HIDDEN, heads * head_dim)]), heads, head_dim)
    k = _heads(g, g.op("MatMul", [x, g.weight(HIDDEN, heads * head_dim)]), heads, head_dim)
    v = _heads(g, g.op("MatMul", [x, g.weight(HIDDEN, heads * head_dim)]), heads, head_dim)
    outs, cache = [], []
    for head, n in enumerate(names):
        index = g.const(np.array(head, np.int64), "head")
        q_h, k_h, v_h = (g.op("Gather", [t, index], axis=1) for t in (q, k, v))
        g.nodes.append(helper.make_node("Concat", [n["past_k"], k_h], [n["present_k"]], name=g.name("cat_k"), axis=1))
        g.nodes.append(helper.make_node("Concat", [n["past_v"], v_h], [n["present_v"]], name=g.name("cat_v"), axis=1))
        outs.append(_attend(g, q_h, g.op("Transpose", [n["present_k"]], perm=[0, 2, 1]), n["present_v"]))
        shape = ["batch", "past", head_dim]
        cache += [(n["past_k"], n["present_k"], shape), (n["past_v"], n["present_v"], shape)]
    out = g.op("Concat", outs, axis=2)
    return {"out": g.op("MatMul", [out, g.weight(heads * head_dim, HIDDEN)]), "cache": cache}


def _gqa_op_layer(g, x, names, heads, kv_heads, head_dim, _cos, _sin, mask):
    n = names[0]
    q = g.op("MatMul", [x, g.weight(HIDDEN, heads * head_dim)])
    k = g.op("MatMul", [x, g.weight(HIDDEN, kv_heads * head_dim)])
    v = g.op("MatMul", [x, g.weight(HIDDEN, kv_heads * head_dim)])
    lengths = g.op("Sub", [g.op("ReduceSum", [mask, g.ints(1)], keepdims=0), g.const(np.array(1, np.int64))])
    seqlens = g.op("Cast", [lengths], to=TensorProto.INT32)
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask]), g.const(np.array(1, np.int64))])], to=TensorProto.INT32)
    g.nodes.append(helper.make_node(
        "GroupQueryAttention", [q, k, v, n["past_k"], n["past_v"], seqlens, total],
        [n["out"] if "out" in n else g.name("gqa_out"), n["present_k"], n["present_v"]],
        name=g.name("gqa"), domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads))
    out = g.nodes[-1].output[0]
    shape = ["batch", kv_heads, "past", head_dim]
    return {"out": g.op("MatMul", [out, g.weight(heads * head_dim, HIDDEN)]),
            "cache": [(n["past_k"], n["present_k"], shape), (n["past_v"], n["present_v"], shape)]}


def build_encoder() -> onnx.ModelProto:
    """A model without any KV cache (an encoder layer)."""
    g = _Graph(np.float32)
    g.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
    x = g.op("Gather", [g.weight(VOCAB, HIDDEN), "input_ids"])
    q, k, v = (g.op("MatMul", [x, g.weight(HIDDEN, HIDDEN)]) for _ in range(3))
    out = _attend(g, q, g.op("Transpose", [k], perm=[0, 2, 1]), v)
    g.outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "seq", HIDDEN]))
    model = helper.make_model(helper.make_graph(g.nodes, "encoder", g.inputs, g.outputs, g.inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def saved_llama_decoder(folder):
    """The 2-layer llama-form decoder (4 heads, 2 KV heads, head_dim 64) saved in `folder`:
    (path, KVGraph, float Decoder) for tests that calibrate and measure on it."""
    import onnx_ir as ir

    from kvcompile.manifest import float_model_io
    from kvcompile.passes.find_kv_cache import find_kv_cache
    from kvcompile.runtimes.decoder import Decoder
    from kvcompile.runtimes.session import cpu_session

    proto = build_decoder("llama", layers=2, heads=4, kv_heads=2, head_dim=64)
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    kv = find_kv_cache(ir.serde.deserialize_model(proto))
    return path, kv, Decoder(cpu_session(path), float_model_io(kv, str(path)))
