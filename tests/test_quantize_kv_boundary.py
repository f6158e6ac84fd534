"""The Q/DQ boundary rewrite on synthetic decoders: valid ONNX, runs, stores what quant.py says."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest

from kvcompile.errors import UnsupportedModelError
from kvcompile.manifest import float_model_io
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.quantize_kv_boundary import QuantizeKVBoundaryPass
from kvcompile.plan import stored_kvio
from kvcompile.plan import make_plan
from kvcompile.quant import Codec
from kvcompile.runtimes.calibrate import collect_kv_stats, to_canonical
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from synthetic import build_decoder

FORMS = {
    "llama": dict(form="llama"),
    "gpt2 (transposed keys)": dict(form="gpt2", heads=2),
    "per_head": dict(form="per_head", heads=2),
    "llama fp16": dict(form="llama", dtype=np.float16),
}


def compile_synthetic(bits: int, scheme: str, asymmetric: bool = False, **kwargs):
    proto = build_decoder(layers=2, head_dim=64, **kwargs)
    model = ir.serde.deserialize_model(proto)
    kv = find_kv_cache(model)
    float_io = float_model_io(kv, "float")
    float_decoder = Decoder(cpu_session(proto.SerializeToString()), float_io)
    windows = np.random.default_rng(0).integers(0, 32, (4, 16))
    plan = make_plan(kv, collect_kv_stats(float_decoder, windows, chunk=4), bits, scheme,
                     group_size=32, asymmetric=asymmetric)
    QuantizeKVBoundaryPass(kv, plan.codecs(kv))(model)
    ir.passes.common.TopologicalSortPass()(model)
    quantized = ir.serde.serialize_model(model)
    io = dataclasses.replace(float_io, kv=[stored_kvio(k, plan) for k in float_io.kv])
    return kv, plan, float_decoder, quantized, io


@pytest.mark.parametrize("name", sorted(FORMS))
@pytest.mark.parametrize("bits,scheme,asymmetric", [
    (4, "per-channel", False), (4, "per-tensor", False), (2, "per-channel", False), (8, "per-tensor", False),
    (4, "per-token", False), (4, "per-token", True), (2, "per-group", True), (4, "kivi", False),
    (4, "per-channel", True), (8, "per-tensor", True)])
def test_rewrite_is_valid_runs_and_stores_codes(name, bits, scheme, asymmetric):
    kv, plan, float_decoder, quantized, io = compile_synthetic(bits, scheme, asymmetric=asymmetric, **FORMS[name])
    onnx.checker.check_model(quantized, full_check=True)
    inputs = {i.name: i for i in quantized.graph.input}
    outputs = {o.name: o for o in quantized.graph.output}
    for tensor in kv.tensors:  # the same names, now uint8 with head_dim packed
        assert inputs[tensor.past_input].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert outputs[tensor.present_output].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        stored = inputs[tensor.past_input].type.tensor_type.shape.dim[tensor.axes.head_dim].dim_value
        assert stored == tensor.head_dim * bits // 8

    decoder = Decoder(cpu_session(quantized.SerializeToString()), io)
    cache = decoder.new_cache(2)
    tokens = np.random.default_rng(1).integers(0, 32, (2, 8))
    decoder.step(cache, tokens[:, :4])
    for t in range(4, 8):
        before = dict(cache.tensors)
        logits, presents = decoder.step(cache, tokens[:, t : t + 1])
        for k in io.kv:  # old entries (and their scales) are carried over untouched
            for name, output in [(k.input, k.output)] + [(p.input, p.output) for p in k.params]:
                kept = np.take(presents[output], np.arange(before[name].shape[k.seq_axis]), axis=k.seq_axis)
                np.testing.assert_array_equal(kept, before[name])
    assert np.isfinite(logits).all()

    # Layer 0's new entries do not depend on earlier quantization: they are exactly the float
    # model's new entries encoded by quant.py.
    float_cache = float_decoder.new_cache(2)
    _, float_presents = float_decoder.step(float_cache, tokens)
    fresh = decoder.new_cache(2)
    _, presents = decoder.step(fresh, tokens)
    for tensor, k in zip(kv.tensors, io.kv):
        if tensor.layer != 0:
            continue
        codec: Codec = plan.for_input(tensor.past_input).codec(tensor)
        expected = codec.encode(float_presents[k.output].astype(np.float32))
        stored = [presents[k.output]] + [presents[p.output] for p in k.params]
        if tensor.dtype == "float32":
            for got, want in zip(stored, [e for e in expected if e is not None]):
                np.testing.assert_array_equal(got, want)
        else:  # onnxruntime fuses float16 graphs differently: values (and so a token's dynamic
            # scale, or a tie) can round the other way; the stored values stay within one step
            params = {p.kind: presents[p.output] for p in k.params}
            values = codec.decode(stored[0], params.get("scale"), params.get("zero_point"))
            want = codec.decode(*expected)
            assert np.abs(values - want).mean() <= 0.05 * np.abs(want).mean()


def test_decoded_cache_is_within_half_a_step():
    kv, plan, float_decoder, quantized, io = compile_synthetic(4, "per-channel", form="llama")
    tokens = np.random.default_rng(2).integers(0, 32, (2, 6))
    _, float_presents = float_decoder.step(float_decoder.new_cache(2), tokens)
    decoder = Decoder(cpu_session(quantized.SerializeToString()), io)
    _, presents = decoder.step(decoder.new_cache(2), tokens)
    tensor, k = kv.tensors[0], io.kv[0]
    codec = plan.for_input(tensor.past_input).codec(tensor)
    decoded = to_canonical(codec.decode(presents[k.output]), k)
    reference = to_canonical(float_presents[k.output], k)
    step = plan.for_input(tensor.past_input).scale[None]
    representable = np.clip(reference, -8 * step, 7 * step)  # values past the clip range saturate
    assert (np.abs(decoded - representable) <= step / 2 + 1e-6).all()


def test_cache_kept_inside_an_attention_op_is_refused_with_a_reason():
    proto = build_decoder("gqa_op", layers=1)
    model = ir.serde.deserialize_model(proto)
    kv = find_kv_cache(model)
    codecs = {t.past_input: Codec(4, 0.1, 8, t.axes.head_dim) for t in kv.tensors}
    with pytest.raises(UnsupportedModelError, match="kept by com.microsoft.GroupQueryAttention itself"):
        QuantizeKVBoundaryPass(kv, codecs)(model)


@pytest.mark.parametrize("scheme", ["per-channel", "per-token"])
def test_several_shape_readers_of_one_cache_input(scheme):
    """Dynamo exports read each past input's shape in several places; every reader must get the
    logical shape, and everything inserted must have a name unique in the graph (it once did
    not: one name counter per reader gave 'factor_2' twice)."""
    kv, plan, float_decoder, quantized, io = compile_synthetic(4, scheme, form="llama", shape_readers=4)
    onnx.checker.check_model(quantized, full_check=True)
    names = [n.name for n in quantized.graph.node] + [v for n in quantized.graph.node for v in n.output]
    names += [t.name for t in quantized.graph.initializer]
    assert len(names) == len(set(names))
    compiled = Decoder(cpu_session(quantized.SerializeToString()), io)
    tokens = np.random.default_rng(1).integers(0, 32, (2, 12))
    caches = float_decoder.new_cache(2), compiled.new_cache(2)
    for chunk in (tokens[:, :8], tokens[:, 8:9], tokens[:, 9:10]):
        a, _ = float_decoder.step(caches[0], chunk)
        b, _ = compiled.step(caches[1], chunk)
    assert np.abs(a - b).max() < 0.5 * np.abs(a).max()


@pytest.mark.parametrize("scheme", ["per-channel", "per-token"])
def test_sliding_window_cache_stays_bounded_and_stores_codes(scheme):
    """A sliding-window cache (past cut to its last window-1 entries, present likewise) keeps its
    slices in the code domain: the stored cache never grows past window-1 entries, and it holds
    the float model's entries encoded (layer 0, whose entries do not depend on an earlier cache)."""
    window = 6
    kv, plan, float_decoder, quantized, io = compile_synthetic(4, scheme, form="llama", window=window)
    assert {t.kept_entries for t in kv.tensors} == {window - 1}
    onnx.checker.check_model(quantized, full_check=True)
    compiled = Decoder(cpu_session(quantized.SerializeToString()), io)
    tokens = np.random.default_rng(2).integers(0, 32, (2, 14))
    caches = float_decoder.new_cache(2), compiled.new_cache(2)
    float_decoder.step(caches[0], tokens[:, :4])
    compiled.step(caches[1], tokens[:, :4])
    for t in range(4, tokens.shape[1]):
        _, float_presents = float_decoder.step(caches[0], tokens[:, t : t + 1])
        _, presents = compiled.step(caches[1], tokens[:, t : t + 1])
    for tensor, k in zip(kv.tensors, io.kv):
        assert presents[k.output].shape[tensor.axes.seq] == window - 1
        if tensor.layer == 0:
            codec = plan.for_input(tensor.past_input).codec(tensor)
            params = {p.kind: presents[p.output] for p in k.params}
            decoded = codec.decode(presents[k.output], params.get("scale"), params.get("zero_point"))
            expected = codec.decode(*codec.encode(float_presents[k.output]))
            np.testing.assert_allclose(decoded, expected, atol=1e-6)
