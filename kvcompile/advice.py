"""What to try when a compile fails its quality gate, built from what the compile measured.

Advice never names an option already in use. For `--scheme auto` it reads auto's own budget
curve (the summed single-tensor KL it would reach at larger `--kv-bits`, from the same
measurements that chose the plan) and names the smallest budget whose KL is low enough,
scaling the measured perplexity rise linearly with KL (an estimate, and said to be one).
Options this compile could not measure are named as such, with why they may help.
"""

from __future__ import annotations

from kvcompile.plan import QuantPlan


FUSION_ADVICE = ("--fuse-attention off (not measured here): the Q/DQ form lets the current tokens attend in float "
                 "and lets auto use 8-bit and per-token storage, which the fused kernel cannot hold; it decodes "
                 "more slowly on CPU")


def gate_advice(plan: QuantPlan, delta_pct: float, gate_pct: float, fused: bool, fuse_mode: str) -> list[str]:
    advice: list[str] = []
    if plan.scheme != "auto":
        advice.append("--scheme auto (not run in this compile): it measures every storage of every tensor and "
                      "keeps the least KL within the budget")
    elif len(plan.budget_curve) > 1 and not fused:
        # (fused attention: every candidate is the kernel's 4-bit cache, so the curve says nothing
        # about what more bits would buy; the fusion advice below names the way to them)
        advice.append(_budget_advice(plan.budget_curve, delta_pct, gate_pct))
    if fused and fuse_mode != "off":
        advice.append(FUSION_ADVICE)
    return advice


def _budget_advice(curve: tuple[tuple[float, float], ...], delta_pct: float, gate_pct: float) -> str:
    """The smallest larger budget whose measured KL would meet the gate (the rise scaled with KL)."""
    current = curve[0][1]
    if delta_pct <= 0 or gate_pct <= 0:  # nothing to scale by: state what the most bits buy
        bits, kl = curve[-1]
        return f"--kv-bits {bits:g}: auto's measurements put its summed KL at {kl:.4f} nats there, vs {current:.4f} now"
    needed = current * gate_pct / delta_pct
    for bits, kl in curve[1:]:
        if kl <= needed:
            return (f"--kv-bits {bits:g}: auto's measurements put its summed KL at {kl:.4f} nats there, vs "
                    f"{current:.4f} now (about {needed:.4f} would meet the gate, scaling the rise with KL)")
    bits, kl = curve[-1]
    return (f"no --kv-bits up to {bits:g} meets the gate by auto's measurements (summed KL {kl:.4f} nats at "
            f"{bits:g}, {current:.4f} now, about {needed:.4f} needed)")
