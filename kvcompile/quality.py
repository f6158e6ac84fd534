"""Quality figures of a verified artifact: one type for every target (`TargetQuality`), written
by `runtimes/verify.py` and read by the pipeline (the gate) and the report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    """The artifact against another runtime fed identical inputs at every step."""

    reference: str
    steps: int
    logits_cosine_min: float
    logits_max_abs_diff: float
    codes_identical: bool | None = None  # the new cache entries' codes, where both store them
    code_bytes_differing: int | None = None  # of the new entries' stored bytes (two codes a byte), how many differ
    code_bytes_compared: int | None = None
    # static targets with a prefill graph: one call of it from an empty cache, every row's logits
    prefill_tokens: int = 0
    prefill_logits_cosine_min: float | None = None
    prefill_logits_max_abs_diff: float | None = None
    # the gate: the worst cosine (decode steps and prefill rows) must reach `min_cosine`, or the
    # artifact computes something other than the graph it was verified as (a broken lowering)
    min_cosine: float = 0.0
    agrees: bool = True

    def departure(self) -> str | None:
        """Why the artifact does not follow its reference, or None where it does."""
        if self.agrees:
            return None
        worst = min(c for c in (self.logits_cosine_min, self.prefill_logits_cosine_min) if c is not None)
        return (f"its logits depart from the {self.reference} run on identical inputs (worst cosine "
                f"{worst:.4f} < {self.min_cosine})")


@dataclass(frozen=True)
class TargetQuality:
    """Decode-path quality of one artifact against the float model (the same for every target)."""

    ran_on: str
    float_ppl: float
    quantized_ppl: float
    ppl_delta_pct: float
    top1_agreement: float
    mean_kl: float
    eval_tokens: int
    eval_text: str
    quality_gate_pct: float
    passed: bool
    stopped_early: bool = False  # verification ended once the gate could no longer pass (figures of eval_tokens)
    # the standard error of ppl_delta_pct from the spread of its windows' own changes (None with
    # fewer than two windows): how far another text of this length could move the figure
    ppl_delta_stderr_pct: float | None = None
    agreement: Agreement | None = None
    # qnn-htp: the gate's figures come from the CPU EP run of the same QDQ graph over full-context
    # windows; this is a short text decoded on the (simulated) device itself, which must pass too
    on_device: TargetQuality | None = None
