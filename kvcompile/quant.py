"""The quantization math of kvcompile, in one place, matching ONNX QuantizeLinear/DequantizeLinear.

Every pass and runtime uses these functions; nothing re-derives them.

Codes are unsigned integers in ``[0, 2**bits - 1]``. A symmetric grid uses the zero point
``2**(bits - 1)`` (8 for 4 bits), so a code ``c`` means ``(c - 8) * scale``.

- quantize:   ``code = clip(round_half_even(x / scale) + zero_point, 0, 2**bits - 1)``, exactly
  ONNX QuantizeLinear (float32 division, round half to even, saturation) onto a ``bits`` grid.
- dequantize: ``x' = float32(code - zero_point) * scale``, exactly ONNX DequantizeLinear.
- packing: ``8 // bits`` consecutive codes along one axis share a byte, the first code in the
  lowest bits. This is the order ONNX uses for INT4/UINT4 tensors and onnxruntime uses for its
  uint8 quantized KV cache.

Scales broadcast against the tensor (per-tensor: a scalar; per-channel: e.g. ``[1, H, 1, D]``;
per-token: ``[B, H, S, 1]``), so one implementation serves every granularity.
"""

from __future__ import annotations

import math

import numpy as np

SUPPORTED_BITS = (2, 4, 8)
# A scale is never smaller than this fraction of the tensor's range (or this absolute floor),
# so all-zero and near-constant channels quantize to their zero point instead of dividing by 0.
_RELATIVE_SCALE_FLOOR = 1e-6
_ABSOLUTE_SCALE_FLOOR = 1e-12


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def code_max(bits: int) -> int:
    """Largest code of an unsigned ``bits`` grid (15 for 4 bits)."""
    check_bits(bits)
    return (1 << bits) - 1


def symmetric_zero_point(bits: int) -> int:
    """Zero point of the symmetric grid: codes [0, 2**bits) hold values [-2**(bits-1), 2**(bits-1))."""
    check_bits(bits)
    return 1 << (bits - 1)


def symmetric_scale(absmax: np.ndarray | float, bits: int) -> np.ndarray:
    """Scale that maps ``absmax`` onto the largest positive symmetric level (7 for 4 bits)."""
    absmax = np.abs(np.asarray(absmax, dtype=np.float32))
    qmax = symmetric_zero_point(bits) - 1
    floor = max(float(np.max(absmax, initial=0.0)) * _RELATIVE_SCALE_FLOOR, _ABSOLUTE_SCALE_FLOOR)
    return (np.maximum(absmax, floor) / np.float32(qmax)).astype(np.float32)


def asymmetric_params(
    minimum: np.ndarray | float, maximum: np.ndarray | float, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point that map [minimum, maximum] (widened to hold 0) onto the grid."""
    lo = np.minimum(np.asarray(minimum, dtype=np.float32), 0.0)
    hi = np.maximum(np.asarray(maximum, dtype=np.float32), 0.0)
    span = hi - lo
    floor = max(float(np.max(span, initial=0.0)) * _RELATIVE_SCALE_FLOOR, _ABSOLUTE_SCALE_FLOOR)
    scale = (np.maximum(span, floor) / np.float32(code_max(bits))).astype(np.float32)
    zero_point = np.clip(np.rint(-lo / scale), 0, code_max(bits)).astype(np.uint8)
    return scale, zero_point


def quantize(
    x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, bits: int
) -> np.ndarray:
    """ONNX QuantizeLinear onto an unsigned ``bits`` grid; returns uint8 codes (one per element)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.rint(x / scale) + zero_point
    return np.clip(scaled, 0, code_max(bits)).astype(np.uint8)


def dequantize(codes: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int) -> np.ndarray:
    """ONNX DequantizeLinear: ``(code - zero_point) * scale`` in float32."""
    centered = np.asarray(codes, dtype=np.int32) - np.asarray(zero_point, dtype=np.int32)
    return centered.astype(np.float32) * np.asarray(scale, dtype=np.float32)


def fake_quantize(
    x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, bits: int
) -> np.ndarray:
    """What a tensor reads back as after a quantize/dequantize round trip."""
    return dequantize(quantize(x, scale, zero_point, bits), scale, zero_point)


def codes_per_byte(bits: int) -> int:
    check_bits(bits)
    return 8 // bits


def pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack ``8 // bits`` consecutive codes along ``axis`` into each byte, first code lowest."""
    n = codes_per_byte(bits)
    codes = np.moveaxis(np.asarray(codes, dtype=np.uint8), axis, -1)
    if codes.shape[-1] % n:
        raise ValueError(f"axis length {codes.shape[-1]} is not a multiple of {n} codes per byte")
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // n, n).astype(np.uint16)
    shifts = (np.arange(n, dtype=np.uint16) * bits).astype(np.uint16)
    packed = np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)
    return np.moveaxis(packed, -1, axis)


def unpack(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Inverse of `pack`: one code per uint8 element."""
    n = codes_per_byte(bits)
    packed = np.moveaxis(np.asarray(packed, dtype=np.uint8), axis, -1)
    shifts = (np.arange(n, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8(code_max(bits))
    codes = codes.reshape(*packed.shape[:-1], packed.shape[-1] * n)
    return np.moveaxis(codes, -1, axis)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when the approximation is exact)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((reference - np.asarray(approximation, dtype=np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


# Dynamic scales are stored in float16 and never smaller than this (an all-zero group of a
# token quantizes to its zero point). The floor is per group, so a token's scale depends on
# that token alone: prefill and token-by-token decoding store identical values.
DYNAMIC_SCALE_FLOOR = np.float32(1e-5)


def split_groups(x: np.ndarray, axis: int, group: int) -> np.ndarray:
    """View `axis` (length D) as two axes (D // group, group) at positions axis, axis + 1."""
    axis = axis % x.ndim
    if x.shape[axis] % group:
        raise ValueError(f"axis length {x.shape[axis]} is not a multiple of group size {group}")
    return x.reshape(*x.shape[:axis], x.shape[axis] // group, group, *x.shape[axis + 1 :])


def merge_groups(x: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of split_groups."""
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :])


def to_float16_grid(x: np.ndarray) -> np.ndarray:
    """Round float32 values to float16 (how dynamic scales are stored) and back."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def dynamic_params(x: np.ndarray, axis: int, group: int, bits: int, symmetric: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-group scale (float16-exact float32) and zero point of each token's head_dim vector.

    Shapes are x's with `axis` replaced by D // group. Symmetric: absmax / qmax, zero point
    2**(bits-1). Asymmetric: (max - min) / (2**bits - 1), zero point round(-min / scale).
    """
    grouped = split_groups(np.asarray(x, dtype=np.float32), axis, group)
    inner = (axis % x.ndim) + 1
    if symmetric:
        absmax = np.abs(grouped).max(axis=inner)
        scale = to_float16_grid(np.maximum(absmax / np.float32(symmetric_zero_point(bits) - 1), DYNAMIC_SCALE_FLOOR))
        zero_point = np.full(scale.shape, symmetric_zero_point(bits), np.uint8)
    else:
        low, high = grouped.min(axis=inner), grouped.max(axis=inner)
        scale = to_float16_grid(np.maximum((high - low) / np.float32(code_max(bits)), DYNAMIC_SCALE_FLOOR))
        zero_point = np.clip(np.rint(-low / scale), 0, code_max(bits)).astype(np.uint8)
    return scale, zero_point


class Codec:
    """How one cache tensor is stored: a ``bits`` grid, its scales and zero points, and packing.

    Static codecs carry ``scale`` and ``zero_point`` that broadcast against the tensor in its
    logical layout (a scalar for per-tensor, e.g. [1, H, 1, D] for per-channel). Dynamic codecs
    (``group`` set) compute a scale (and, asymmetric, a zero point) for every ``group``
    consecutive head_dim channels of every token when it enters the cache; these are stored next
    to the cache, with the head_dim axis holding D // group entries. Codes are packed along
    ``pack_axis`` (the head_dim axis), so appending tokens never splits a byte; ``packed=False``
    keeps one code per byte (for accelerators that cannot unpack nibbles).

    A static codec may carry a ``center`` (broadcast like ``scale``): what is quantized is
    ``x - center`` and what reads back is the dequantized value plus ``center``. Attention can
    store keys this way without storing the center in the cache: softmax ignores the per-query
    constant ``q . center`` (passes.quantize_gqa).
    """

    def __init__(self, bits: int, scale: np.ndarray | float | None, zero_point: np.ndarray | int | None,
                 pack_axis: int, group: int | None = None, symmetric: bool = True, packed: bool = True,
                 center: np.ndarray | None = None):
        check_bits(bits)
        self.bits = bits
        self.pack_axis = pack_axis
        # codes sharing a byte: 8 // bits when packed; 1 for targets that read one code per byte
        self.per_byte = codes_per_byte(bits) if packed else 1
        self.group = group
        self.symmetric = symmetric
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float32)
        self.zero_point = None if zero_point is None else np.asarray(zero_point, dtype=np.uint8)
        if center is not None and group is not None:
            raise ValueError("a center is for static scales only")
        self.center = None if center is None else np.asarray(center, dtype=np.float32)

    @property
    def dynamic(self) -> bool:
        return self.group is not None

    @property
    def per_tensor(self) -> bool:
        return not self.dynamic and self.scale.size == 1 and self.zero_point.size == 1

    def params(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point for x, broadcastable against x (dynamic ones computed from x)."""
        if not self.dynamic:
            return self.scale, self.zero_point
        scale, zero_point = dynamic_params(x, self.pack_axis, self.group, self.bits, self.symmetric)
        return scale, zero_point

    def _grouped(self, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray):
        axis = self.pack_axis % x.ndim
        return (split_groups(x, axis, self.group), np.expand_dims(scale, axis + 1),
                np.expand_dims(zero_point, axis + 1), axis)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Float tensor -> (packed uint8 codes, stored scales, stored zero points).

        Static codecs store no per-token parameters (None, None); symmetric dynamic codecs store
        scales only."""
        x = np.asarray(x, dtype=np.float32)
        if not self.dynamic:
            if self.center is not None:
                x = x - self.center
            return self._pack(quantize(x, self.scale, self.zero_point, self.bits)), None, None
        scale, zero_point = self.params(x)
        grouped, s, z, axis = self._grouped(x, scale, zero_point)
        codes = merge_groups(quantize(grouped, s, z, self.bits), axis)
        return self._pack(codes), scale.astype(np.float16), None if self.symmetric else zero_point

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        return pack(codes, self.bits, self.pack_axis) if self.per_byte > 1 else codes

    def unpack(self, stored: np.ndarray) -> np.ndarray:
        return unpack(stored, self.bits, self.pack_axis) if self.per_byte > 1 else np.asarray(stored, np.uint8)

    def decode(self, packed: np.ndarray, scale: np.ndarray | None = None,
               zero_point: np.ndarray | None = None) -> np.ndarray:
        """(packed codes, stored scales, stored zero points) -> float32 tensor."""
        codes = self.unpack(packed)
        if not self.dynamic:
            values = dequantize(codes, self.scale, self.zero_point)
            return values if self.center is None else values + self.center
        scale = np.asarray(scale, dtype=np.float32)
        if zero_point is None:
            zero_point = np.full(scale.shape, symmetric_zero_point(self.bits), np.uint8)
        grouped, s, z, axis = self._grouped(codes, scale, zero_point)
        return merge_groups(dequantize(grouped, s, z), axis)

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        """What x reads back as after it was stored."""
        return self.decode(*self.encode(x))
