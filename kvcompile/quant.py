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
    return 10.0 * np.log10(signal / noise)


class Codec:
    """How one cache tensor is stored: a ``bits`` grid, its scale and zero point, and packing.

    ``scale`` and ``zero_point`` broadcast against the tensor in its logical layout (a scalar
    for per-tensor, e.g. [1, H, 1, D] for per-channel); codes are packed along ``pack_axis``
    (the head_dim axis), so appending tokens along the sequence axis never splits a byte.
    """

    def __init__(self, bits: int, scale: np.ndarray | float, zero_point: np.ndarray | int, pack_axis: int):
        check_bits(bits)
        self.bits = bits
        self.scale = np.asarray(scale, dtype=np.float32)
        self.zero_point = np.asarray(zero_point, dtype=np.uint8)
        self.pack_axis = pack_axis

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1 and self.zero_point.size == 1

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Float tensor -> packed uint8 codes."""
        return pack(quantize(x, self.scale, self.zero_point, self.bits), self.bits, self.pack_axis)

    def decode(self, packed: np.ndarray) -> np.ndarray:
        """Packed uint8 codes -> float32 tensor."""
        return dequantize(unpack(packed, self.bits, self.pack_axis), self.scale, self.zero_point)
