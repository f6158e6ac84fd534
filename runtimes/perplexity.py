"""Decode-path evaluation: perplexity, top-1 agreement and KL, teacher-forced through the cache.

Each window of tokens is fed as a short prefill followed by one token per step, so from the
first decode step on, every prediction reads the cache in its stored (e.g. 4-bit) form.
Predictions are counted for the tokens that follow a decode step (positions prefill+1 ..
window-1), the steady state the cache matters for. Several models run in lockstep on the same
tokens; the first is the reference that agreement and KL are measured against.

This is the one implementation behind the compile's verifier and `kvcompile eval`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvcompile.runtimes.decoder import Decoder


@dataclass(frozen=True)
class DecodeScore:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predictions counted
    top1_agreement: float | None = None  # vs the reference model
    mean_kl: float | None = None  # KL(reference || this), nats per token


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class _Tally:
    def __init__(self) -> None:
        self.nll = 0.0
        self.count = 0
        self.agree = 0
        self.kl = 0.0

    def score(self, is_reference: bool) -> DecodeScore:
        nll = self.nll / max(self.count, 1)
        return DecodeScore(
            ppl=math.exp(nll),
            nll=nll,
            tokens=self.count,
            top1_agreement=None if is_reference else self.agree / max(self.count, 1),
            mean_kl=None if is_reference else self.kl / max(self.count, 1),
        )


def scored_predictions(windows: np.ndarray, prefill: int) -> int:
    """How many predictions `decode_path_scores` counts on `windows` [N, W]: those after each decode step."""
    return windows.shape[0] * (windows.shape[1] - prefill - 1)


def decode_path_scores(
    decoders: Sequence[Decoder],
    windows: np.ndarray,
    prefill: int,
    batch: int = 16,
    progress: Callable[[int], None] | None = None,
    reference_chunk: int = 1,
    stop: Callable[[list[DecodeScore], int], bool] | None = None,
) -> list[DecodeScore]:
    """Score every decoder on `windows` [N, W] of token ids; decoders[0] is the reference.

    `reference_chunk` > 1 feeds the reference that many tokens per step instead of one: for a
    float model this gives the same logits (its cache holds what it computed) at a fraction of
    the calls; never for a model that stores its cache quantized.
    `stop(scores so far, predictions still to come)` is asked after every step; when it says
    yes, the scores so far are returned (their `tokens` say how many were counted)."""
    if windows.ndim != 2 or windows.shape[1] < prefill + 2:
        raise ValueError(f"windows must be [N, W] with W >= prefill + 2, got {windows.shape}")
    tallies = [_Tally() for _ in decoders]
    planned = scored_predictions(windows, prefill)
    for start in range(0, windows.shape[0], batch):
        tokens = windows[start : start + batch]
        caches = [d.new_cache(tokens.shape[0]) for d in decoders]
        for decoder, cache in zip(decoders, caches):
            decoder.step(cache, tokens[:, :prefill])
        ahead = None  # the reference's logits for positions [ahead_start, ahead_start + chunk)
        ahead_start = prefill
        for t in range(prefill, tokens.shape[1] - 1):
            target = tokens[:, t + 1]
            reference = None
            for i, (decoder, cache) in enumerate(zip(decoders, caches)):
                if i == 0 and reference_chunk > 1:
                    if ahead is None or t >= ahead_start + ahead.shape[1]:
                        ahead_start = t
                        ahead, _ = decoder.step(cache, tokens[:, t : min(t + reference_chunk, tokens.shape[1] - 1)])
                    logits = ahead[:, t - ahead_start : t - ahead_start + 1]
                else:
                    logits, _ = decoder.step(cache, tokens[:, t : t + 1])
                logp = log_softmax(logits[:, -1, :])
                tally = tallies[i]
                tally.nll -= float(logp[np.arange(len(target)), target].sum())
                tally.count += len(target)
                if reference is None:
                    reference = logp
                else:
                    tally.agree += int((logp.argmax(-1) == reference.argmax(-1)).sum())
                    tally.kl += float((np.exp(reference) * (reference - logp)).sum())
            if progress is not None:
                progress(tokens.shape[0])
            if stop is not None:
                scores = [tally.score(i == 0) for i, tally in enumerate(tallies)]
                if stop(scores, planned - tallies[0].count):
                    return scores
    return [tally.score(i == 0) for i, tally in enumerate(tallies)]
