"""Decode-step latency at a given context, the way an on-device runner drives the model.

The cache is filled once with `context - 1` stored entries (random values of the stored dtype:
latency does not depend on the values) and bound as OrtValues with IOBinding, so a step costs
what the model costs and not a host copy of the cache into onnxruntime. Each timed step feeds one
new token (context tokens in all) against the same cache.

This machine's speed drifts by tens of percent from second to second, so variants are timed
round-robin (a few steps of each, repeated) and compared by their medians: drift then hits all
of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.kvcache import concrete_shape, stored_numpy_dtype, stored_tensors


def _random_stored(dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.float16:  # stored scales: small positive values
        return rng.uniform(0.01, 0.1, shape).astype(np.float16)
    return rng.normal(size=shape).astype(dtype)


def bound_step(decoder: Decoder, context: int) -> Callable[[], None]:
    """A function that runs one decode step (batch 1) with context - 1 tokens cached."""
    rng = np.random.default_rng(0)
    session = decoder.session
    binding = session.io_binding()
    for name, _, dtype, shape in stored_tensors(decoder.io):
        array = _random_stored(stored_numpy_dtype(dtype), concrete_shape(shape, 1, context - 1, decoder.io.options.float_slots), rng)
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    cache = decoder.new_cache(1)
    cache.length = context - 1
    for name, array in decoder.feeds(cache, np.zeros((1, 1), np.int64)).items():
        if name not in cache.tensors:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for name in decoder.output_names:
        binding.bind_output(name)
    return lambda: session.run_with_iobinding(binding)


def compare_decode_latency(decoders: dict[str, Decoder], context: int, rounds: int = 15,
                           steps: int = 4) -> dict[str, float]:
    """Median seconds per decode step of each decoder, timed round-robin."""
    runs = {name: bound_step(decoder, context) for name, decoder in decoders.items()}
    for run in runs.values():  # warm up
        run()
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(steps):
                started = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}
