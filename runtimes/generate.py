"""Text generation with a compiled artifact: greedy or sampled, one token at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from kvcompile.runtimes.decoder import Decoder


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0


def next_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        cutoff = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    return int(rng.choice(len(probabilities), p=probabilities))


class Generation:
    """One generation: the prompt fed, then `tokens()` yields new tokens; `cache` stays readable
    (its bytes are what the run reports)."""

    def __init__(self, decoder: Decoder, prompt: np.ndarray, sampling: Sampling = Sampling()):
        self.decoder = decoder
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)
        self.cache = decoder.new_cache(1)
        self.logits, _ = decoder.step(self.cache, np.asarray(prompt, dtype=np.int64)[None])

    def tokens(self, max_new_tokens: int, stop: Callable[[int], bool] = lambda token: False) -> Iterator[int]:
        for index in range(max_new_tokens):
            token = next_token(self.logits[0, -1], self.sampling, self.rng)
            yield token
            if stop(token) or index == max_new_tokens - 1:  # no step for logits nobody reads
                return
            self.logits, _ = self.decoder.step(self.cache, np.array([[token]], dtype=np.int64))
