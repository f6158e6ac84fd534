"""QuantPlan: how each KV cache tensor is stored, decided from the KVGraph and calibration stats.

A plan holds, per cache tensor, the bit width (or float), the granularity of its scales, the
scales and zero points (in canonical [heads, head_dim] shape) and the reason for the choice.
`TensorPlan.codec` turns that into a `kvcompile.quant.Codec` in the tensor's own layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvcompile.errors import BadInputError
from kvcompile.kvgraph import KVGraph, KVTensor
from kvcompile.quant import Codec, SUPPORTED_BITS, symmetric_scale, symmetric_zero_point
from kvcompile.ranges import CLIP_METHODS, channel_ranges, rope_pairs, tensor_range
from kvcompile.runtimes.calibrate import KVStats

SCHEMES = ("per-tensor", "per-channel")
STORAGE = "uint8-packed"


@dataclass(frozen=True)
class TensorPlan:
    past_input: str
    label: str
    bits: int | None  # None keeps the tensor in float
    granularity: str | None
    symmetric: bool
    scale: np.ndarray  # float32, canonical [H, D] or [1, 1]
    zero_point: np.ndarray  # uint8, broadcastable to scale
    reason: str

    def codec(self, tensor: KVTensor) -> Codec | None:
        """The codec in the tensor's logical layout (scales broadcast over batch and seq)."""
        if self.bits is None:
            return None
        return Codec(self.bits, _to_layout(self.scale, tensor), _to_layout(self.zero_point, tensor),
                     pack_axis=tensor.axes.head_dim)

    def stored_bits_per_element(self, tensor: KVTensor) -> float:
        """Bits stored per cache element that grow with the context (codes; later per-token scales)."""
        if self.bits is None:
            return 16.0 if tensor.dtype == "float16" else 32.0
        return float(self.bits)

    def static_bytes(self) -> int:
        """Bytes of scales and zero points that do not grow with the context."""
        if self.bits is None:
            return 0
        zero_point_bytes = 0 if self.symmetric else self.zero_point.size
        return int(self.scale.size * 4 + zero_point_bytes)


@dataclass(frozen=True)
class QuantPlan:
    tensors: tuple[TensorPlan, ...]
    scheme: str
    bits: int
    clip: str = "mse"
    storage: str = STORAGE

    def for_input(self, past_input: str) -> TensorPlan:
        return next(t for t in self.tensors if t.past_input == past_input)

    def codecs(self, kv: KVGraph) -> dict[str, Codec]:
        out = {}
        for tensor in kv.tensors:
            codec = self.for_input(tensor.past_input).codec(tensor)
            if codec is not None:
                out[tensor.past_input] = codec
        return out


def _to_layout(canonical: np.ndarray, tensor: KVTensor) -> np.ndarray:
    """[H, D] (or [1, 1]) -> the broadcast shape of the tensor's layout, e.g. [1, H, 1, D]."""
    if canonical.size == 1:
        return canonical.reshape(())
    shape = [1] * tensor.rank
    if tensor.axes.heads is not None:
        shape[tensor.axes.heads] = canonical.shape[0]
    shape[tensor.axes.head_dim] = canonical.shape[1]
    return canonical.reshape(shape)


def check_options(bits: int, scheme: str, clip: str = "mse") -> None:
    if bits not in SUPPORTED_BITS:
        raise BadInputError(f"--kv-bits {bits} is not supported; use one of {SUPPORTED_BITS}")
    if scheme not in SCHEMES:
        raise BadInputError(f"--scheme {scheme!r} is not supported; use one of {', '.join(SCHEMES)}")
    if clip not in CLIP_METHODS:
        raise BadInputError(f"--clip {clip!r} is not supported; use one of {', '.join(CLIP_METHODS)}")


def make_plan(kv: KVGraph, stats: KVStats, bits: int, scheme: str, clip: str = "mse") -> QuantPlan:
    """Static symmetric scales for every cache tensor, per tensor or per channel, clipped by `clip`.

    RoPE keys get one range per rotary channel pair, so the scales hold at every position.
    """
    check_options(bits, scheme, clip)
    plans = []
    for tensor in kv.tensors:
        tensor_stats = stats.tensors[tensor.past_input]
        absmax = tensor_stats.absmax
        pairs = rope_pairs(tensor.head_dim) if tensor.kind == "key" and tensor.rope else None
        tied = " (RoPE pairs tied)" if pairs is not None else ""
        if scheme == "per-tensor":
            scale = symmetric_scale(tensor_range(tensor_stats.samples, bits, clip), bits)
            reason = f"one {clip} scale for the whole tensor (absmax {absmax.max():.3g})"
        else:
            scale = symmetric_scale(channel_ranges(tensor_stats.samples, bits, clip, pairs), bits)
            ratio = float(absmax.max() / max(np.median(absmax), 1e-12))
            reason = f"{clip} scale per head and channel{tied}; channel absmax max/median {ratio:.1f}"
        plans.append(TensorPlan(
            past_input=tensor.past_input, label=tensor.label, bits=bits, granularity=scheme,
            symmetric=True, scale=scale,
            zero_point=np.full((1, 1), symmetric_zero_point(bits), np.uint8), reason=reason,
        ))
    return QuantPlan(tuple(plans), scheme=scheme, bits=bits, clip=clip)
