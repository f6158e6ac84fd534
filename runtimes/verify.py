"""The one verifier: an artifact's decode-path quality against the float model, and its agreement
with another runtime on identical inputs. Every target's `verify` calls these, so every target's
quality has the same meaning and the same fields (`TargetQuality`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kvcompile.quality import Agreement, TargetQuality
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import DecodeScore, decode_path_scores, scored_predictions

FLOAT_CHUNK = 32  # tokens the float model is fed per call: its logits do not depend on it

def decode_quality(float_decoder: Decoder, decoder: Decoder, windows: np.ndarray, *, prefill: int, batch: int,
                   gate_pct: float, text: str, ran_on: str, reference_batch: int | None = None,
                   progress: Callable[[int], None] | None = None, stop_once_failed: bool = False) -> TargetQuality:
    """Teacher-forced through the decode path (a `prefill`-token prefill, then one token per
    step) on `windows`, `batch` at a time: perplexity of both, top-1 agreement and KL of the
    artifact's next-token distribution against the float model's (run first, `FLOAT_CHUNK`
    tokens a call and `reference_batch` windows at a time: `perplexity._StoredReference`).

    `stop_once_failed`: stop as soon as the gate cannot be passed any more (`cannot_pass`), for a
    verification whose failure only decides to rebuild; the figures are then of the tokens seen."""
    stop = (lambda scores, remaining: cannot_pass(*scores, remaining, gate_pct)) if stop_once_failed else None
    float_score, score = decode_path_scores([float_decoder, decoder], windows, prefill, batch=batch,
                                            progress=progress, reference_chunk=FLOAT_CHUNK, stop=stop,
                                            reference_batch=reference_batch)
    delta = 100.0 * (score.ppl / float_score.ppl - 1.0)
    stderr = delta_stderr_pct(float_score, score)
    return TargetQuality(
        ran_on=ran_on,
        float_ppl=round(float_score.ppl, 4),
        quantized_ppl=round(score.ppl, 4),
        ppl_delta_pct=round(delta, 4),
        top1_agreement=round(score.top1_agreement, 5),
        mean_kl=round(score.mean_kl, 6),
        eval_tokens=score.tokens,
        eval_text=text,
        quality_gate_pct=gate_pct,
        passed=delta <= gate_pct,
        stopped_early=score.tokens < scored_predictions(windows, prefill),
        ppl_delta_stderr_pct=None if stderr is None else round(stderr, 4),
    )


def delta_stderr_pct(float_score: DecodeScore, score: DecodeScore) -> float | None:
    """The standard error of the perplexity change, in percent, from the windows' paired changes
    (each window's NLL lost against the float model's on the same window; the delta method carries
    the mean's standard error through exp). None with fewer than two windows."""
    lost = np.subtract(score.window_nll, float_score.window_nll)
    if lost.size < 2:
        return None
    return float(100.0 * math.exp(lost.mean()) * lost.std(ddof=1) / math.sqrt(lost.size))


def cannot_pass(float_score: DecodeScore, score: DecodeScore, remaining: int, gate_pct: float) -> bool:
    """Whether the gate fails even if the `remaining` predictions are as good as the float
    model's: the log-likelihood already lost, spread over every prediction, exceeds the gate's."""
    if gate_pct <= -100.0:  # no perplexity is that low: nothing passes
        return True
    if score.tokens == 0:
        return False
    lost = (score.nll - float_score.nll) * score.tokens
    return lost / (score.tokens + remaining) > math.log1p(gate_pct / 100.0)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


# The worst logits cosine an artifact may show against the same graph on a reference runtime.
# Measured: SmolLM2's quantized HTP graph 0.9994 (decode) / 0.9949 (prefill), 0.984 before its
# massive activations stayed float; LiteRT 1.000000; a wrongly computed graph (Qwen3's rank-4
# RMSNorm on the HTP) 0.384. Rounding differences stay far above 0.98, a broken lowering far below.
MIN_AGREEMENT_COSINE = 0.98


def agreement(decoder: Decoder, reference: Decoder, token_ids: np.ndarray, steps: int, reference_name: str,
              compare_codes: bool, min_cosine: float = MIN_AGREEMENT_COSINE) -> Agreement:
    """Feed both the same inputs at every step (the reference's cache): the worst logits cosine
    and |difference|, and (`compare_codes`) how many of the new cache entries' stored bytes differ
    (a value on a rounding boundary can take the next code when the runtimes round float
    arithmetic differently).
    Where both have a prefill graph, also one call of it on the first tokens, every row compared.
    `agrees` when every cosine reaches `min_cosine`: the targets fail the gate otherwise."""
    prefill = _prefill_agreement(decoder, reference, token_ids) if decoder.prefill and reference.prefill else {}
    cache = reference.new_cache(1)
    cosines, worst, differing, compared = [], 0.0, 0, 0
    for t in range(steps):
        feeds = reference.feeds(cache, token_ids[None, t : t + 1])
        ours = dict(zip(decoder.output_names, decoder.session.run(decoder.output_names, feeds)))
        logits, presents = reference.step(cache, token_ids[None, t : t + 1])
        a, b = ours[decoder.io.logits][0, -1], logits[0, -1]
        cosines.append(_cosine(a, b))
        worst = max(worst, float(np.abs(a - b).max()))
        if compare_codes:
            differing += sum(int(np.count_nonzero(ours[k.output] != presents[k.output])) for k in reference.io.kv)
            compared += sum(presents[k.output].size for k in reference.io.kv)
    codes = dict(codes_identical=differing == 0, code_bytes_differing=differing,
                 code_bytes_compared=compared) if compare_codes else {}
    worst_cosine = min(cosines + [prefill.get("prefill_logits_cosine_min", 1.0)])
    return Agreement(reference=reference_name, steps=steps, logits_cosine_min=round(min(cosines), 6),
                     logits_max_abs_diff=round(worst, 6), **codes, **prefill, min_cosine=min_cosine,
                     agrees=bool(worst_cosine >= min_cosine))


def _prefill_agreement(decoder: Decoder, reference: Decoder, token_ids: np.ndarray) -> dict[str, float | int]:
    """One prefill call from an empty cache on both, fed the reference's inputs: every row's logits."""
    width = reference.io.options.prefill_len
    tokens = token_ids[None, :width]
    feeds = reference.feeds(reference.new_cache(1), tokens)
    ours, theirs = (d.prefill.run([d.io.logits], feeds)[0][0].astype(np.float32) for d in (decoder, reference))
    cosines = [_cosine(a, b) for a, b in zip(ours, theirs)]
    return {"prefill_tokens": tokens.shape[1], "prefill_logits_cosine_min": round(min(cosines), 6),
            "prefill_logits_max_abs_diff": round(float(np.abs(ours - theirs).max()), 6)}
