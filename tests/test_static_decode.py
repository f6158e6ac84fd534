"""The static NPU decode graph (fixed buffers, attention bias, new-slot outputs) and its cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import DYNAMO, TOKENIZER
from kvcompile.manifest import MASKED_BIAS, float_model_io
from kvcompile.model_io import check_onnx, load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.plan import centered_channel_plan, make_plan
from kvcompile.runtimes.calibrate import collect_kv_stats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.kvcache import StaticCache
from kvcompile.runtimes.session import cpu_session
from kvcompile.targets.static import static_graph, static_target_io
from kvcompile.tokens import bundled_text, load_token_ids

CONTEXT = 48
PREFILL = 8


def calibrated_fixture():
    """The fixture's cache, its float decoder, calibration statistics and a 4-bit per-channel plan."""
    kv = find_kv_cache(load_model(DYNAMO))
    float_decoder = Decoder(cpu_session(DYNAMO), float_model_io(kv, str(DYNAMO)))
    ids = load_token_ids(bundled_text("calib.txt"), TOKENIZER)
    stats = collect_kv_stats(float_decoder, ids[: 8 * 128].reshape(8, 128))
    return kv, float_decoder, stats, make_plan(kv, stats, 4, "per-channel")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The fixture as a static graph and as the growing Q/DQ graph, with the same 4-bit plan."""
    from kvcompile.pipeline import quantize_graph
    from kvcompile.plan import stored_kvio

    work = tmp_path_factory.mktemp("static")
    kv, float_decoder, stats, plan = calibrated_fixture()
    model, folded = static_graph(DYNAMO, kv, plan, CONTEXT, style="fixed-point", fold_per_channel=True,
                                 fuse_rmsnorm=True, opset=21)  # qnn-htp's spelling
    ir.save(model, work / "static.onnx")
    io = static_target_io(kv, folded, model, "static.onnx", CONTEXT)
    static = Decoder(cpu_session(work / "static.onnx"), io)
    prefill_model, _ = static_graph(DYNAMO, kv, plan, CONTEXT, style="fixed-point", fold_per_channel=True,
                                    fuse_rmsnorm=True, opset=21, new_tokens=PREFILL)
    ir.save(prefill_model, work / "prefill.onnx")
    with_prefill = Decoder(static.session, dataclasses.replace(io, options=dataclasses.replace(
        io.options, prefill_len=PREFILL)), prefill=cpu_session(work / "prefill.onnx"))
    growing = load_model(DYNAMO)
    quantize_graph(growing, kv, plan)
    ir.save(growing, work / "growing.onnx")
    io = float_model_io(kv, "growing.onnx")
    growing_decoder = Decoder(cpu_session(work / "growing.onnx"), dataclasses.replace(
        io, kv=[stored_kvio(k, plan) for k in io.kv]))
    return work, kv, static, growing_decoder, with_prefill


def test_static_graph_io(compiled):
    work, kv, static, *_ = compiled
    # onnxruntime's fused RMSNorm (SimplifiedLayerNormalization) has no ONNX schema: structural check
    assert check_onnx(work / "static.onnx") == "structural"
    proto = onnx.load(work / "static.onnx")
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert inputs["input_ids"] == [1, 1] and inputs["position_ids"] == [1, 1]
    assert inputs["attention_bias"] == [1, 1, 1, CONTEXT] and "attention_mask" not in inputs
    assert inputs["past_key_values.0.key"] == [1, 2, CONTEXT - 1, 32], "two 4-bit codes per byte"
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert outputs["present.0.key"] == [1, 2, 1, 32], "only the new token's slot"
    ops = {n.op_type for n in proto.graph.node}
    assert {"Shape", "Range", "BitShift", "BitwiseAnd"}.isdisjoint(ops), "static shapes folded, no bit ops"
    assert {"Floor", "Round", "DequantizeLinear", "QuantizeLinear"} <= ops, "codes unpacked and packed in fixed point"
    assert "SimplifiedLayerNormalization" in ops


def test_static_graph_computes_what_the_growing_graph_does(compiled):
    """Same plan, same tokens: the fixed-buffer graph (per-channel scales folded, codes two per
    byte unpacked in fixed-point arithmetic) gives the logits of the growing Q/DQ graph."""
    _, _, static, growing, _ = compiled
    tokens = load_token_ids(bundled_text("heldout.txt"), TOKENIZER)[: CONTEXT - 1][None]
    a, _ = static.step(static.new_cache(1), tokens)
    b, _ = growing.step(growing.new_cache(1), tokens[:, :1])
    cache = growing.new_cache(1)
    b = np.concatenate([growing.step(cache, tokens[:, t : t + 1])[0] for t in range(tokens.shape[1])], axis=1)
    assert np.abs(a - b).max() < 2e-3


def test_prefill_graph_io(compiled):
    """The prefill graph reads the decode graph's buffer: N tokens, a bias row per token over the
    buffer and the N new tokens, N new entries out."""
    work = compiled[0]
    proto = onnx.load(work / "prefill.onnx")
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert inputs["input_ids"] == [1, PREFILL] and inputs["position_ids"] == [1, PREFILL]
    assert inputs["attention_bias"] == [1, 1, PREFILL, CONTEXT - 1 + PREFILL]
    assert inputs["past_key_values.0.key"] == [1, 2, CONTEXT - 1, 32], "the decode graph's buffer"
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert outputs["present.0.key"] == [1, 2, PREFILL, 32]


def test_prefill_graph_computes_what_the_growing_graph_does_in_chunks(compiled):
    """The same chunks fed to the growing Q/DQ graph (each token attends to the cache's codes and
    to its chunk's earlier tokens in float) and to the prefill graph, the last chunk padded: the
    same logits, every token written to the buffer once; decoding after it continues alike."""
    _, _, _, growing, with_prefill = compiled
    tokens = load_token_ids(bundled_text("heldout.txt"), TOKENIZER)[: 2 * PREFILL + 3][None]
    cache = with_prefill.new_cache(1)
    a, _ = with_prefill.step(cache, tokens)
    assert a.shape[1] == tokens.shape[1] and cache.length == tokens.shape[1] == cache.filled.sum()
    reference = growing.new_cache(1)
    b = np.concatenate([growing.step(reference, tokens[:, s : s + PREFILL])[0]
                        for s in range(0, tokens.shape[1], PREFILL)], axis=1)
    assert np.abs(a - b).max() < 2e-3
    a, _ = with_prefill.step(cache, tokens[:, :1])
    b, _ = growing.step(reference, tokens[:, :1])
    assert np.abs(a - b).max() < 2e-3


def test_prefill_bias_is_causal_over_the_filled_slots(compiled):
    _, _, static, _, _ = compiled
    cache = static.new_cache(1)
    static.step(cache, np.array([[1, 2]]))
    bias = cache.bias(new_tokens=3)[0, 0]
    assert bias.shape == (3, CONTEXT - 1 + 3)
    visible = bias == 0
    assert (visible[:, :2]).all() and not visible[:, 2 : CONTEXT - 1].any(), "filled slots for every row"
    np.testing.assert_array_equal(visible[:, CONTEXT - 1 :], np.tril(np.ones((3, 3), bool)))


def test_static_cache_fills_in_order_then_slides_keeping_sinks(compiled):
    _, _, static, *_ = compiled
    cache = static.new_cache(1)
    assert isinstance(cache, StaticCache) and cache.slots == CONTEXT - 1 and cache.sinks == 4
    np.testing.assert_array_equal(cache.bias()[0, 0, 0], [MASKED_BIAS] * (CONTEXT - 1) + [0.0])
    tokens = np.arange(CONTEXT + 10)[None] % 50
    for t in range(CONTEXT - 1):
        assert cache.next_slot() == t
        static.step(cache, tokens[:, t : t + 1])
    assert cache.filled.all() and (cache.bias() == 0).all()
    assert [cache.next_slot()] == [4], "full: the oldest non-sink slot is reused"
    static.step(cache, tokens[:, :1])
    assert cache.next_slot() == 5 and cache.length == CONTEXT
    for _ in range(CONTEXT):  # long generation past max_context keeps working
        logits, _ = static.step(cache, tokens[:, :1])
    assert np.isfinite(logits).all() and cache.length == 2 * CONTEXT
    assert cache.nbytes() == 8 * 2 * (CONTEXT - 1) * 32


def test_the_plan_is_legalised_per_target_from_its_capabilities():
    """One function turns the compile's plan into what a target holds: the static graphs take
    4-bit static symmetric scales (per-token tensors re-planned per-channel, keys centered, each
    change noted) and centers on keys only; ort-cpu holds the plan as it is."""
    from kvcompile.targets import TARGETS
    from kvcompile.targets.base import legalize

    kv = find_kv_cache(load_model(DYNAMO))
    decoder = Decoder(cpu_session(DYNAMO), float_model_io(kv, str(DYNAMO)))
    ids = load_token_ids(bundled_text("calib.txt"), TOKENIZER)
    stats = collect_kv_stats(decoder, ids[: 2 * 128].reshape(2, 128))
    plan = make_plan(kv, stats, 4, "per-token")
    same, notes = legalize(kv, stats, plan, TARGETS["ort-cpu"].capabilities)
    assert all(a is b for a, b in zip(same.tensors, plan.tensors)) and notes == ()
    for name in ("qnn-htp", "nnapi", "tflite"):
        static, notes = legalize(kv, stats, plan, TARGETS[name].capabilities)
        names = {t.label[-1]: t.name for t in static.tensors}
        assert names == {"K": "4-bit per-channel centered", "V": "4-bit per-channel"}
        assert len(notes) == len(kv.tensors) and "static-shape targets take static scales" in notes[0]

    centered = dataclasses.replace(plan, tensors=tuple(centered_channel_plan(t, stats, 4, "wmse") for t in kv.tensors))
    same, notes = legalize(kv, stats, centered, TARGETS["ort-cpu"].capabilities)
    assert all(t.center is not None for t in same.tensors) and notes == ()
    static, notes = legalize(kv, stats, centered, TARGETS["nnapi"].capabilities)
    assert all((t.center is not None) == (t.label.endswith("K")) for t in static.tensors)
    assert len(notes) == len(kv.tensors) // 2 and all("only through softmax: keys" in n for n in notes)


@pytest.fixture(scope="module")
def slotted(tmp_path_factory):
    """The fixture's static graph (NNAPI spelling) with centered keys and 2 + 8 float slots, the
    same without slots, and the float model."""
    from kvcompile.plan import with_float_slots

    work = tmp_path_factory.mktemp("slotted")
    kv, float_decoder, stats, plan = calibrated_fixture()
    plan = dataclasses.replace(plan, tensors=tuple(
        centered_channel_plan(t, stats, 4, "wmse") if t.kind == "key" else plan.for_input(t.past_input)
        for t in kv.tensors))
    decoders = {}
    slots = with_float_slots(plan, kv, {t.layer for t in kv.tensors}, 2, 8)
    for name, chosen in (("slots", slots), ("none", plan)):
        model, used = static_graph(DYNAMO, kv, chosen, CONTEXT, style="arithmetic",
                                   fold_per_channel=False, fuse_rmsnorm=False, opset=18)
        ir.save(model, work / f"{name}.onnx")
        decoders[name] = Decoder(cpu_session(work / f"{name}.onnx"),
                                 static_target_io(kv, used, model, f"{name}.onnx", CONTEXT))
    model, _ = static_graph(DYNAMO, kv, slots, CONTEXT, style="arithmetic", fold_per_channel=False,
                            fuse_rmsnorm=False, opset=18, new_tokens=PREFILL)
    ir.save(model, work / "prefill.onnx")
    io = decoders["slots"].io
    decoders["prefill"] = Decoder(decoders["slots"].session, dataclasses.replace(io, options=dataclasses.replace(
        io.options, prefill_len=PREFILL)), prefill=cpu_session(work / "prefill.onnx"))
    return decoders, float_decoder


def test_float_slots_read_their_tokens_exactly(slotted):
    """While every token fits in the 2 sinks + 8 recent float slots, the static graph computes the
    float model's logits (float16 copies); without slots the same tokens are read from 4 bits."""
    decoders, float_decoder = slotted
    tokens = load_token_ids(bundled_text("heldout.txt"), TOKENIZER)[:10][None]
    reference, _ = float_decoder.step(float_decoder.new_cache(1), tokens)
    with_slots, _ = decoders["slots"].step(decoders["slots"].new_cache(1), tokens)
    without, _ = decoders["none"].step(decoders["none"].new_cache(1), tokens)
    assert np.abs(with_slots - reference).max() < 0.02
    assert np.abs(without - reference).max() > 5 * np.abs(with_slots - reference).max()


def test_prefill_writes_the_float_slots_and_the_ring(slotted):
    """A prompt through the prefill graph fills the float slots as one token per call does: while
    every token fits them the logits are the float model's; past them (the ring turns, tokens
    enter the codes) the cache holds what one-token calls leave there."""
    decoders, float_decoder = slotted
    tokens = load_token_ids(bundled_text("heldout.txt"), TOKENIZER)[: 3 * PREFILL][None]
    reference, _ = float_decoder.step(float_decoder.new_cache(1), tokens[:, :10])
    prefilled, _ = decoders["prefill"].step(decoders["prefill"].new_cache(1), tokens[:, :10])
    assert np.abs(prefilled - reference).max() < 0.02
    one_by_one, by_prefill = decoders["slots"].new_cache(1), decoders["prefill"].new_cache(1)
    decoders["slots"].step(one_by_one, tokens)
    decoders["prefill"].step(by_prefill, tokens)
    assert by_prefill.coded == one_by_one.coded == 3 * PREFILL - 10
    np.testing.assert_array_equal(by_prefill.bias(), one_by_one.bias())
    for name, tensor in one_by_one.tensors.items():
        if ".0." in name:  # the first layer's entries come before any attention: identical
            np.testing.assert_array_equal(by_prefill.tensors[name], tensor)
        elif tensor.dtype == np.uint8:  # later ones differ where a chunk's earlier tokens were read in float
            assert (by_prefill.tensors[name] == tensor).mean() > 0.99, name


def test_float_slot_cache_holds_every_token_once(slotted):
    """Sinks stay in float, the ring holds the newest 8, tokens leaving it are read from their
    codes: the bias always reads every token fed (up to the buffer) exactly once, plus the new one."""
    decoders, _ = slotted
    decoder = decoders["slots"]
    cache = decoder.new_cache(1)
    assert cache.slots == CONTEXT - 1 - 10 and cache.sinks == 0
    tokens = load_token_ids(bundled_text("heldout.txt"), TOKENIZER)[: 2 * CONTEXT]
    for t, token in enumerate(tokens):
        bias = cache.bias()[0, 0, 0]
        assert bias.shape == (CONTEXT,) and (bias == 0).sum() == min(t, CONTEXT - 1) + 1, t
        logits, _ = decoder.step(cache, np.array([[token]]))
        assert np.isfinite(logits).all()
    assert cache.coded == 2 * CONTEXT - 10 and cache.filled.all()


@pytest.mark.parametrize("form", ["llama", "gpt2", "per_head"])
def test_float_slots_and_centers_in_every_cache_layout(tmp_path, form):
    """Keys stored transposed (gpt2), one cache per head, grouped heads with RoPE: the static graph
    with centered keys and 2 + 8 float slots reads every token exactly while they fit the slots."""
    from synthetic import build_decoder
    from kvcompile.plan import with_float_slots

    proto = build_decoder(form=form, layers=2, head_dim=16)
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    kv = find_kv_cache(load_model(path))
    float_decoder = Decoder(cpu_session(path), float_model_io(kv, str(path)))
    stats = collect_kv_stats(float_decoder, np.random.default_rng(0).integers(0, 32, (4, 24)))
    plan = make_plan(kv, stats, 4, "per-channel")
    plan = dataclasses.replace(plan, tensors=tuple(
        centered_channel_plan(t, stats, 4, "wmse") if t.kind == "key" else plan.for_input(t.past_input)
        for t in kv.tensors))
    plan = with_float_slots(plan, kv, {t.layer for t in kv.tensors}, 2, 8)
    model, used = static_graph(path, kv, plan, 24, style="arithmetic", fold_per_channel=False,
                               fuse_rmsnorm=False, opset=18)
    ir.save(model, tmp_path / "static.onnx")
    static = Decoder(cpu_session(tmp_path / "static.onnx"), static_target_io(kv, used, model, "static.onnx", 24))
    tokens = np.random.default_rng(1).integers(0, 32, (1, 40))
    cache = float_decoder.new_cache(1)  # one token per call: these attentions are not causal-masked
    reference = np.concatenate([float_decoder.step(cache, tokens[:, t : t + 1])[0] for t in range(10)], axis=1)
    exact, _ = static.step(static.new_cache(1), tokens[:, :10])
    assert np.abs(exact - reference).max() < 1e-2
    cache = static.new_cache(1)
    logits, _ = static.step(cache, tokens)  # the ring turns and the buffer slides
    assert np.isfinite(logits).all() and cache.coded == 40 - 10
