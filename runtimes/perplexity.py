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
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import RETURN_FREED_EVERY, return_freed_memory


@dataclass(frozen=True)
class DecodeScore:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predictions counted
    top1_agreement: float | None = None  # vs the reference model
    mean_kl: float | None = None  # KL(reference || this), nats per token
    window_nll: tuple[float, ...] = ()  # mean NLL of each window scored, in window order


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
        self.window_nll: dict[int, float] = {}
        self.window_count: dict[int, int] = {}

    def add(self, first_window: int, row_nll: np.ndarray) -> None:
        """One step's NLL of each row; row i is window `first_window + i`."""
        self.nll += float(row_nll.sum())
        self.count += len(row_nll)
        for i, value in enumerate(row_nll):
            self.window_nll[first_window + i] = self.window_nll.get(first_window + i, 0.0) + float(value)
            self.window_count[first_window + i] = self.window_count.get(first_window + i, 0) + 1

    def score(self, is_reference: bool) -> DecodeScore:
        nll = self.nll / max(self.count, 1)
        return DecodeScore(
            ppl=math.exp(nll),
            nll=nll,
            tokens=self.count,
            top1_agreement=None if is_reference else self.agree / max(self.count, 1),
            mean_kl=None if is_reference else self.kl / max(self.count, 1),
            window_nll=tuple(self.window_nll[w] / self.window_count[w] for w in sorted(self.window_nll)),
        )


def scored_predictions(windows: np.ndarray, prefill: int) -> int:
    """How many predictions `decode_path_scores` counts on `windows` [N, W]: those after each decode step."""
    return windows.shape[0] * (windows.shape[1] - prefill - 1)


class _StoredReference:
    """The reference decoder's logits at every scored position of a group of windows, computed
    before the other decoders run and kept in an unnamed temporary file (float32, as computed).

    Why not in lockstep: a float reference's cache is the largest working set of a verification
    (SmolLM2: 47 MB a window of 1,024 tokens, held twice while a step runs), while a 4-bit cache is
    a seventh of it. Computing the reference first, `batch` windows at a time and `chunk` tokens a
    call, lets the decoders stepping one token at a time (whose steps cost a read of every weight)
    take many windows per step, and the reference's cache only a few. The file is read back row by
    row and never mapped, so its bytes stay out of the process's memory."""

    def __init__(self, decoder: Decoder, tokens: np.ndarray, prefill: int, chunk: int, batch: int):
        self.file = tempfile.TemporaryFile(prefix="kvcompile-reference-")
        self.windows, self.prefill = tokens.shape[0], prefill
        self.positions = tokens.shape[1] - 1 - prefill  # scored positions per window: prefill .. W-2
        self.row_bytes = 0
        for start in range(0, self.windows, batch):
            group = tokens[start : start + batch]
            cache = decoder.new_cache(group.shape[0])
            decoder.step(cache, group[:, :prefill])
            for t in range(prefill, tokens.shape[1] - 1, chunk):
                logits, _ = decoder.step(cache, group[:, t : min(t + chunk, tokens.shape[1] - 1)])
                logits = np.ascontiguousarray(logits, dtype=np.float32)
                self.row_bytes = logits.shape[2] * 4
                for i, rows in enumerate(logits):
                    os.pwrite(self.file.fileno(), rows.tobytes(), self._offset(start + i, t))
                return_freed_memory()

    def _offset(self, window: int, position: int) -> int:
        return (window * self.positions + position - self.prefill) * self.row_bytes

    def logits(self, position: int) -> np.ndarray:
        """[windows, 1, vocab]: every window's logits at `position`."""
        rows = [os.pread(self.file.fileno(), self.row_bytes, self._offset(w, position)) for w in range(self.windows)]
        return np.frombuffer(b"".join(rows), dtype=np.float32).reshape(self.windows, 1, -1)

    def close(self) -> None:
        self.file.close()


def decode_path_scores(
    decoders: Sequence[Decoder],
    windows: np.ndarray,
    prefill: int,
    batch: int = 16,
    progress: Callable[[int], None] | None = None,
    reference_chunk: int = 1,
    stop: Callable[[list[DecodeScore], int], bool] | None = None,
    reference_batch: int | None = None,
) -> list[DecodeScore]:
    """Score every decoder on `windows` [N, W] of token ids, `batch` windows at a time;
    decoders[0] is the reference.

    `reference_chunk` > 1 feeds the reference that many tokens per call instead of one, ahead of
    the others (`_StoredReference`, `reference_batch` windows at a time, `batch` by default): for
    a float model this gives the same logits (its cache holds what it computed) at a fraction of
    the calls; never for a model that stores its cache quantized.
    `stop(scores so far, predictions still to come)` is asked after every step; when it says
    yes, the scores so far are returned (their `tokens` say how many were counted)."""
    if windows.ndim != 2 or windows.shape[1] < prefill + 2:
        raise ValueError(f"windows must be [N, W] with W >= prefill + 2, got {windows.shape}")
    tallies = [_Tally() for _ in decoders]
    planned = scored_predictions(windows, prefill)
    stepped = decoders[1:] if reference_chunk > 1 else decoders  # the decoders fed one token per call
    for start in range(0, windows.shape[0], batch):
        tokens = windows[start : start + batch]
        stored = _StoredReference(decoders[0], tokens, prefill, reference_chunk, reference_batch or batch) \
            if reference_chunk > 1 else None
        try:
            caches = [d.new_cache(tokens.shape[0]) for d in stepped]
            for decoder, cache in zip(stepped, caches):
                decoder.step(cache, tokens[:, :prefill])
            for t in range(prefill, tokens.shape[1] - 1):
                target = tokens[:, t + 1]
                step_logits = [decoder.step(cache, tokens[:, t : t + 1])[0] for decoder, cache in zip(stepped, caches)]
                if stored is not None:
                    step_logits.insert(0, stored.logits(t))
                reference = log_softmax(step_logits[0][:, -1, :])
                for i, logits in enumerate(step_logits):
                    logp = reference if i == 0 else log_softmax(logits[:, -1, :])
                    tally = tallies[i]
                    tally.add(start, -logp[np.arange(len(target)), target])
                    if i:
                        tally.agree += int((logp.argmax(-1) == reference.argmax(-1)).sum())
                        tally.kl += float((np.exp(reference) * (reference - logp)).sum())
                if progress is not None:
                    progress(tokens.shape[0])
                if (t - prefill) % RETURN_FREED_EVERY == RETURN_FREED_EVERY - 1:
                    return_freed_memory()
                if stop is not None:
                    scores = [tally.score(i == 0) for i, tally in enumerate(tallies)]
                    if stop(scores, planned - tallies[0].count):
                        return scores
        finally:
            if stored is not None:
                stored.close()
    return [tally.score(i == 0) for i, tally in enumerate(tallies)]
