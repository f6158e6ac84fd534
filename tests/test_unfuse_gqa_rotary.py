"""The onnxruntime-genai builder's GroupQueryAttention (packed QKV, do_rotary=1) taken apart exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from conftest import GENAI
from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.gqa_float_slots import float_slot_layers
from kvcompile.passes.manager import run_passes
from kvcompile.passes.unfuse_gqa_rotary import UnfuseGQARotaryPass, needs_unfusing
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "GroupQueryAttention"]


def test_unfused_attention_computes_the_same_logits_and_takes_centers_and_float_slots(tmp_path):
    model = load_model(GENAI)
    kv = find_kv_cache(model)
    assert all(needs_unfusing(n) for n in _attention_nodes(model))
    assert not any(t.centerable for t in kv.tensors) and not float_slot_layers(model, kv)

    assert run_passes(model, UnfuseGQARotaryPass(kv))
    path = tmp_path / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    unfused_kv = find_kv_cache(model)
    assert not any(needs_unfusing(n) for n in _attention_nodes(model))
    assert all(t.centerable for t in unfused_kv.tensors if t.kind == "key")
    assert float_slot_layers(model, unfused_kv) == {t.layer for t in kv.tensors}

    original = Decoder(cpu_session(GENAI), float_model_io(kv, str(GENAI)))
    unfused = Decoder(cpu_session(path), float_model_io(unfused_kv, str(path)))
    tokens = np.random.default_rng(0).integers(0, 500, (2, 40))
    caches = original.new_cache(2), unfused.new_cache(2)
    # a prompt, single decode steps and a chunk after a cache: each way the node places positions
    for start, end in ((0, 16), (16, 17), (17, 18), (18, 27), (27, 28)):
        expected, _ = original.step(caches[0], tokens[:, start:end])
        got, _ = unfused.step(caches[1], tokens[:, start:end])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
