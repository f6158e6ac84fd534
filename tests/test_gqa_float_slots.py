"""A 4-bit GroupQueryAttention with float sink and recent slots attends exactly as if those
positions were stored in float and every other position as its 4-bit codes read back."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kvcompile.errors import UnsupportedModelError
from kvcompile.passes.gqa_float_slots import GQAFloatSlotsPass, float_slot_layers
from kvcompile.passes.quantize_gqa import QuantizeGQACachePass
from kvcompile.quant import Codec
from test_quantize_gqa import single_gqa_model

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
SINKS, RECENT = 2, 3


def reference_attention(q, keys, values, codecs, total_before):
    """Softmax attention of q [B, Sq, H*D] over positions 0..T-1 (causal for the Sq new ones):
    positions in the float slots read their entries (minus a key center) in float16, the others what
    4-bit storage reads back."""
    total = keys.shape[2]
    recent = min(RECENT, max(0, total - SINKS))
    in_float = np.zeros(total, bool)
    in_float[: min(SINKS, total)] = True
    in_float[total - recent:] = True
    read = {}
    for kind, entries in (("key", keys), ("value", values)):
        stored = codecs[kind].fake_quantize(entries)
        center = codecs[kind].center if codecs[kind].center is not None else 0
        in_float16 = (entries - center).astype(np.float16).astype(np.float32) + center  # what the slots hold
        read[kind] = np.where(in_float[None, None, :, None], in_float16, stored)
    batch, new = q.shape[:2]
    queries = q.reshape(batch, new, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    group = HEADS // KV_HEADS
    k = np.repeat(read["key"], group, axis=1)
    v = np.repeat(read["value"], group, axis=1)
    scores = queries @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
    positions = total_before + np.arange(new)
    scores = np.where(np.arange(total)[None, :] <= positions[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ v).transpose(0, 2, 1, 3).reshape(batch, new, HEADS * HEAD_DIM)


@pytest.mark.parametrize("centered", [False, True])
def test_float_slots_attend_exactly(centered):
    model, kv = single_gqa_model(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    rng = np.random.default_rng(3)
    shape = (1, KV_HEADS, 1, HEAD_DIM)
    codecs = {"key": Codec(4, rng.uniform(0.2, 0.4, size=shape).astype(np.float32), 8, pack_axis=3,
                           center=rng.uniform(-1, 1, size=shape).astype(np.float32) if centered else None),
              "value": Codec(4, rng.uniform(0.2, 0.4, size=shape).astype(np.float32), 8, pack_axis=3)}
    by_input = {t.past_input: codecs[t.kind] for t in kv.tensors}
    assert float_slot_layers(model, kv) == {0}
    QuantizeGQACachePass(kv, by_input)(model)
    GQAFloatSlotsPass(kv, by_input, SINKS, RECENT)(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    output_name = proto.graph.output[0].name

    cache = {name: np.zeros((1, KV_HEADS, 0, HEAD_DIM // 2), np.uint8) for name in ("pk", "pv")}
    cache.update({f"pk_kv_{part}": np.zeros((1, 2 * KV_HEADS, 0, HEAD_DIM), np.float16) for part in ("sink", "recent")})
    keys = np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
    values = keys.copy()
    for new in (5, 1, 1, 1, 2, 1, 1):  # a prefill, decode steps, a chunk of two
        before = keys.shape[2]
        q = rng.normal(size=(1, new, HEADS * HEAD_DIM)).astype(np.float32)
        k = rng.normal(size=(1, KV_HEADS, new, HEAD_DIM)).astype(np.float32) * 2
        v = rng.normal(size=(1, KV_HEADS, new, HEAD_DIM)).astype(np.float32)
        keys, values = np.concatenate([keys, k], 2), np.concatenate([values, v], 2)
        feeds = {"q": q, "k": k.transpose(0, 2, 1, 3).reshape(1, new, -1),
                 "v": v.transpose(0, 2, 1, 3).reshape(1, new, -1),
                 "seqlens": np.array([before + new - 1], np.int32), "total": np.array(before + new, np.int32), **cache}
        outputs = dict(zip([o.name for o in proto.graph.output], session.run(None, feeds)))
        expected = reference_attention(q, keys, values, codecs, before)
        np.testing.assert_allclose(outputs[output_name], expected, rtol=2e-5, atol=2e-5)
        total = keys.shape[2]
        recent = min(RECENT, max(0, total - SINKS))
        shift = codecs["key"].center if centered else 0
        stacked = np.concatenate([keys - shift, values], axis=1).astype(np.float16)  # keys first, as fed
        np.testing.assert_array_equal(outputs["prk_kv_sink"], stacked[:, :, :SINKS])
        np.testing.assert_array_equal(outputs["prk_kv_recent"], stacked[:, :, total - recent:])
        cache = {name: outputs[name.replace("p", "pr", 1)] for name in cache}


def test_slots_refused_where_the_node_rotates_keys():
    model, kv = single_gqa_model(do_rotary=1)
    assert float_slot_layers(model, kv) == set()
    codecs = {t.past_input: Codec(4, np.float32(0.1), 8, pack_axis=3) for t in kv.tensors}
    QuantizeGQACachePass(kv, codecs)(model)
    with pytest.raises(UnsupportedModelError, match="do_rotary"):
        GQAFloatSlotsPass(kv, codecs, SINKS, RECENT)(model)
