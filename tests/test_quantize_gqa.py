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
from kvcompile.passes.find_kv_cache import find_kv_cache
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
