"""Calibration: run the float model through the decode path and record KV-cache statistics.

The float model is fed calibration windows in chunks (a prefill, then further chunks that read
the growing cache), and every cache entry each chunk appends (the last entries of each present
output: a sliding-window cache keeps only its newest) is recorded once, in a canonical
[token, head, channel] layout whatever the model's own layout. The statistics hold exact
per-channel ranges over all tokens and a (strided) sample of tokens for clipping searches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvcompile.errors import BadInputError
from kvcompile.kvstats import KVStats, TensorStats
from kvcompile.manifest import KVIO
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import return_freed_memory


def to_canonical(array: np.ndarray, kv: KVIO) -> np.ndarray:
    """Reorder a cache tensor (in the model's logical layout) to [batch*seq, heads, head_dim]."""
    array = np.asarray(array, dtype=np.float32)
    if kv.heads_axis is None:
        ordered = np.transpose(array, (0, kv.seq_axis, kv.head_dim_axis))[:, :, None, :]
    else:
        ordered = np.transpose(array, (0, kv.seq_axis, kv.heads_axis, kv.head_dim_axis))
    return ordered.reshape(-1, ordered.shape[2], ordered.shape[3])


class _Running:
    """One cache tensor's ranges so far and every `stride`-th entry (in calibration order), held
    or appended to `samples_file` as raw float32."""

    def __init__(self, stride: int, samples_file: Path | None = None):
        self.stride = stride
        self.seen = 0
        self.samples: list[np.ndarray] = []
        self.samples_file = samples_file
        self.minimum = self.maximum = self.absmax = None

    def add(self, entries: np.ndarray) -> None:
        first = -self.seen % self.stride  # the first entry of this piece on the stride
        kept = np.ascontiguousarray(entries[first :: self.stride], dtype=np.float32)
        if self.samples_file is None:
            self.samples.append(kept)
        else:
            with open(self.samples_file, "ab") as f:
                kept.tofile(f)
        self.seen += entries.shape[0]
        low, high = entries.min(axis=0), entries.max(axis=0)
        self.minimum = low if self.minimum is None else np.minimum(self.minimum, low)
        self.maximum = high if self.maximum is None else np.maximum(self.maximum, high)
        self.absmax = np.maximum(np.abs(self.minimum), np.abs(self.maximum))

    def stats(self) -> TensorStats:
        held = None if self.samples_file is not None else np.ascontiguousarray(np.concatenate(self.samples, axis=0))
        return TensorStats(held_samples=held, absmax=self.absmax, minimum=self.minimum, maximum=self.maximum,
                           tokens=self.seen, samples_file=self.samples_file)


def collect_kv_stats(
    decoder: Decoder,
    windows: np.ndarray,
    chunk: int = 64,
    batch: int = 8,
    max_samples: int = 8192,
    progress: Callable[[int], None] | None = None,
    samples_dir: Path | None = None,
) -> KVStats:
    """Statistics of every cache tensor over `windows` [N, W] of calibration token ids, `batch`
    windows at a time.

    Streamed: ranges are updated per chunk and only every `stride`-th entry is kept as a sample
    (the stride that leaves at most `max_samples` of the windows' tokens), so calibration holds
    the samples, not every entry of every token (SmolLM2, 8,192 tokens: 377 MB of samples against
    all entries' 1.5 GB). `samples_dir`: the samples are written there instead of held."""
    stride = max(1, -(-int(windows.size) // max_samples))
    running: dict[str, _Running] = {
        kv.input: _Running(stride, None if samples_dir is None else Path(samples_dir) / f"calibration-samples-{i}.f32")
        for i, kv in enumerate(decoder.io.kv)}
    for start in range(0, windows.shape[0], batch):
        tokens = windows[start : start + batch]
        cache = decoder.new_cache(tokens.shape[0])
        for offset in range(0, tokens.shape[1], chunk):
            fed = tokens[:, offset : offset + chunk]
            _, presents = decoder.step(cache, fed)
            for kv in decoder.io.kv:
                present = presents[kv.output]
                kept = present.shape[kv.seq_axis]
                appended = np.take(present, np.arange(kept - min(fed.shape[1], kept), kept), axis=kv.seq_axis)
                canonical = to_canonical(appended, kv)
                if not np.isfinite(canonical).all():
                    raise BadInputError(
                        f"the float model produced non-finite values in cache {kv.input!r} during "
                        "calibration; the model is broken for this input (check its weights, "
                        "or calibrate on other text)"
                    )
                running[kv.input].add(canonical)
            if progress is not None:
                progress(int(fed.size))
            return_freed_memory()  # the cache grows each chunk: the heap cannot reuse what the last one freed
    stats = {name: r.stats() for name, r in running.items()}
    return KVStats(stats, int(windows.size))
