"""The committed fixture models: valid ONNX, and each export computes what the PyTorch model does.

Every export is driven through the KV cache (a 16-token prefill, then 8 single-token decode
steps, batch 2) and its logits are compared with the PyTorch model's at every step.
Tolerances (max |logit difference|; logits reach about 15 in magnitude):
  float32 exports 1e-4, float16 export 2e-2 (float16 rounding of every activation).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import DYNAMO, FP16, GENAI, OUTLIERS, TOKENIZER
from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.runtimes.calibrate import collect_kv_stats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from models.export import FlatCacheDecoder, load_fixture
from models.outliers import inject_outliers

PREFILL, DECODE_STEPS, BATCH = 16, 8, 2
EXPORTS = {
    "onnx-dynamo": (DYNAMO, 1e-4),
    "onnx-fp16": (FP16, 2e-2),
    "onnx-genai": (GENAI, 1e-4),
    "outliers-onnx-dynamo": (OUTLIERS, 1e-4),
}


def _tokens(heldout_ids: np.ndarray) -> np.ndarray:
    return heldout_ids[: BATCH * (PREFILL + DECODE_STEPS)].reshape(BATCH, -1)


def torch_logits(model, tokens: np.ndarray) -> list[np.ndarray]:
    """Prefill then one token per step through the PyTorch model's own KV cache."""
    wrapper = FlatCacheDecoder(model)
    cfg = model.config
    empty = torch.zeros(BATCH, cfg.num_key_value_heads, 0, cfg.head_dim)
    past = tuple((empty, empty) for _ in range(cfg.num_hidden_layers))
    seen, outputs = 0, []
    chunks = [tokens[:, :PREFILL]] + [tokens[:, t : t + 1] for t in range(PREFILL, tokens.shape[1])]
    for chunk in chunks:
        ids = torch.from_numpy(chunk)
        n = ids.shape[1]
        with torch.no_grad():
            out = wrapper(ids, torch.ones(BATCH, seen + n, dtype=torch.long),
                          torch.arange(seen, seen + n)[None].expand(BATCH, n), past)
        past = tuple((out[1 + 2 * i], out[2 + 2 * i]) for i in range(cfg.num_hidden_layers))
        seen += n
        outputs.append(out[0].float().numpy())
    return outputs


def onnx_logits(path, tokens: np.ndarray) -> list[np.ndarray]:
    kv = find_kv_cache(load_model(path))
    decoder = Decoder(cpu_session(path), float_model_io(kv, str(path)))
    cache = decoder.new_cache(BATCH)
    outputs = [decoder.step(cache, tokens[:, :PREFILL])[0]]
    for t in range(PREFILL, tokens.shape[1]):
        outputs.append(decoder.step(cache, tokens[:, t : t + 1])[0])
    return outputs


@pytest.fixture(scope="module")
def reference_logits(heldout_ids):
    return torch_logits(load_fixture(), _tokens(heldout_ids))


def _checkable(path):
    """The onnxruntime-genai builder emits onnxruntime's SimplifiedLayerNormalization in the
    ONNX domain, where onnx.checker has no schema for it; check it as the custom op it is."""
    proto = onnx.load(path)
    for node in proto.graph.node:
        if node.op_type == "SimplifiedLayerNormalization" and node.domain == "":
            node.domain = "com.microsoft"
    return proto


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_fixture_is_valid_onnx(name):
    path, _ = EXPORTS[name]
    # The builder's model also carries a Constant whose recorded shape disagrees with strict
    # shape inference, so it gets the structural check; every other export the full one.
    onnx.checker.check_model(_checkable(path), full_check=name != "onnx-genai")
    kv = find_kv_cache(load_model(path))
    assert kv.num_layers == 4
    assert {t.num_heads for t in kv.tensors} == {2} and {t.head_dim for t in kv.tensors} == {64}
    assert (path.parent / "tokenizer.json").read_bytes() == TOKENIZER.read_bytes()


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_matches_pytorch_through_the_cache(name, heldout_ids):
    path, tolerance = EXPORTS[name]
    model = load_fixture()
    if name.startswith("outliers"):
        model = inject_outliers(model)
    expected = torch_logits(model, _tokens(heldout_ids))
    actual = onnx_logits(path, _tokens(heldout_ids))
    assert len(actual) == 1 + DECODE_STEPS
    for step, (got, want) in enumerate(zip(actual, expected)):
        assert got.shape == want.shape
        diff = float(np.abs(got - want).max())
        assert diff <= tolerance, f"step {step}: max |logit diff| {diff} > {tolerance}"


def test_outlier_injection_preserves_the_function(heldout_ids, reference_logits):
    """Float logits of the outlier model equal the original's, in PyTorch and in ONNX."""
    tokens = _tokens(heldout_ids)
    injected = torch_logits(inject_outliers(load_fixture()), tokens)
    for got, want in zip(injected, reference_logits):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for got, want in zip(onnx_logits(OUTLIERS, tokens), onnx_logits(DYNAMO, tokens)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_outlier_fixture_has_key_outlier_channels(heldout_ids):
    """Per-channel key absmax max/median exceeds 20 on the outlier fixture, not on the original."""
    windows = heldout_ids[: 4 * 128].reshape(4, 128)
    ratios = {}
    for name, path in (("original", DYNAMO), ("outliers", OUTLIERS)):
        kv = find_kv_cache(load_model(path))
        stats = collect_kv_stats(Decoder(cpu_session(path), float_model_io(kv, str(path))), windows)
        ratios[name] = min(
            float(stats.tensors[t.past_input].absmax.max() / np.median(stats.tensors[t.past_input].absmax))
            for t in kv.tensors if t.kind == "key"
        )
    assert ratios["outliers"] > 20, ratios
    assert ratios["original"] < 5, ratios
