"""`--scheme auto`: choose how to store each cache tensor, under a bit budget, by measurement.

1. Candidates per tensor (per layer for GroupQueryAttention, which stores K and V alike):
   bits 2/4/8 (`--uniform`: only the budget's width) x per-tensor, per-channel (static,
   calibrated; symmetric or asymmetric), per-token and per-group (dynamic, symmetric or
   asymmetric). A GroupQueryAttention layer has one: the fused kernel's per-channel 4-bit cache
   (`candidate_plans` says why); a unit with one candidate is taken without measuring it.
2. Cost in quality: the next-token KL on calibration windows, fed as decoding feeds them, of
   the float model run by onnxruntime with only that tensor's cache entries replaced, as they
   enter the cache, by what that storage reads back (`runtimes.simulate`: exact for the Q/DQ
   form; one session for every candidate instead of a compiled model each).
   Cost in memory: stored bits per cache element, per-token scales and zero points included
   (they grow with the context). Static scales are a fixed few KB, whatever the context: they
   are counted in the memory figures but not against the per-element budget.
3. Choice: minimise the summed KL with the average stored bits per element at most the budget
   (`--kv-bits`), by walking each tensor up the lower convex hull of its (bits, KL) candidates,
   best KL saved per bit first (the classic multiple-choice knapsack heuristic), then taking any
   single swap that still fits and lowers the KL. 2-bit candidates are used only where they are
   harmless (KL <= 0.0005 nats: single-tensor KLs do not add up exactly, and a 2-bit tensor's
   real cost was seen to exceed its measured one); float is never chosen.
The report records every tensor's choice, its KL and the alternatives it beat, and the same
measurements give the summed KL auto would reach at other budgets (`QuantPlan.budget_curve`):
what a failed quality gate's advice is built from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from kvcompile.errors import BadInputError
from kvcompile.kvgraph import GROUP_QUERY_ATTENTION, KVGraph, KVTensor
from kvcompile.plan import QuantPlan, TensorPlan, tensor_plan
from kvcompile.kvstats import KVStats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.sensitivity import float_prefill, mean_kl, reference_log_probs
from kvcompile.runtimes.simulate import StoredCacheDecoder

HARMLESS_KL = 0.0005  # nats: where 2-bit storage is allowed
CURVE_STEPS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # budgets above --kv-bits the curve is computed at (up to 8)
SENSITIVITY_WINDOWS = 8
SENSITIVITY_WINDOW = 128
SENSITIVITY_PREFILL = 32
SENSITIVITY_CHUNK = 4
NOT_MEASURED = 0.0  # the KL of a unit's only candidate: not measured, adds nothing to the sums
REFERENCE_BUDGET = 1 << 24  # float32 reference log-probabilities kept: 64 MiB


@dataclass(frozen=True)
class Option:
    plans: tuple[TensorPlan, ...]  # one per tensor of the unit
    bits_per_element: float  # stored per cache element: codes and per-token parameters
    kl: float

    @property
    def name(self) -> str:
        names = [plan.name for plan in self.plans]
        if len(set(names)) == 1:
            return names[0]
        return ", ".join(f"{plan.label.split('.')[-1]} {name}" for plan, name in zip(self.plans, names))


def units(kv: KVGraph) -> list[tuple[KVTensor, ...]]:
    """What auto chooses for together: one tensor, or both tensors of a GroupQueryAttention layer
    (the fused CPU kernel stores K and V at one bit width with one kind of scale)."""
    out: list[tuple[KVTensor, ...]] = []
    for tensor in kv.tensors:
        if tensor.attention == GROUP_QUERY_ATTENTION and tensor.kind == "value":
            continue
        if tensor.attention == GROUP_QUERY_ATTENTION:
            value = next(t for t in kv.tensors if t.layer == tensor.layer and t.kind == "value")
            out.append((tensor, value))
        else:
            out.append((tensor,))
    return out


def candidate_plans(unit: tuple[KVTensor, ...], stats: KVStats, widths: tuple[int, ...], clip: str
                    ) -> list[tuple[TensorPlan, ...]]:
    """4-bit: every granularity (per-channel symmetric and asymmetric); 8-bit: per-channel and
    per-token; 2-bit: the dynamic ones
    (static 2-bit scales are never competitive). A GroupQueryAttention layer can only be stored
    the ways the fused kernel stores it: 4 bits (its 8-bit cache is int8, which kvcompile does not
    emit), static symmetric scales, K and V alike, one scale per tensor or per channel. That
    leaves one candidate, per-channel: at the same 4 bits it gives each channel a step no wider
    than a shared per-tensor one would, and it was chosen for every one of SmolLM2's 30 layers
    when both were measured (per-tensor fails by +7,744% on the outlier fixture, README).
    A unit with one candidate has nothing to choose and is not measured (`auto_plan`): on a
    30-layer model that was half of a compile's sensitivity runs for no decision. Its per-channel
    keys are centered wherever the kernel lets the center out exactly (`plan.tensor_plan`): over
    whole contexts centering won clearly (SmolLM2 +12.88% -> +6.42%, simulated at 4 x 1024
    tokens), while auto's single-layer measurements on 128-token windows chose it for only 19 of
    30 layers (+9.47% compiled; README)."""
    tensor = unit[0]
    if tensor.attention == GROUP_QUERY_ATTENTION:
        return [tuple(tensor_plan(t, stats, 4, "per-channel", clip) for t in unit)]
    group = 32 if tensor.head_dim > 32 and tensor.head_dim % 32 == 0 else None
    plans = []
    for bits in widths:
        if bits != 2 or len(widths) == 1:
            plans.append(tensor_plan(tensor, stats, bits, "per-channel", clip))
        if bits == 4:
            plans.append(tensor_plan(tensor, stats, bits, "per-channel", clip, symmetric=False))
        if bits == 4 or len(widths) == 1:
            plans.append(tensor_plan(tensor, stats, bits, "per-tensor", clip))
            plans.append(tensor_plan(tensor, stats, bits, "per-token", clip, symmetric=True))
            if group:
                plans.append(tensor_plan(tensor, stats, bits, "per-group", clip, group, True))
        plans.append(tensor_plan(tensor, stats, bits, "per-token", clip, symmetric=False))
        if group and bits != 8:
            plans.append(tensor_plan(tensor, stats, bits, "per-group", clip, group, False))
    return [(plan,) for plan in plans]


def _lower_hull(options: list[Option]) -> list[Option]:
    """Options on the lower convex hull of (bits, KL), cheapest first."""
    best_at: dict[float, Option] = {}
    for option in options:
        current = best_at.get(option.bits_per_element)
        if current is None or option.kl < current.kl:
            best_at[option.bits_per_element] = option
    hull: list[Option] = []
    for option in sorted(best_at.values(), key=lambda o: o.bits_per_element):
        if hull and option.kl >= hull[-1].kl:
            continue  # costs more and is no better
        while len(hull) >= 2:
            (a, b) = hull[-2], hull[-1]
            # b lies above the segment a -> option: drop it
            slope_ab = (b.kl - a.kl) / (b.bits_per_element - a.bits_per_element)
            slope_ao = (option.kl - a.kl) / (option.bits_per_element - a.bits_per_element)
            if slope_ab <= slope_ao:
                break
            hull.pop()
        hull.append(option)
    return hull


def choose(options: list[list[Option]], weights: list[int], budget: float) -> list[Option]:
    """One option per tensor, minimising summed KL with mean bits per element <= budget."""
    capacity = budget * sum(weights)
    hulls = [_lower_hull(o) for o in options]
    chosen = [h[0] for h in hulls]
    used = sum(c.bits_per_element * w for c, w in zip(chosen, weights))
    if used > capacity + 1e-9:
        cheapest = used / sum(weights)
        raise BadInputError(f"--kv-bits {budget:g} is below the cheapest storage kvcompile has for "
                            f"this model ({cheapest:.3f} bits per element); raise --kv-bits")
    position = [0] * len(hulls)
    while True:
        best, best_ratio = None, 0.0
        for i, hull in enumerate(hulls):
            if position[i] + 1 >= len(hull):
                continue
            current, step = hull[position[i]], hull[position[i] + 1]
            extra = (step.bits_per_element - current.bits_per_element) * weights[i]
            if used + extra > capacity + 1e-9:
                continue
            ratio = (current.kl - step.kl) / extra
            if ratio > best_ratio:
                best, best_ratio = i, ratio
        if best is None:
            break
        hull = hulls[best]
        used += (hull[position[best] + 1].bits_per_element - hull[position[best]].bits_per_element) * weights[best]
        position[best] += 1
        chosen[best] = hull[position[best]]
    improved = True
    while improved:  # any single swap that fits and lowers the KL
        improved = False
        for i, candidates in enumerate(options):
            for option in sorted(candidates, key=lambda o: o.kl):
                extra = (option.bits_per_element - chosen[i].bits_per_element) * weights[i]
                if option.kl < chosen[i].kl and used + extra <= capacity + 1e-9:
                    used += extra
                    chosen[i] = option
                    improved = True
                    break
    return chosen


def _reason(chosen: Option, alternatives: list[Option], budget: float) -> str:
    others = sorted((o for o in alternatives if o is not chosen and o.plans[0].bits == chosen.plans[0].bits),
                    key=lambda o: o.kl)[:2]
    beaten = ", ".join(f"{o.name} {o.kl:.4f}" for o in others)
    together = " (K and V together: GroupQueryAttention)" if len(chosen.plans) > 1 else ""
    return (f"auto: least next-token KL within {budget:g} bits/element: {chosen.kl:.4f} nats at "
            f"{chosen.bits_per_element:.3f} bits{together} (vs {beaten})")


def _only_candidate_reason() -> str:
    return ("auto: the fused GroupQueryAttention kernel's per-channel 4-bit cache (per-tensor scales are never "
            "finer at the same bits): nothing to choose, not measured")


def _windows(windows: np.ndarray, vocab: int) -> np.ndarray:
    """At most 8 windows of 128 tokens, fewer for large vocabularies (reference kept in memory)."""
    length = min(SENSITIVITY_WINDOW, windows.shape[1])
    count = int(max(1, min(SENSITIVITY_WINDOWS, REFERENCE_BUDGET // (length * vocab))))
    return windows[:count, :length]


def auto_plan(kv: KVGraph, stats: KVStats, decoder: Decoder, windows: np.ndarray,
              budget: float, clip: str, uniform: bool,
              progress: Callable[[str, int], Callable[[int], None]]) -> QuantPlan:
    """`decoder` runs the float model the plan is for (calibrated on, laid out as `kv`)."""
    if uniform:
        if float(budget) not in (2.0, 4.0, 8.0):
            raise BadInputError("--uniform stores every tensor at --kv-bits: use 2, 4 or 8")
        widths: tuple[int, ...] = (int(budget),)
    else:
        widths = (2, 4, 8)
    unit_list = units(kv)
    candidates = [candidate_plans(unit, stats, widths, clip) for unit in unit_list]
    measured = [len(c) > 1 for c in candidates]  # a single candidate is taken without measuring it
    count = sum(len(c) for c, m in zip(candidates, measured) if m)
    if count:
        reference_logits, _ = decoder.step(decoder.new_cache(1), windows[:1, :2])
        windows = _windows(windows, reference_logits.shape[-1])
        reference = reference_log_probs(decoder, windows, SENSITIVITY_PREFILL)
        prefilled = float_prefill(decoder, windows, SENSITIVITY_PREFILL)
        advance = progress(f"measuring sensitivity ({count} candidate storages)", count)
    options = []
    for unit, unit_candidates, measure in zip(unit_list, candidates, measured):
        elements = [t.elements_per_token for t in unit]
        unit_options = []
        for plans in unit_candidates:
            kl = NOT_MEASURED
            if measure:
                stored = StoredCacheDecoder(decoder.session, decoder.io,
                                            {t.past_input: p.codec(t, packed=False) for p, t in zip(plans, unit)})
                kl = mean_kl(stored, windows, reference, SENSITIVITY_PREFILL, SENSITIVITY_CHUNK, prefilled)
                advance(1)
            bits = np.dot(elements, [p.stored_bits_per_element(t) for p, t in zip(plans, unit)]) / sum(elements)
            unit_options.append(Option(plans, float(bits), kl))
        if not uniform:
            unit_options = [o for o in unit_options if o.plans[0].bits != 2 or o.kl <= HARMLESS_KL]
        options.append(unit_options)
    weights = [sum(t.elements_per_token for t in unit) for unit in unit_list]
    chosen = choose(options, weights, float(budget))
    curve = budget_curve(options, weights, float(budget))
    tensors = []
    for option, alternatives, measure in zip(chosen, options, measured):
        reason = _reason(option, alternatives, budget) if measure else _only_candidate_reason()
        for index, plan in enumerate(option.plans):  # each tensor's evidence under its own storage's name
            evidence = {o.plans[index].name: round(o.kl, 6) for o in alternatives} if measure else {}
            tensors.append(replace(plan, reason=reason, evidence=evidence))
    order = {t.past_input: i for i, t in enumerate(kv.tensors)}
    tensors.sort(key=lambda p: order[p.past_input])
    return QuantPlan(tuple(tensors), scheme="auto", bits=float(budget), clip=clip, budget_curve=curve)


def budget_curve(options: list[list[Option]], weights: list[int], budget: float) -> tuple[tuple[float, float], ...]:
    """(budget, summed KL of auto's choice at that budget) at --kv-bits and a few budgets above it."""
    curve = []
    for step in CURVE_STEPS:
        bits = min(8.0, budget + step)
        if curve and bits <= curve[-1][0]:
            continue
        chosen = choose(options, weights, bits)
        curve.append((bits, round(sum(option.kl for option in chosen), 6)))
    return tuple(curve)
