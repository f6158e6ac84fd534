"""KV-cache buffers driven by the manifest, kept in their stored form.

`GrowingCache` serves dynamic-shape targets (ORT CPU): it starts empty (sequence length 0) and
each step's present outputs become the next step's past inputs, so a 4-bit cache stays packed
uint8 on the host and is never unpacked or re-quantized. `StaticCache` serves static-shape
targets (NPUs): fixed buffers, an attention bias and a write position.
"""

from __future__ import annotations

import numpy as np

from kvcompile.manifest import MASKED_BIAS, TargetIO, slot_lengths

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "int8": np.int8}


def stored_numpy_dtype(stored_dtype: str) -> np.dtype:
    return np.dtype(_NUMPY_DTYPES[stored_dtype])


def stored_tensors(io: TargetIO) -> list[tuple[str, str, str, list[int | str]]]:
    """Every tensor the cache keeps: (input, output, dtype, shape) for codes and stored params."""
    out = []
    for kv in io.kv:
        out.append((kv.input, kv.output, kv.stored_dtype, kv.stored_shape))
        out += [(p.input, p.output, p.stored_dtype, p.stored_shape) for p in kv.params]
    return out


def concrete_shape(shape: list[int | str], batch: int, seq: int, float_slots: list[int] | None = None
                   ) -> tuple[int, ...]:
    """Replace the symbolic "batch" and "seq" dims of a manifest shape by sizes (and the float
    slots' "sink_seq" and "recent_seq", given `RunOptions.float_slots`)."""
    sizes = {"batch": batch, "seq": seq, **slot_lengths(seq, *(float_slots or (0, 0)))}
    out = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
        elif dim in sizes:
            out.append(sizes[dim])
        else:
            raise ValueError(f"cache shape {shape} has an unknown symbolic dim {dim!r}")
    return tuple(out)


# The caches of the windows decoded together (calibration, verification) are held twice while a
# step runs (the past fed and the present returned); kvcompile keeps that within a quarter of the
# weight bytes, or CACHE_FLOOR_BYTES for small models. The rest of a compile is the weights,
# resident once, and about 330 MiB of runtime (SmolLM2: 850 MiB when its verification starts), so
# this keeps the whole within twice the weights. Fewer windows at a time cost time only where each
# step reads every weight for one token per window (a quantized artifact's decode steps); a float
# model fed chunks of tokens is bound by arithmetic, not by its batch (`perplexity._StoredReference`).
CACHE_FLOOR_BYTES = 64 << 20
CACHE_SHARE_OF_WEIGHTS = 4


def cache_bytes_per_window(io: TargetIO, window: int) -> int:
    """Bytes a model with cache `io` holds for one window of `window` tokens (codes, scales and
    float slots, in their stored types)."""
    return sum(int(np.prod(concrete_shape(shape, 1, window, io.options.float_slots)))
               * stored_numpy_dtype(dtype).itemsize for _, _, dtype, shape in stored_tensors(io))


def windows_together(io: TargetIO, window: int, windows: int, weight_bytes: int, most: int) -> int:
    """How many of `windows` windows of `window` tokens to decode together through a model with
    cache `io`: at most `most` and within the rule above (at least one), spread evenly over the
    passes that takes (12 windows, 5 allowed: 3 passes of 4)."""
    budget = max(weight_bytes // CACHE_SHARE_OF_WEIGHTS, CACHE_FLOOR_BYTES)
    allowed = max(1, min(most, windows, budget // max(1, 2 * cache_bytes_per_window(io, window))))
    passes = -(-windows // allowed)
    return -(-windows // passes)


class GrowingCache:
    """A cache that grows by the number of tokens fed at each step."""

    def __init__(self, io: TargetIO, batch: int):
        self.io = io
        self.batch = batch
        self.length = 0
        self.tensors: dict[str, np.ndarray] = {
            name: np.zeros(concrete_shape(shape, batch, 0, io.options.float_slots), stored_numpy_dtype(dtype))
            for name, _, dtype, shape in stored_tensors(io)
        }

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(self.tensors)

    def update(self, presents: dict[str, np.ndarray], new_tokens: int) -> None:
        for name, output, _, _ in stored_tensors(self.io):
            self.tensors[name] = presents[output]
        self.length += new_tokens

    def row(self, index: int) -> "GrowingCache":
        """A one-row view of this cache (batch is axis 0 of every stored tensor)."""
        copy = self.replaced({name: t[index : index + 1] for name, t in self.tensors.items()})
        copy.batch = 1
        return copy

    def replaced(self, tensors: dict[str, np.ndarray]) -> "GrowingCache":
        """A copy of this cache with some tensors swapped (same length); this one is unchanged."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.tensors = {**self.tensors, **tensors}
        return copy

    def nbytes(self) -> int:
        """Bytes the cache occupies now (everything stored: codes and float parts)."""
        return sum(t.nbytes for t in self.tensors.values())


def _empty_value(dtype: str, zero_point, bits: int | None, per_byte: int) -> float | int:
    """What an unused slot holds: the code that reads back as 0 (float caches: 0.0)."""
    if bits is None or dtype != "uint8":
        return 0
    zero = int(np.asarray(zero_point).reshape(-1)[0])
    return sum(zero << (bits * i) for i in range(per_byte))


class StaticCache:
    """Fixed-size buffers for static-shape targets (NPUs): `max_context - 1` slots per cache
    tensor, an attention bias marking the filled ones, and a write position.

    The graph takes new tokens (one per call when decoding, N when a prefill graph reads the
    prompt) and returns only their entries (the "slots"); `update` writes them, token by token,
    into the next free slots. When every slot is full, the oldest entries are
    overwritten in turn, except the first `sinks` tokens, which stay: attention sinks
    (StreamingLLM) keep long generations stable. Keys carry their RoPE rotation from when they
    were computed, and attention ignores slot order, so no entry ever moves.

    Float slots (`RunOptions.float_slots` = [S, R]): the last S + R of the slots are float16
    copies instead of codes (each cache tensor's `float_slots` input). The first S tokens stay
    there for good (they are the sinks; the coded slots then keep none); every later token
    enters a ring of the R newest in float, and its codes, returned when it was fed, are written
    into the coded slots when it leaves the ring. Each token is read once, in float while it is
    a sink or among the newest R, from its codes after.
    """

    def __init__(self, io: TargetIO, batch: int = 1, sinks: int = 4):
        if batch != 1:
            raise ValueError("static-shape targets run batch 1")
        self.io = io
        self.batch = 1
        self.float_sinks, self.float_recent = io.options.float_slots or (0, 0)
        self.slots = io.max_context - 1 - self.float_sinks - self.float_recent  # coded slots
        self.sinks = 0 if io.options.float_slots else min(sinks, self.slots - 1)
        self.length = 0  # tokens fed so far: the next token's position
        self.coded = 0  # tokens written into the coded slots so far
        self.filled = np.zeros(self.slots, dtype=bool)
        self.tensors: dict[str, np.ndarray] = {}
        self._pending: dict[str, np.ndarray] = {}  # codes of the tokens in the float ring
        self._slot_axis: dict[str, int] = {}
        self._float_slots: list[tuple[str, str, int]] = []  # (input, output, seq axis)
        for kv in io.kv:
            per_byte = kv.packing.codes_per_byte if kv.packing else 1
            empty = _empty_value(kv.stored_dtype, kv.zero_point, kv.bits, per_byte)
            self.tensors[kv.input] = np.full(concrete_shape(kv.stored_shape, 1, self.slots), empty,
                                             stored_numpy_dtype(kv.stored_dtype))
            self._slot_axis[kv.input] = kv.seq_axis
            for param in kv.params:
                if param.kind == "float_slots":
                    self.tensors[param.input] = np.zeros(concrete_shape(param.stored_shape, 1, 0),
                                                         stored_numpy_dtype(param.stored_dtype))
                    self._float_slots.append((param.input, param.output, kv.seq_axis))
                    self._slot_axis[param.input] = kv.seq_axis
                    self._pending[kv.input] = np.zeros(concrete_shape(kv.stored_shape, 1, self.float_recent),
                                                       stored_numpy_dtype(kv.stored_dtype))

    def next_slot(self) -> int:
        """The coded slot the next token written there goes to."""
        if self.coded < self.slots:
            return self.coded
        window = self.slots - self.sinks
        return self.sinks + (self.coded - self.slots) % window

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(self.tensors)

    def bias(self, dtype=np.float32, new_tokens: int = 1) -> np.ndarray:
        """The attention_bias input [1, 1, new_tokens, slots + new_tokens]: for each new token, 0
        for the filled slots (coded, then float), for itself and the new tokens before it, masked
        otherwise."""
        read = self.filled
        if self._float_slots:
            in_float = np.zeros(self.float_sinks + self.float_recent, dtype=bool)
            in_float[: min(self.length, self.float_sinks)] = True
            in_float[self.float_sinks : self.float_sinks + min(self.float_recent,
                                                                max(0, self.length - self.float_sinks))] = True
            read = np.concatenate([read, in_float])
        causal = np.tril(np.ones((new_tokens, new_tokens), dtype=bool))
        visible = np.concatenate([np.broadcast_to(read, (new_tokens, read.size)), causal], axis=1)
        return np.where(visible, 0.0, MASKED_BIAS).astype(dtype)[None, None]

    def update(self, presents: dict[str, np.ndarray], new_tokens: int) -> None:
        """Write the first `new_tokens` entries of the presents (a prefill call's last chunk may
        be padded), one token at a time, in order."""
        for index in range(new_tokens):
            self._update_one({name: self._take(name, entries, index) for name, entries in self._entries(presents)})

    def _entries(self, presents: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        """(cache input, the call's new entries) for codes and float slots: the name a present is
        written under is its input's, whose seq axis it shares."""
        entries = [(kv.input, presents[kv.output]) for kv in self.io.kv]
        return entries + [(name, presents[output]) for name, output, _ in self._float_slots]

    def _update_one(self, entries: dict[str, np.ndarray]) -> None:
        """One token's entries (one position along each seq axis), keyed by cache input."""
        if not self._float_slots:
            self._write_coded({kv.input: entries[kv.input] for kv in self.io.kv})
        elif self.length < self.float_sinks:
            self._write_float(entries, self.length)
        else:
            ring = (self.length - self.float_sinks) % self.float_recent
            if self.length - self.float_sinks >= self.float_recent:  # the oldest in the ring leaves it
                self._write_coded({name: self._take(name, pending, ring) for name, pending in self._pending.items()})
            for kv in self.io.kv:
                self._put(self._pending[kv.input], self._slot_axis[kv.input], ring,
                          np.take(entries[kv.input], 0, axis=self._slot_axis[kv.input]))
            self._write_float(entries, self.float_sinks + ring)
        self.length += 1

    def _take(self, name: str, buffer: np.ndarray, index: int) -> np.ndarray:
        return np.take(buffer, [index], axis=self._slot_axis[name])

    @staticmethod
    def _put(buffer: np.ndarray, axis: int, index: int, entry: np.ndarray) -> None:
        where = [slice(None)] * buffer.ndim
        where[axis] = index
        buffer[tuple(where)] = entry

    def _write_coded(self, entries: dict[str, np.ndarray]) -> None:
        """One token's codes (one position along each tensor's seq axis) into the next coded slot."""
        slot = self.next_slot()
        for name, entry in entries.items():
            axis = self._slot_axis[name]
            self._put(self.tensors[name], axis, slot, np.take(entry, 0, axis=axis))
        self.filled[slot] = True
        self.coded += 1

    def _write_float(self, entries: dict[str, np.ndarray], index: int) -> None:
        for name, _, axis in self._float_slots:
            self._put(self.tensors[name], axis, index, np.take(entries[name], 0, axis=axis))

    def nbytes(self) -> int:
        """Bytes the runner holds for the cache: the buffers the graph reads and the codes of the
        tokens in the float ring, waiting to enter the coded slots."""
        return sum(t.nbytes for t in self.tensors.values()) + sum(t.nbytes for t in self._pending.values())
