"""--scheme auto: the budgeted choice (unit) and the whole planner on a synthetic decoder."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kvcompile.autoplan import Option, auto_plan, choose
from kvcompile.errors import BadInputError
from kvcompile.plan import TensorPlan
from kvcompile.runtimes.calibrate import collect_kv_stats
from synthetic import saved_llama_decoder


def option(name: str, bits: float, kl: float) -> Option:
    plan = TensorPlan("x", "x", int(bits) if bits < 9 else None, name, True, None, None, name)
    return Option((plan,), bits, kl)


def test_choose_spends_the_budget_where_it_saves_most_kl():
    sensitive = [option("2", 2, 0.5), option("4", 4, 0.1), option("8", 8, 0.0)]
    robust = [option("2", 2, 0.011), option("4", 4, 0.01), option("8", 8, 0.0)]
    chosen = choose([sensitive, robust], [1, 1], budget=5.0)
    assert [c.bits_per_element for c in chosen] == [8, 2], "8 bits where they matter, 2 where harmless"
    assert sum(c.bits_per_element for c in chosen) / 2 <= 5.0


def test_choose_never_exceeds_the_budget_and_takes_the_best_fitting():
    options = [[option("a", 4, 0.3), option("b", 4.25, 0.2), option("c", 4.5, 0.1)] for _ in range(4)]
    chosen = choose(options, [64] * 4, budget=4.25)
    mean = sum(c.bits_per_element for c in chosen) / 4
    assert mean <= 4.25 + 1e-9
    assert sum(c.kl for c in chosen) == pytest.approx(0.8), "two at 4.5 and two at 4.0 beat four at 4.25"


def test_choose_refuses_an_impossible_budget():
    with pytest.raises(BadInputError, match="below the cheapest"):
        choose([[option("a", 4, 0.1)]], [1], budget=3.0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path, kv, decoder = saved_llama_decoder(tmp_path_factory.mktemp("auto"))
    windows = np.random.default_rng(0).integers(0, 32, (8, 128))
    return path, kv, decoder, windows, collect_kv_stats(decoder, windows, chunk=32)


def no_progress(_description, _total):
    return lambda _units: None


@pytest.mark.parametrize("budget,uniform", [(4.0, False), (4.5, False), (4.0, True), (8.0, True)])
def test_auto_plan_respects_budget_and_explains(synthetic, tmp_path, budget, uniform):
    path, kv, decoder, windows, stats = synthetic
    plan = auto_plan(kv, stats, decoder, windows, budget, "wmse", uniform, no_progress)
    elements = [t.elements_per_token for t in kv.tensors]
    bits = [plan.for_input(t.past_input).stored_bits_per_element(t) for t in kv.tensors]
    assert np.dot(elements, bits) / sum(elements) <= budget + 1e-9
    if uniform:
        assert {t.bits for t in plan.tensors} == {int(budget)}
    for tensor_plan in plan.tensors:
        assert tensor_plan.reason.startswith("auto: least next-token KL")
        assert tensor_plan.name in tensor_plan.evidence, "the choice is among the measured candidates"
        best_affordable = min(kl for name, kl in tensor_plan.evidence.items())
        assert tensor_plan.evidence[tensor_plan.name] >= best_affordable


def test_fused_advice_does_not_read_the_kernels_4_bit_only_curve():
    """Fused attention: every candidate auto measured is the kernel's 4-bit cache, so a flat budget
    curve says nothing about what 8 bits would buy: the advice names the way to them instead of
    claiming that no --kv-bits up to 8 meets the gate."""
    from kvcompile.advice import FUSION_ADVICE, gate_advice
    from kvcompile.plan import QuantPlan

    flat = QuantPlan((), scheme="auto", bits=4.0, budget_curve=((4.0, 0.12), (8.0, 0.12)))
    assert gate_advice(flat, 12.0, 2.0, fused=True, fuse_mode="auto") == [FUSION_ADVICE]
    assert "no --kv-bits up to 8" in gate_advice(flat, 12.0, 2.0, fused=False, fuse_mode="off")[0]


def _stats_for(kv, center: float):
    """Calibration statistics of entries spread around `center` in every channel."""
    from kvcompile.kvstats import KVStats, TensorStats

    rng = np.random.default_rng(0)
    tensors = {}
    for t in kv.tensors:
        samples = (center + rng.normal(size=(256, t.num_heads, t.head_dim))).astype(np.float32)
        tensors[t.past_input] = TensorStats(samples, np.abs(samples).max(0), samples.min(0), samples.max(0), 256)
    return KVStats(tensors, 256)


def test_gqa_candidates_center_what_the_kernel_lets_out_exactly():
    """A GroupQueryAttention layer's per-channel keys are stored minus their calibrated midpoint
    where the node takes them apart and does not rotate them (centerable), and the centered range
    is the spread around it, not the distance from zero."""
    import onnx_ir as ir

    from kvcompile.autoplan import candidate_plans, units
    from kvcompile.passes.find_kv_cache import find_kv_cache
    from synthetic import build_decoder

    kv = find_kv_cache(ir.serde.deserialize_model(build_decoder("gqa_op", layers=1)))
    unit = units(kv)[0]
    assert [t.centerable for t in unit] == [True, False]
    stats = _stats_for(kv, center=5.0)
    names = [", ".join(p.name for p in plans) for plans in candidate_plans(unit, stats, (2, 4, 8), "wmse")]
    assert names == ["4-bit per-channel centered, 4-bit per-channel"], "the kernel's finest storage, alone"
    unmovable = tuple(replace(t, centerable=False) for t in unit)
    centered = candidate_plans(unit, stats, (4,), "wmse")[0][0]
    plain = candidate_plans(unmovable, stats, (4,), "wmse")[0][0]
    assert plain.name == "4-bit per-channel" and plain.center is None
    assert np.allclose(centered.center, 5.0, atol=1.0)
    assert centered.scale.max() < plain.scale.min() / 1.5, "the grid spans the spread, not 0..max"
    assert centered.static_bytes() == plain.static_bytes() + centered.center.size * 4



def test_gqa_layers_take_the_kernels_storage_without_measuring(tmp_path):
    """A GroupQueryAttention model gives auto one candidate per layer: nothing is run (the
    decoder would fail if it were), every tensor says why, and no KL is claimed."""
    import onnx_ir as ir

    from kvcompile.passes.find_kv_cache import find_kv_cache
    from synthetic import build_decoder

    kv = find_kv_cache(ir.serde.deserialize_model(build_decoder("gqa_op", layers=2)))
    announced = []

    def progress(description, _total):
        announced.append(description)
        return lambda _units: None

    class NeverRun:
        def __getattr__(self, name):
            raise AssertionError(f"auto ran the model ({name}) with nothing to choose")

    plan = auto_plan(kv, _stats_for(kv, center=1.0), NeverRun(), np.zeros((2, 64), np.int64), 4.0, "wmse",
                     False, progress)
    assert announced == []
    assert [p.granularity for p in plan.tensors] == ["per-channel"] * len(kv.tensors)
    for tensor_plan in plan.tensors:
        assert "not measured" in tensor_plan.reason and tensor_plan.evidence == {}


def test_a_failed_quantized_htp_graph_is_advised_its_float16_precision():
    """qnn-htp failing the gate where ort-cpu passed: the advice names --htp-precision fp16, unless
    that is what failed."""
    import dataclasses

    from kvcompile.pipeline import HTP_FP16_ADVICE, verdict
    from kvcompile.plan import QuantPlan
    from kvcompile.quality import TargetQuality

    passed = TargetQuality(ran_on="cpu", float_ppl=10.0, quantized_ppl=10.1, ppl_delta_pct=1.0, top1_agreement=0.9,
                           mean_kl=0.01, eval_tokens=100, eval_text="t", quality_gate_pct=2.0, passed=True)
    failed = dataclasses.replace(passed, quantized_ppl=10.9, ppl_delta_pct=9.0, passed=False)
    plan = QuantPlan((), scheme="auto", bits=4.0)
    qualities = {"ort-cpu": passed, "qnn-htp": failed}
    result = verdict(qualities, plan, 2.0, fused=True, fuse_mode="auto", htp_precision="quantized")
    assert not result.passed and result.failed_targets == ("qnn-htp",) and result.advice == (HTP_FP16_ADVICE,)
    assert verdict(qualities, plan, 2.0, fused=True, fuse_mode="auto", htp_precision="fp16").advice == ()
    assert verdict({"ort-cpu": passed, "nnapi": failed}, plan, 2.0, fused=True, fuse_mode="auto").advice == ()
