"""KV-cache buffers driven by the manifest, kept in their stored form.

`GrowingCache` serves dynamic-shape targets (ORT CPU): it starts empty (sequence length 0) and
each step's present outputs become the next step's past inputs, so a 4-bit cache stays packed
uint8 on the host and is never unpacked or re-quantized.
"""

from __future__ import annotations

import numpy as np

from kvcompile.manifest import TargetIO

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


def concrete_shape(shape: list[int | str], batch: int, seq: int) -> tuple[int, ...]:
    """Replace the symbolic "batch" and "seq" dims of a manifest shape by sizes."""
    sizes = {"batch": batch, "seq": seq}
    out = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
        elif dim in sizes:
            out.append(sizes[dim])
        else:
            raise ValueError(f"cache shape {shape} has an unknown symbolic dim {dim!r}")
    return tuple(out)


class GrowingCache:
    """A cache that grows by the number of tokens fed at each step."""

    def __init__(self, io: TargetIO, batch: int):
        self.io = io
        self.batch = batch
        self.length = 0
        self.tensors: dict[str, np.ndarray] = {
            name: np.zeros(concrete_shape(shape, batch, 0), stored_numpy_dtype(dtype))
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
        copy = GrowingCache.__new__(GrowingCache)
        copy.io, copy.batch, copy.length = self.io, self.batch, self.length
        copy.tensors = {**self.tensors, **tensors}
        return copy

    def nbytes(self) -> int:
        """Bytes the cache occupies now (everything stored: codes and float parts)."""
        return sum(t.nbytes for t in self.tensors.values())
