"""Sensitivity: how far a model variant's next-token distributions are from the float model's.

A compiled variant stores every token in the cache as it is fed, and later tokens read it back
from storage, while the tokens of one step attend to each other in float. So each window is fed
the way decoding feeds it: a prefill of `prefill` tokens, then short chunks of `chunk` tokens
(a chunk of 1 is exact decoding; a few tokens keep the cost down while every scored position
reads all but at most chunk - 1 recent entries from storage). The mean KL(reference || variant)
over the positions after the prefill is the variant's cost in quality.
"""

from __future__ import annotations

import numpy as np

from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import log_softmax


def reference_log_probs(decoder: Decoder, windows: np.ndarray, prefill: int) -> np.ndarray:
    """Log-probabilities of the reference (float) model after the prefill: [N, W - prefill, vocab]."""
    logits, _ = decoder.step(decoder.new_cache(windows.shape[0]), windows)
    return log_softmax(logits[:, prefill:]).astype(np.float32)


def float_prefill(decoder: Decoder, windows: np.ndarray, prefill: int) -> dict[str, np.ndarray]:
    """The float model's present outputs after the prefill, shared by every stored-cache
    simulation of it (`runtimes.simulate`: the prefill's entries are stored as they enter)."""
    _, presents = decoder.step(decoder.new_cache(windows.shape[0]), windows[:, :prefill])
    return presents


def mean_kl(decoder: Decoder, windows: np.ndarray, reference: np.ndarray, prefill: int, chunk: int,
            prefilled: dict[str, np.ndarray] | None = None) -> float:
    """Mean KL(reference || variant) in nats per position after the prefill. `prefilled`: the
    float model's presents after the prefill (`float_prefill`), when `decoder` simulates storing
    that same model's cache; the prefill is then not run again."""
    cache = decoder.new_cache(windows.shape[0])
    if prefilled is None:
        decoder.step(cache, windows[:, :prefill])
    else:
        cache.update(prefilled, prefill)
    pieces = []
    for start in range(prefill, windows.shape[1], chunk):
        logits, _ = decoder.step(cache, windows[:, start : start + chunk])
        pieces.append(logits)
    variant = log_softmax(np.concatenate(pieces, axis=1))
    kl = (np.exp(reference) * (reference - variant)).sum(axis=-1)
    return float(kl.mean())
