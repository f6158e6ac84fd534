"""Stored-cache simulation: run the float model as if its cache were stored with given codecs.

`auto` must measure what storing one cache tensor a given way costs in quality, for every
candidate storage of every tensor (hundreds on a 30-layer model). Compiling, saving and loading
a whole model per candidate made that the most expensive stage of a compile. A compiled
Q/DQ-boundary model reads back exactly `Codec.fake_quantize(x)` for every cache entry it stored
and attends to the entries of the current step in float; so does the float model when each
step's new cache entries are replaced by their fake-quantized values before they become the
next step's past. `StoredCacheDecoder` does that with one session of the float model, shared by
every candidate.

Exact for the Q/DQ-boundary form (tested against the compiled model in
tests/test_simulate.py). The fused GroupQueryAttention kernel also quantizes each new token
before attending to it, which the simulation does not (the current step reads its own entries in
float): a small, systematic difference that is the same for every candidate; the compile's
verifier measures the real artifact.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from kvcompile.manifest import TargetIO
from kvcompile.quant import Codec
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.kvcache import GrowingCache


class FakeQuantizedCache(GrowingCache):
    """A float cache whose entries are replaced, when they enter it, by what storage reads back."""

    def __init__(self, io: TargetIO, batch: int, codecs: dict[str, Codec]):
        super().__init__(io, batch)
        self.codecs = codecs

    def update(self, presents: dict[str, np.ndarray], new_tokens: int) -> None:
        presents = dict(presents)
        for kv in self.io.kv:
            codec = self.codecs.get(kv.input)
            if codec is None:
                continue
            present = presents[kv.output]
            kept = present.shape[kv.seq_axis]
            new = min(new_tokens, kept)  # a sliding-window cache keeps only its newest entries
            old = np.take(present, np.arange(kept - new), axis=kv.seq_axis)  # read back already
            fresh = codec.fake_quantize(np.take(present, np.arange(kept - new, kept), axis=kv.seq_axis))
            presents[kv.output] = np.concatenate([old, fresh.astype(present.dtype)], axis=kv.seq_axis)
        super().update(presents, new_tokens)


class StoredCacheDecoder(Decoder):
    """The float model's decoder, with its cache stored as `codecs` say ({past input: Codec};
    codecs in the logical layout, unpacked; tensors without one stay float)."""

    def __init__(self, session: ort.InferenceSession, io: TargetIO, codecs: dict[str, Codec]):
        super().__init__(session, io)
        self.codecs = codecs

    def new_cache(self, batch: int) -> FakeQuantizedCache:
        return FakeQuantizedCache(self.io, batch, self.codecs)
