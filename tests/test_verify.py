"""The verifier's early stop: a verification whose failure only decides a rebuild ends once the
gate can no longer pass, and never when it still can."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import DYNAMO
from kvcompile.model_io import load_model
from kvcompile.manifest import float_model_io
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.plan import make_plan
from kvcompile.runtimes.calibrate import collect_kv_stats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import DecodeScore, decode_path_scores
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.simulate import StoredCacheDecoder
from kvcompile.runtimes.kvcache import CACHE_FLOOR_BYTES, windows_together
from kvcompile.runtimes.verify import cannot_pass, decode_quality, delta_stderr_pct


def score(nll: float, tokens: int) -> DecodeScore:
    return DecodeScore(ppl=math.exp(nll), nll=nll, tokens=tokens)


def test_cannot_pass_only_when_even_float_quality_on_the_rest_fails_the_gate():
    gate = 2.0  # %: log(1.02) = 0.0198 nats per prediction
    assert cannot_pass(score(2.0, 100), score(2.05, 100), 0, gate)  # all seen: +5%
    assert not cannot_pass(score(2.0, 100), score(2.05, 100), 200, gate)  # 5 nats lost over 300 predictions
    assert cannot_pass(score(2.0, 100), score(2.07, 100), 200, gate)  # 7 nats lost over 300
    assert not cannot_pass(score(2.0, 100), score(1.9, 100), 0, gate)  # better than float
    assert not cannot_pass(score(2.0, 0), score(2.0, 0), 100, gate)


@pytest.fixture(scope="module")
def fixture_decoders(heldout_ids):
    model = load_model(DYNAMO)
    kv = find_kv_cache(model)
    decoder = Decoder(cpu_session(DYNAMO), float_model_io(kv, str(DYNAMO)))
    windows = heldout_ids[: 8 * 128].reshape(8, 128)
    plan = make_plan(kv, collect_kv_stats(decoder, windows[:2], chunk=32), 2, "per-tensor")
    return decoder, StoredCacheDecoder(decoder.session, decoder.io, plan.codecs(kv, packed=False)), windows


def test_a_failing_verification_stops_early_and_a_passing_one_runs_whole(fixture_decoders):
    """2-bit per-tensor storage of the fixture's cache loses far more than a 1% gate allows."""
    decoder, two_bit, windows = fixture_decoders
    kwargs = dict(prefill=8, batch=8, gate_pct=1.0, text="heldout", ran_on="cpu")
    whole = decode_quality(decoder, two_bit, windows, **kwargs)
    stopped = decode_quality(decoder, two_bit, windows, stop_once_failed=True, **kwargs)
    planned = 8 * (128 - 8 - 1)
    assert not whole.passed and not whole.stopped_early and whole.eval_tokens == planned
    assert not stopped.passed and stopped.stopped_early and stopped.eval_tokens < planned / 2
    assert stopped.ppl_delta_pct > 1.0
    assert whole.ppl_delta_stderr_pct is not None and whole.ppl_delta_stderr_pct > 0
    same = decode_quality(decoder, decoder, windows, stop_once_failed=True, **kwargs)
    assert same.passed and not same.stopped_early and same.eval_tokens == planned


def test_windows_decoded_together_keep_their_caches_within_a_quarter_of_the_weights(fixture_decoders):
    """The fixture's float cache is 4 KiB a token (4 layers x K, V x 2 heads x 64 x float32)."""
    decoder, _, _ = fixture_decoders
    mib = 1 << 20
    io = decoder.io
    assert CACHE_FLOOR_BYTES == 64 * mib
    assert windows_together(io, 1024, 12, weight_bytes=0, most=16) == 6  # 4 MiB windows, held twice: 8 allowed, 2 passes of 6
    assert windows_together(io, 256, 40, weight_bytes=0, most=16) == 14  # 3 passes of at most 16: 14, 14, 12
    assert windows_together(io, 4 * 1024, 12, weight_bytes=0, most=16) == 2  # 16 MiB windows, held twice: floor
    assert windows_together(io, 4 * 1024, 12, weight_bytes=1024 * mib, most=16) == 6  # 8 allowed: 2 passes of 6
    assert windows_together(io, 16 * 1024, 12, weight_bytes=0, most=16) == 1  # one window exceeds it: still one


def test_a_reference_run_ahead_scores_as_in_lockstep(fixture_decoders):
    """The float reference computed ahead (`_StoredReference`, chunks of tokens, its own batch)
    gives the scores the lockstep run gives, one token a step for every decoder."""
    decoder, two_bit, windows = fixture_decoders
    lockstep = decode_path_scores([decoder, two_bit], windows, 8, batch=3)
    ahead = decode_path_scores([decoder, two_bit], windows, 8, batch=3, reference_chunk=16, reference_batch=2)
    for a, b in zip(lockstep, ahead):
        assert a.tokens == b.tokens == 8 * (128 - 8 - 1)
        assert a.nll == pytest.approx(b.nll, rel=1e-5)
    assert ahead[1].top1_agreement == pytest.approx(lockstep[1].top1_agreement, abs=1 / ahead[1].tokens)
    assert ahead[1].mean_kl == pytest.approx(lockstep[1].mean_kl, rel=1e-3)
    assert ahead[1].mean_kl > 0.01  # 2-bit per-tensor storage: the reference really differs from it
    for score in ahead:  # every window counted once, in order: equal windows average to the whole
        assert len(score.window_nll) == 8 and np.mean(score.window_nll) == pytest.approx(score.nll, rel=1e-9)
    assert ahead[0].window_nll == pytest.approx(lockstep[0].window_nll, rel=1e-5)


def test_the_delta_stderr_comes_from_the_windows_paired_changes():
    float_score = DecodeScore(ppl=1.0, nll=2.0, tokens=20, window_nll=(2.0, 2.0))
    assert delta_stderr_pct(float_score, DecodeScore(ppl=1.0, nll=2.02, tokens=20, window_nll=(2.01, 2.03))) == \
        pytest.approx(100 * math.exp(0.02) * 0.01)  # lost 0.01 and 0.03 nats: standard error 0.01
    assert delta_stderr_pct(float_score, DecodeScore(ppl=1.0, nll=2.02, tokens=20, window_nll=(2.02, 2.02))) == 0.0
    one = DecodeScore(ppl=1.0, nll=2.0, tokens=10, window_nll=(2.0,))
    assert delta_stderr_pct(one, one) is None


def test_a_qdq_reference_computes_the_graph_as_written(tmp_path):
    """qnn-htp's gate reads the CPU EP run of its QDQ graph as the HTP's stand-in. onnxruntime's
    default CPU session fuses DequantizeLinear(int8 weight) -> MatMul into MatMulNBits, which
    quantizes the activations to int8 too; `as_written_qdq` must compute exactly what the graph
    says (dequantize, multiply in float), as the HTP's fixed point does."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rows, width = 8, 256
    weight = rng.integers(-127, 128, size=(width, width), dtype=np.int8)
    scales = (rng.uniform(0.5, 2.0, size=width) / 127).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, width])],
        [numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(scales, "w_scale"),
         numpy_helper.from_array(np.zeros(width, np.int8), "w_zero")])
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)

    x = rng.normal(size=(rows, width)).astype(np.float32)
    x[:, 0] *= 50.0  # an outlier channel: int8 activations lose the others' precision
    exact = x.astype(np.float64) @ (weight.astype(np.float64) * scales)
    as_written = cpu_session(path, as_written_qdq=True).run(None, {"x": x})[0]
    fused = cpu_session(path).run(None, {"x": x})[0]
    scale = np.abs(exact).max()
    assert np.abs(as_written - exact).max() < 1e-5 * scale
    assert np.abs(fused - exact).max() > 1e-3 * scale  # what the default session would have measured


def test_calibration_samples_streamed_to_disk_are_the_samples_it_would_hold(fixture_decoders, tmp_path):
    """A large model's calibration writes its samples to a folder instead of holding them; what
    the planner and the report read back is the same, entry for entry, and so is the plan."""
    decoder, _, windows = fixture_decoders
    held = collect_kv_stats(decoder, windows[:4], chunk=32, max_samples=100, batch=2)
    streamed = collect_kv_stats(decoder, windows[:4], chunk=32, max_samples=100, batch=2, samples_dir=tmp_path)
    for name, stats in held.tensors.items():
        on_disk = streamed.tensors[name]
        assert on_disk.held_samples is None and on_disk.samples_file.parent == tmp_path
        np.testing.assert_array_equal(on_disk.samples, stats.samples)
        np.testing.assert_array_equal(on_disk.absmax, stats.absmax)
    kv = find_kv_cache(load_model(DYNAMO))
    for ours, theirs in zip(make_plan(kv, streamed, 4, "per-channel").tensors, make_plan(kv, held, 4, "per-channel").tensors):
        np.testing.assert_array_equal(ours.scale, theirs.scale)
