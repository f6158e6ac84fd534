"""Calibration: run the float model through the decode path and record KV-cache statistics.

The float model is fed calibration windows in chunks (a prefill, then further chunks that read
the growing cache), and every cache entry each chunk appends (the last entries of each present
output: a sliding-window cache keeps only its newest) is recorded once, in a canonical
[token, head, channel] layout whatever the model's own layout. The statistics hold exact
per-channel ranges over all tokens and a (strided) sample of tokens for clipping searches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvcompile.errors import BadInputError
from kvcompile.kvstats import KVStats, TensorStats
from kvcompile.manifest import KVIO
from kvcompile.runtimes.decoder import Decoder


def to_canonical(array: np.ndarray, kv: KVIO) -> np.ndarray:
    """Reorder a cache tensor (in the model's logical layout) to [batch*seq, heads, head_dim]."""
    array = np.asarray(array, dtype=np.float32)
    if kv.heads_axis is None:
        ordered = np.transpose(array, (0, kv.seq_axis, kv.head_dim_axis))[:, :, None, :]
    else:
        ordered = np.transpose(array, (0, kv.seq_axis, kv.heads_axis, kv.head_dim_axis))
    return ordered.reshape(-1, ordered.shape[2], ordered.shape[3])


def collect_kv_stats(
    decoder: Decoder,
    windows: np.ndarray,
    chunk: int = 64,
    batch: int = 8,
    max_samples: int = 8192,
    progress: Callable[[int], None] | None = None,
) -> KVStats:
    """Statistics of every cache tensor over `windows` [N, W] of calibration token ids."""
    pieces: dict[str, list[np.ndarray]] = {kv.input: [] for kv in decoder.io.kv}
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
                pieces[kv.input].append(canonical)
            if progress is not None:
                progress(int(fed.size))
    stats = {}
    for name, parts in pieces.items():
        everything = np.concatenate(parts, axis=0)
        stride = max(1, -(-everything.shape[0] // max_samples))
        stats[name] = TensorStats(
            samples=np.ascontiguousarray(everything[::stride]),
            absmax=np.abs(everything).max(axis=0),
            minimum=everything.min(axis=0),
            maximum=everything.max(axis=0),
            tokens=everything.shape[0],
        )
    return KVStats(stats, int(windows.size))
