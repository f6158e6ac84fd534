"""What to try when a compile fails its quality gate, built from what the compile measured.

Advice never names an option already in use. For `--scheme auto` it reads auto's own budget
curve (the summed single-tensor KL it would reach at larger `--kv-bits`, from the same
measurements that chose the plan) and names the smallest budget whose KL is low enough,
scaling the measured perplexity rise linearly with KL (an estimate, and said to be one).
Options this compile could not measure are named as such, with why they may help.
"""

from __future__ import annotations

from kvcompile.plan import QuantPlan


def gate_advice(plan: QuantPlan, delta_pct: float, gate_pct: float, fused: bool, fuse_mode: str) -> list[str]:
    advice: list[str] = []
    if plan.scheme != "auto":
        advice.append("--scheme auto (not run in this compile): it measures every storage of every tensor and "
                      "keeps the least KL within the budget")
    elif plan.budget_curve and delta_pct > 0:
        current = plan.budget_curve[0][1]
        needed = current * gate_pct / delta_pct
        better = [(bits, kl) for bits, kl in plan.budget_curve[1:] if kl <= needed]
        if better:
            bits, kl = better[0]
            advice.append(f"--kv-bits {bits:g}: auto's measurements put its summed KL at {kl:.4f} nats there, vs "
                          f"{current:.4f} now (about {needed:.4f} would meet the gate, scaling the rise with KL)")
        else:
            bits, kl = plan.budget_curve[-1]
            advice.append(f"no --kv-bits up to {bits:g} meets the gate by auto's measurements (summed KL {kl:.4f} "
                          f"nats at {bits:g}, {current:.4f} now, about {needed:.4f} needed)")
    if fused and fuse_mode != "off":
        advice.append("--fuse-attention off (not measured here): the Q/DQ form lets the current tokens attend in "
                      "float and lets auto use 8-bit and per-token storage, which the fused kernel cannot hold; it "
                      "decodes more slowly on CPU")
    return advice
