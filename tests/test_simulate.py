"""The stored-cache simulation auto measures with reads back what the compiled model reads."""

from __future__ import annotations

import numpy as np
import pytest

from kvcompile.pipeline import build_variant
from kvcompile.plan import make_plan
from kvcompile.runtimes.calibrate import collect_kv_stats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.sensitivity import float_prefill, mean_kl, reference_log_probs
from kvcompile.runtimes.simulate import StoredCacheDecoder
from kvcompile.runtimes.weights import WeightPool
from synthetic import saved_llama_decoder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path, kv, decoder = saved_llama_decoder(tmp_path_factory.mktemp("simulate"))
    windows = np.random.default_rng(0).integers(0, 32, (4, 64))
    return path, kv, decoder, windows, collect_kv_stats(decoder, windows, chunk=16)


def decode(decoder: Decoder, windows: np.ndarray) -> np.ndarray:
    """Logits of a prefill, single-token steps and a chunk: every way a step appends entries."""
    cache = decoder.new_cache(windows.shape[0])
    pieces = [decoder.step(cache, windows[:, :16])[0]]
    pieces += [decoder.step(cache, windows[:, t : t + 1])[0] for t in range(16, 40)]
    pieces.append(decoder.step(cache, windows[:, 40:44])[0])
    return np.concatenate(pieces, axis=1)


@pytest.mark.parametrize("scheme,asymmetric", [("per-channel", False), ("per-tensor", False),
                                                ("per-token", True), ("per-group", False)])
def test_simulation_matches_the_compiled_q_dq_model(synthetic, tmp_path, scheme, asymmetric):
    path, kv, decoder, windows, stats = synthetic
    plan = make_plan(kv, stats, 4, scheme, asymmetric=asymmetric)
    compiled = decode(build_variant(path, kv, plan, tmp_path, WeightPool()), windows)
    simulated = decode(StoredCacheDecoder(decoder.session, decoder.io, plan.codecs(kv, packed=False)), windows)
    floating = decode(decoder, windows)
    assert np.abs(compiled - floating).max() > 1e-2, "4-bit storage changes the logits"
    np.testing.assert_allclose(simulated, compiled, atol=1e-4, rtol=0)


def test_asymmetric_static_ranges_hold_the_calibrated_range_and_zero(synthetic):
    _, kv, _, _, stats = synthetic
    plan = make_plan(kv, stats, 4, "per-channel", asymmetric=True)
    for tensor in kv.tensors:
        tensor_plan = plan.for_input(tensor.past_input)
        assert not tensor_plan.symmetric and tensor_plan.zero_point.shape == tensor_plan.scale.shape
        codec = tensor_plan.canonical_codec()
        samples = stats.tensors[tensor.past_input].samples
        step = tensor_plan.scale[None]
        assert (np.abs(codec.fake_quantize(samples) - samples) <= step / 2 + 1e-6).all(), "nothing clipped"
        assert (codec.fake_quantize(np.zeros_like(samples[:1])) == 0).all(), "zero is exact"


def test_a_shared_float_prefill_measures_what_running_the_prefill_does(synthetic):
    _, kv, decoder, windows, stats = synthetic
    plan = make_plan(kv, stats, 4, "per-token", asymmetric=True)
    stored = StoredCacheDecoder(decoder.session, decoder.io, plan.codecs(kv, packed=False))
    reference = reference_log_probs(decoder, windows, 16)
    kl = mean_kl(stored, windows, reference, 16, 4)
    assert kl > 0
    assert mean_kl(stored, windows, reference, 16, 4, float_prefill(decoder, windows, 16)) == pytest.approx(kl, rel=1e-5)
