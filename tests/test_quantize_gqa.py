"""onnxruntime's 4-bit GroupQueryAttention cache stores exactly what kvcompile.quant says, and the
pass that switches it on."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import GROUP_QUERY_ATTENTION, KVAxes, KVGraph, KVTensor
from kvcompile.passes.find_kv_cache import find_kv_cache, key_centering_error
from kvcompile.passes.quantize_gqa import QuantizeGQACachePass
from kvcompile.quant import Codec, symmetric_scale
from synthetic import build_decoder

HEADS, KV_HEADS, HEAD_DIM = 2, 1, 8


def gqa_session(per_channel: bool) -> ort.InferenceSession:
    quant = "PER_CHANNEL" if per_channel else "PER_TENSOR"
    scale_shape = [KV_HEADS * HEAD_DIM] if per_channel else [1]
    node = helper.make_node(
        "GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total", "", "", "", "", "", "ks", "vs"],
        ["o", "prk", "prv"], domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
        kv_cache_bit_width=4, k_quant_type=quant, v_quant_type=quant)
    cache = ["b", KV_HEADS, "p", HEAD_DIM // 2]
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "s", HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", "s", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "s", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("pk", TensorProto.UINT8, cache),
        helper.make_tensor_value_info("pv", TensorProto.UINT8, cache),
        helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["b"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
        helper.make_tensor_value_info("ks", TensorProto.FLOAT, scale_shape),
        helper.make_tensor_value_info("vs", TensorProto.FLOAT, scale_shape),
    ], [helper.make_tensor_value_info(n, t, None) for n, t in (("o", TensorProto.FLOAT), ("prk", TensorProto.UINT8),
                                                                ("prv", TensorProto.UINT8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("per_channel", [False, True])
def test_onnxruntime_gqa_cache_is_kvcompile_codec(per_channel):
    rng = np.random.default_rng(0)
    new = (rng.normal(size=(1, 3, KV_HEADS * HEAD_DIM)) * 2).astype(np.float32)
    new[0, 0, :4] = [0.5, 1.5, 2.5, -0.5]  # ties round half to even
    absmax = np.abs(new).max(axis=(0, 1)) if per_channel else np.abs(new).max()
    scale = symmetric_scale(absmax * 0.8, 4)  # some values saturate
    feeds = {"q": np.zeros((1, 3, HEADS * HEAD_DIM), np.float32), "k": new, "v": new,
             "pk": np.zeros((1, KV_HEADS, 0, HEAD_DIM // 2), np.uint8),
             "pv": np.zeros((1, KV_HEADS, 0, HEAD_DIM // 2), np.uint8),
             "seqlens": np.array([2], np.int32), "total": np.array(3, np.int32),
             "ks": np.atleast_1d(scale).astype(np.float32), "vs": np.atleast_1d(scale).astype(np.float32)}
    if not per_channel:
        feeds["ks"] = feeds["vs"] = np.full(1, np.float32(scale), np.float32)
    _, present_k, _ = gqa_session(per_channel).run(None, feeds)
    layout = new.reshape(1, 3, KV_HEADS, HEAD_DIM).transpose(0, 2, 1, 3)  # [b, kv_heads, seq, d]
    codec = Codec(4, scale.reshape(1, KV_HEADS, 1, HEAD_DIM) if per_channel else scale, 8, pack_axis=3)
    np.testing.assert_array_equal(present_k, codec.encode(layout)[0])

    # and it reads stored codes back as Codec.decode: with q = 0, attention averages V
    stored = codec.encode(layout)[0]
    read = dict(feeds, k=np.zeros((1, 1, HEAD_DIM), np.float32), v=np.zeros((1, 1, HEAD_DIM), np.float32),
                pk=stored, pv=stored, seqlens=np.array([3], np.int32), total=np.array(4, np.int32),
                q=np.zeros((1, 1, HEADS * HEAD_DIM), np.float32))
    output, _, _ = gqa_session(per_channel).run(None, read)
    expected = codec.decode(stored)[0, 0].sum(axis=0) / 4  # three stored tokens and the new zero one
    np.testing.assert_allclose(output.reshape(HEADS, HEAD_DIM)[0], expected, rtol=1e-6, atol=1e-6)


def test_pass_switches_the_kernel_to_a_4bit_cache():
    proto = build_decoder("gqa_op", layers=2, heads=4, kv_heads=2, head_dim=8)
    model = ir.serde.deserialize_model(proto)
    kv = find_kv_cache(model)
    codecs = {t.past_input: Codec(4, np.full((1, 2, 1, 8), 0.05, np.float32), 8, 3) for t in kv.tensors}
    QuantizeGQACachePass(kv, codecs)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    node = next(n for n in out.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["kv_cache_bit_width"] == 4 and attrs["k_quant_type"] == b"PER_CHANNEL"
    assert len(node.input) == 14 and node.input[12] and node.input[13]
    past = next(i for i in out.graph.input if i.name == kv.tensors[0].past_input)
    assert past.type.tensor_type.elem_type == TensorProto.UINT8
    assert past.type.tensor_type.shape.dim[3].dim_value == 4
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    feeds.update({t.past_input: np.zeros((1, 2, 0, 4), np.uint8) for t in kv.tensors})
    assert np.isfinite(session.run(None, feeds)[0]).all()


def test_dynamic_scales_are_refused_with_the_reason():
    model = ir.serde.deserialize_model(build_decoder("gqa_op", layers=1))
    kv = find_kv_cache(model)
    codecs = {t.past_input: Codec(4, None, None, 3, group=8) for t in kv.tensors}
    with pytest.raises(UnsupportedModelError, match="static scales only"):
        QuantizeGQACachePass(kv, codecs)(model)


def single_gqa_model(do_rotary: int = 0, heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM
                     ) -> tuple[ir.Model, KVGraph]:
    """One float GroupQueryAttention node as a model, and the KVGraph naming its cache."""
    node = helper.make_node(
        "GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"] + (["cos", "sin"] if do_rotary else []),
        ["o", "prk", "prv"], domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=do_rotary)
    cache = ["b", kv_heads, "p", head_dim]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "s", heads * head_dim]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", "s", kv_heads * head_dim]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "s", kv_heads * head_dim]),
              helper.make_tensor_value_info("pk", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("pv", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["b"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    if do_rotary:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [16, head_dim // 2]) for n in ("cos", "sin")]
    graph = helper.make_graph([node], "g", inputs, [
        helper.make_tensor_value_info("o", TensorProto.FLOAT, ["b", "s", heads * head_dim]),
        helper.make_tensor_value_info("prk", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("prv", TensorProto.FLOAT, cache)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model = ir.serde.deserialize_model(proto)
    gqa = next(iter(model.graph))
    tensors = tuple(KVTensor(
        layer=0, kind=kind, past_input=past, present_output=present, axes=KVAxes(0, 1, 2, 3), num_heads=kv_heads,
        head_dim=head_dim, dtype="float32", attention=GROUP_QUERY_ATTENTION, past_shape=("batch", kv_heads, "seq", head_dim),
        centerable=kind == "key" and key_centering_error(gqa) is None)
        for kind, past, present in (("key", "pk", "prk"), ("value", "pv", "prv")))
    return model, KVGraph(tensors, (), "o")


def test_centered_keys_come_out_exactly():
    """Keys that sit exactly on a grid around a center far from zero (values on a grid around
    zero): stored centered they read back exactly, so the 4-bit node's output equals the float
    node's (a symmetric grid of the same scale around zero would saturate every key)."""
    model, kv = single_gqa_model()
    assert [t.centerable for t in kv.tensors] == [True, False]
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.05, 0.2, size=(1, KV_HEADS, 1, HEAD_DIM)).astype(np.float32)
    centers = {"key": rng.uniform(3, 6, size=(1, KV_HEADS, 1, HEAD_DIM)).astype(np.float32), "value": None}
    entries = {kind: scale * rng.integers(-7, 8, size=(1, KV_HEADS, 5, HEAD_DIM)).astype(np.float32)
               for kind in ("key", "value")}
    entries["key"] += centers["key"]
    feeds = {"q": rng.normal(size=(1, 5, HEADS * HEAD_DIM)).astype(np.float32),
             **{name: entries[kind].transpose(0, 2, 1, 3).reshape(1, 5, KV_HEADS * HEAD_DIM)
                for name, kind in (("k", "key"), ("v", "value"))},
             "seqlens": np.array([4], np.int32), "total": np.array(5, np.int32)}
    float_session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                         providers=["CPUExecutionProvider"])
    empty = np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
    expected = float_session.run(["o"], dict(feeds, pk=empty, pv=empty))[0]

    codecs = {t.past_input: Codec(4, scale, 8, pack_axis=3, center=centers[t.kind]) for t in kv.tensors}
    QuantizeGQACachePass(kv, codecs)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node].count("Sub") == 1
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    packed = np.zeros((1, KV_HEADS, 0, HEAD_DIM // 2), np.uint8)
    output_name = out.graph.output[0].name
    output, present_k, present_v = session.run([output_name, "prk", "prv"], dict(feeds, pk=packed, pv=packed))
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(present_k, codecs["pk"].encode(entries["key"])[0])
    np.testing.assert_array_equal(codecs["pv"].decode(present_v), entries["value"].astype(np.float32))
    uncentered = Codec(4, scale, 8, pack_axis=3)
    assert np.abs(uncentered.fake_quantize(entries["key"]) - entries["key"]).max() > 1.0


def test_keys_rotated_inside_the_node_are_not_centered():
    model, kv = single_gqa_model(do_rotary=1)
    assert not any(t.centerable for t in kv.tensors)
    codecs = {t.past_input: Codec(4, np.full((1, KV_HEADS, 1, HEAD_DIM), 0.1, np.float32), 8, pack_axis=3,
                                  center=np.ones((1, KV_HEADS, 1, HEAD_DIM), np.float32) if t.kind == "key" else None)
              for t in kv.tensors}
    with pytest.raises(UnsupportedModelError, match="rotates the keys itself"):
        QuantizeGQACachePass(kv, codecs)(model)
    assert "kv_cache_bit_width" not in next(iter(model.graph)).attributes, "refused before rewriting"
