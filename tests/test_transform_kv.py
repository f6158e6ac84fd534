"""Rotation and scale folding change how K/V are stored but not what the float model computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import DYNAMO
from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.manager import run_passes
from kvcompile.passes.transform_kv import KVTransform, hadamard, transform_passes
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from synthetic import build_decoder

FORMS = {
    "llama (GQA, RoPE)": dict(form="llama", heads=4, kv_heads=2, head_dim=16),
    "gpt2 (keys transposed)": dict(form="gpt2", heads=2, head_dim=16),
    "per_head": dict(form="per_head", heads=2, head_dim=16),
    # the past reaches the Concat through a Slice: the transform must take the other operand
    "llama, sliding window of 4": dict(form="llama", heads=4, kv_heads=2, head_dim=16, window=4),
}


def decode_logits(proto: onnx.ModelProto, kv, tokens: np.ndarray):
    decoder = Decoder(cpu_session(proto.SerializeToString()), float_model_io(kv, "m"))
    cache = decoder.new_cache(tokens.shape[0])
    out = [decoder.step(cache, tokens[:, :5])[0]]
    out += [decoder.step(cache, tokens[:, t : t + 1])[0] for t in range(5, tokens.shape[1])]
    return np.concatenate(out, axis=1), cache


def transforms(kv, kind: str, seed: int = 0) -> dict[str, KVTransform]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in kv.tensors:
        if kind == "rotation":
            out[t.past_input] = KVTransform.rotation(t)
        elif kind == "scaling":
            out[t.past_input] = KVTransform.scaling(rng.uniform(0.05, 4.0, size=(t.num_heads, t.head_dim)).astype(np.float32))
        elif kind == "centered":  # keys shifted by a per-channel center, then scaled; values scaled only
            scaling = KVTransform.scaling(rng.uniform(0.05, 4.0, size=(t.num_heads, t.head_dim)).astype(np.float32))
            shift = rng.normal(0.0, 3.0, size=(t.num_heads, t.head_dim)).astype(np.float32) if t.kind == "key" else None
            out[t.past_input] = KVTransform(diagonal=scaling.diagonal, shift=shift)
        elif kind == "center only":
            if t.kind == "key":
                out[t.past_input] = KVTransform(shift=rng.normal(0.0, 3.0, size=(t.num_heads, t.head_dim)).astype(np.float32))
        else:  # a random well-conditioned invertible matrix per head (orthogonal x diagonal)
            orthogonal = np.linalg.qr(rng.normal(size=(t.num_heads, t.head_dim, t.head_dim)))[0]
            stretch = rng.uniform(0.5, 2.0, size=(t.num_heads, 1, t.head_dim))
            out[t.past_input] = KVTransform(matrix=(orthogonal * stretch).astype(np.float32))
    return out


def test_hadamard_is_orthonormal_and_symmetric():
    h = hadamard(64)
    np.testing.assert_allclose(h @ h.T, np.eye(64), atol=1e-6)
    np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("kind", ["rotation", "scaling", "general", "centered", "center only"])
def test_transform_leaves_float_logits_unchanged(form, kind):
    """Keys shifted by a center too: softmax ignores the per-query constant q.c, nothing else changes."""
    proto = build_decoder(layers=2, **FORMS[form])
    model = ir.serde.deserialize_model(proto)
    kv = find_kv_cache(model)
    assert run_passes(model, *transform_passes(kv, transforms(kv, kind)))
    transformed = ir.serde.serialize_model(model)
    onnx.checker.check_model(transformed, full_check=True)
    tokens = np.random.default_rng(1).integers(0, 32, (2, 9))
    before, cache_before = decode_logits(proto, kv, tokens)
    after, cache_after = decode_logits(transformed, kv, tokens)
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-4)
    name = kv.tensors[0].past_input
    assert not np.allclose(cache_before.tensors[name], cache_after.tensors[name]), "the cache is stored transformed"


@pytest.mark.parametrize("kind", ["rotation", "scaling"])
def test_fixture_logits_unchanged(kind):
    model = load_model(DYNAMO)
    kv = find_kv_cache(model)
    scales = {t.past_input: np.random.default_rng(2).uniform(0.05, 2.0, (2, 64)).astype(np.float32) for t in kv.tensors}
    if kind == "scaling":  # RoPE keys: tie each rotary pair (i, i + 32) so the scaling commutes with RoPE
        scales = {k: np.concatenate([v[:, :32], v[:, :32]], axis=1) for k, v in scales.items()}
        chosen = {k: KVTransform.scaling(v) for k, v in scales.items()}
    else:
        chosen = transforms(kv, "rotation")
    run_passes(model, *transform_passes(kv, chosen))
    tokens = np.random.default_rng(3).integers(0, 2048, (2, 12))
    before, _ = decode_logits(onnx.load(DYNAMO), kv, tokens)
    after, _ = decode_logits(ir.serde.serialize_model(model), kv, tokens)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-3)
    assert np.abs(after - before).mean() < 1e-5
