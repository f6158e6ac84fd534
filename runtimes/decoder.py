"""The decode loop: feed tokens to a decoder session and keep its KV cache.

One implementation drives the float model and every compiled CPU artifact: the `TargetIO`
(from the manifest, or `float_model_io` for an unmodified model) says which inputs to feed and
which outputs are the cache.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from kvcompile.errors import BadInputError
from kvcompile.manifest import TargetIO
from kvcompile.runtimes.kvcache import GrowingCache, StaticCache, stored_tensors
from kvcompile.runtimes.session import ORT_ERRORS

_INPUT_DTYPES = {"int64": np.int64, "int32": np.int32, "float": np.float32, "float32": np.float32,
               "float16": np.float16}


def padded_chunks(input_ids: np.ndarray, width: int) -> list[tuple[np.ndarray, int]]:
    """`input_ids` [batch, n] cut into calls of `width` tokens, the last padded after its real
    tokens: (chunk, how many of it are real)."""
    chunks = []
    for start in range(0, input_ids.shape[1], width):
        chunk = input_ids[:, start : start + width]
        chunks.append((np.pad(chunk, ((0, 0), (0, width - chunk.shape[1]))), chunk.shape[1]))
    return chunks


class Decoder:
    """Runs prefill and decode steps of one model on one onnxruntime session."""

    def __init__(self, session: ort.InferenceSession, io: TargetIO, input_model: str | None = None,
                 prefill: ort.InferenceSession | None = None):
        """`input_model`: the user's model file name when this session runs the model as given;
        onnxruntime failures are then the input's problem (BadInputError), not kvcompile's.
        `prefill`: static targets, the session of the graph taking `io.options.prefill_len` tokens
        per call over the same cache buffer (several tokens fed at once go through it)."""
        if prefill is not None and not io.options.prefill_len:
            raise ValueError("a prefill session needs the manifest's prefill_len")
        self.session = session
        self.io = io
        self.input_model = input_model
        self.prefill = prefill
        self.output_names = [io.logits] + [output for _, output, _, _ in stored_tensors(io)]
        self._dtypes = {i.name: _INPUT_DTYPES.get(i.dtype, np.int64) for i in io.inputs}

    def new_cache(self, batch: int) -> GrowingCache | StaticCache:
        """A growing cache, or for static-shape targets (max_context set) fixed buffers."""
        if self.io.max_context is not None:
            return StaticCache(self.io, batch, sinks=self.io.options.attention_sinks or 4)
        return GrowingCache(self.io, batch)

    def feeds(self, cache: GrowingCache, input_ids: np.ndarray, real: int | None = None) -> dict[str, np.ndarray]:
        """Inputs for feeding `input_ids` [batch, new]: a static cache's bias has a row per new
        token. `real`: only the first `real` are tokens (a padded prefill chunk); the padding
        takes the last real token's position, so no position lies past the ones the graph was
        calibrated on (or past a position table's end)."""
        batch, new = input_ids.shape
        total = cache.length + new
        feeds = {}
        for model_input in self.io.inputs:
            dtype = self._dtypes[model_input.name]
            if model_input.role == "input_ids":
                feeds[model_input.name] = input_ids.astype(dtype)
            elif model_input.role == "attention_mask":
                feeds[model_input.name] = np.ones((batch, total), dtype=dtype)
            elif model_input.role == "position_ids":
                positions = np.arange(cache.length, total, dtype=dtype)
                if real is not None:
                    positions[real:] = cache.length + real - 1
                feeds[model_input.name] = np.broadcast_to(positions, (batch, new)).copy()
            elif model_input.role == "attention_bias":
                feeds[model_input.name] = cache.bias(dtype, new)
            else:
                raise BadInputError(f"no rule to feed model input {model_input.name!r} ({model_input.role})")
        feeds.update(cache.feeds())
        return feeds

    def step(self, cache: GrowingCache, input_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Feed `input_ids` [batch, n]; returns float32 logits [batch, n, vocab] and the presents."""
        batch, new = input_ids.shape
        if isinstance(cache, StaticCache) and new > 1:
            if self.prefill is not None:
                return self._prefill(cache, input_ids)
            steps = [self.step(cache, input_ids[:, t : t + 1]) for t in range(new)]  # one token per call
            return np.concatenate([s[0] for s in steps], axis=1), steps[-1][1]
        if self.io.options.chunks_one_row_at_a_time and batch > 1 and new > 1 and cache.length:
            # GroupQueryAttention refuses several tokens per step on a batch with a past: run the
            # rows one by one (batch is axis 0 of every cache tensor) and join their results.
            rows = [self._run(cache.row(i), input_ids[i : i + 1]) for i in range(batch)]
            logits = np.concatenate([r[0] for r in rows], axis=0)
            presents = {name: np.concatenate([r[1][name] for r in rows], axis=0) for name in rows[0][1]}
        else:
            logits, presents = self._run(cache, input_ids)
        cache.update(presents, new)
        return logits, presents

    def _prefill(self, cache: StaticCache, input_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Several tokens through the prefill graph, `prefill_len` a call; the last chunk is padded
        (its padding comes after the real tokens, so the causal bias hides it from them, and its
        entries are not written). Returns the real tokens' logits and the last call's presents."""
        logits = []
        for padded, real in padded_chunks(input_ids, self.io.options.prefill_len):
            chunk_logits, presents = self._run(cache, padded, self.prefill, real)
            cache.update(presents, real)
            logits.append(chunk_logits[:, :real])
        return np.concatenate(logits, axis=1), presents

    def _run(self, cache: GrowingCache, input_ids: np.ndarray, session: ort.InferenceSession | None = None,
             real: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        try:
            outputs = (session or self.session).run(self.output_names, self.feeds(cache, input_ids, real))
        except ORT_ERRORS as exc:
            if self.input_model is None:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BadInputError(
                f"onnxruntime fails running {self.input_model} as given, with {cache.length} tokens cached and "
                f"{input_ids.shape[1]} fed: {first[:300]}; the export does not run at this context (check its "
                "dynamic dimensions)") from None
        return outputs[0].astype(np.float32, copy=False), dict(zip(self.output_names[1:], outputs[1:]))
