"""QuantPlan: how each KV cache tensor is stored, decided from the KVGraph and calibration stats.

A plan holds, per cache tensor, the bit width (or float), the granularity of its scales and
either static scales (canonical [heads, head_dim] shape, calibrated) or a dynamic group size
(scales computed in the graph for every token when it enters the cache and stored next to it),
plus the reason for the choice. `TensorPlan.codec` turns it into a `kvcompile.quant.Codec` in
the tensor's own layout.

Granularities:
  per-tensor   static, one scale                              (no stored parameters)
  per-channel  static, one scale per KV head and channel      (no stored parameters)
  (static and asymmetric: a zero point too, from the calibrated minimum and maximum)
  (static and centered, GroupQueryAttention keys only: symmetric around each channel's
   calibrated midpoint, which is subtracted before quantizing and comes out exactly in softmax)
  per-token    dynamic, one scale (+ zero point) per token and head   (16 (+8) bits / head_dim)
  per-group    dynamic, one per token and `group` head_dim channels    (16 (+8) bits / group)
Explicit schemes apply one choice to every tensor ("kivi": keys per-channel, values per-token
asymmetric); "auto" (kvcompile.autoplan) chooses per tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from kvcompile.errors import BadInputError
from kvcompile.kvgraph import KVGraph, KVTensor
from kvcompile.manifest import (KVIO, Packing, StoredParam, packed_dims, param_shape, scale_name, slot_name,
                                zero_point_name)
from kvcompile.quant import (Codec, SUPPORTED_BITS, asymmetric_params, codes_per_byte, symmetric_scale,
                            symmetric_zero_point)
from kvcompile.ranges import CLIP_METHODS, channel_ranges, tensor_range
from kvcompile.kvstats import KVStats

SCHEMES = ("auto", "per-tensor", "per-channel", "per-token", "per-group", "kivi")
GRANULARITIES = ("per-tensor", "per-channel", "per-token", "per-group")
GROUP_SIZES = (32, 64, 128)
STORAGE = "uint8-packed"
DYNAMIC_SCALE_BITS = 16  # float16
DYNAMIC_ZERO_POINT_BITS = 8  # uint8


@dataclass(frozen=True)
class TensorPlan:
    past_input: str
    label: str
    bits: int | None  # None keeps the tensor in float
    granularity: str | None
    symmetric: bool
    scale: np.ndarray | None  # static: float32, canonical [H, D] or [1, 1]; dynamic: None
    zero_point: np.ndarray | None  # static: uint8, broadcastable to scale
    reason: str
    group: int | None = None  # dynamic: head_dim channels per scale
    evidence: dict = field(default_factory=dict, compare=False)  # what auto measured
    # static, GroupQueryAttention keys only: subtracted before quantizing, canonical [H, D] float32
    center: np.ndarray | None = None
    # GroupQueryAttention only: (sinks, recent) positions also kept in float (passes.gqa_float_slots)
    float_slots: tuple[int, int] | None = None
    float_slot_bytes: int = 0  # what those float copies occupy when full

    @property
    def dynamic(self) -> bool:
        return self.group is not None

    @property
    def name(self) -> str:
        if self.bits is None:
            return "float"
        detail = self.granularity + (f"{self.group}" if self.granularity == "per-group" else "")
        return (f"{self.bits}-bit {detail}" + ("" if self.symmetric else " asym")
                + ("" if self.center is None else " centered"))

    def codec(self, tensor: KVTensor, packed: bool = True) -> Codec | None:
        """The codec in the tensor's logical layout (static scales broadcast over batch and seq)."""
        if self.bits is None:
            return None
        if self.dynamic:
            return Codec(self.bits, None, None, tensor.axes.head_dim, group=self.group, symmetric=self.symmetric,
                         packed=packed)
        center = None if self.center is None else to_layout(self.center, tensor)
        return Codec(self.bits, to_layout(self.scale, tensor), to_layout(self.zero_point, tensor),
                     pack_axis=tensor.axes.head_dim, packed=packed, center=center)

    def canonical_codec(self) -> Codec | None:
        """The codec for canonical samples [tokens, heads, head_dim] (calibration layout)."""
        if self.bits is None:
            return None
        if self.dynamic:
            return Codec(self.bits, None, None, 2, group=self.group, symmetric=self.symmetric)
        center = None if self.center is None else self.center[None]
        return Codec(self.bits, self.scale[None], self.zero_point[None], pack_axis=2, center=center)

    def stored_bits_per_element(self, tensor: KVTensor) -> float:
        """Bits stored per cache element that grow with the context: codes and dynamic parameters."""
        if self.bits is None:
            return 16.0 if tensor.dtype == "float16" else 32.0
        if not self.dynamic:
            return float(self.bits)
        per_group = DYNAMIC_SCALE_BITS + (0 if self.symmetric else DYNAMIC_ZERO_POINT_BITS)
        return self.bits + per_group / self.group

    def static_bytes(self) -> int:
        """Bytes that do not grow with the context: scales, zero points, centers, float slots."""
        if self.bits is None or self.dynamic:
            return 0
        zero_point_bytes = 0 if self.symmetric else self.zero_point.size
        center_bytes = 0 if self.center is None else self.center.size * 4
        return int(self.scale.size * 4 + zero_point_bytes + center_bytes + self.float_slot_bytes)


@dataclass(frozen=True)
class QuantPlan:
    tensors: tuple[TensorPlan, ...]
    scheme: str
    bits: float  # the budget: average stored bits per element, scales included
    clip: str = "wmse"
    storage: str = STORAGE
    notes: tuple[str, ...] = ()
    # `auto` only: (budget in bits/element, summed single-tensor KL of the plan it would choose
    # there), from the same measurements: what more (or fewer) bits would buy.
    budget_curve: tuple[tuple[float, float], ...] = ()

    def for_input(self, past_input: str) -> TensorPlan:
        return next(t for t in self.tensors if t.past_input == past_input)

    def codecs(self, kv: KVGraph, packed: bool = True) -> dict[str, Codec]:
        out = {}
        for tensor in kv.tensors:
            codec = self.for_input(tensor.past_input).codec(tensor, packed)
            if codec is not None:
                out[tensor.past_input] = codec
        return out

    @property
    def bit_widths(self) -> tuple[int, ...]:
        return tuple(sorted({t.bits for t in self.tensors if t.bits is not None}))


def to_layout(canonical: np.ndarray, tensor: KVTensor) -> np.ndarray:
    """[H, D] (or [1, 1]) -> the broadcast shape of the tensor's layout, e.g. [1, H, 1, D]."""
    if canonical.size == 1:
        return canonical.reshape(())
    shape = [1] * tensor.rank
    if tensor.axes.heads is not None:
        shape[tensor.axes.heads] = canonical.shape[0]
    shape[tensor.axes.head_dim] = canonical.shape[1]
    return canonical.reshape(shape)


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked of the plan: the bit budget, the scheme and how scales are found,
    transforms of the cache (rotation, folded scales) and whether attention may be fused."""

    kv_bits: float = 4
    scheme: str = "auto"
    clip: str = "wmse"
    group_size: int = 32
    asymmetric: bool = False
    uniform: bool = False
    rotate: str | None = None  # "hadamard"
    fold_scales: bool = False
    fuse_attention: str = "auto"  # auto | on | off
    calibrated: bool = True  # False: --no-calibration (dynamic scales only)
    float_slots: tuple[int, int] = (4, 128)  # fused GroupQueryAttention: (sinks, recent) positions kept in float


def check_options(bits: float, scheme: str, clip: str = "wmse", group_size: int = 32) -> None:
    if not min(SUPPORTED_BITS) <= bits <= 16:
        raise BadInputError(f"--kv-bits {bits} is outside {min(SUPPORTED_BITS)}..16 (the average "
                            f"stored bits per element; codes are {'/'.join(map(str, SUPPORTED_BITS))} bits)")
    if scheme not in SCHEMES:
        raise BadInputError(f"--scheme {scheme!r} is not supported; use one of {', '.join(SCHEMES)}")
    if clip not in CLIP_METHODS:
        raise BadInputError(f"--clip {clip!r} is not supported; use one of {', '.join(CLIP_METHODS)}")
    if group_size not in GROUP_SIZES:
        raise BadInputError(f"--group-size {group_size} is not supported; use one of {GROUP_SIZES}")
    if scheme != "auto" and float(bits) not in SUPPORTED_BITS:
        raise BadInputError(f"--scheme {scheme} stores every tensor at one bit width: --kv-bits must be "
                            f"one of {SUPPORTED_BITS} (fractional budgets need --scheme auto)")


def tensor_plan(tensor: KVTensor, stats: KVStats, bits: int, granularity: str, clip: str,
                group: int | None = None, symmetric: bool = True) -> TensorPlan:
    """One way to store one tensor: static scales from calibration, or a dynamic group size.
    Symmetric per-channel keys of a GroupQueryAttention that lets a center out exactly are
    centered (`centered_channel_plan`): the same grid, spent on the range the keys occupy."""
    if granularity in ("per-token", "per-group"):
        group = tensor.head_dim if granularity == "per-token" else group
        if tensor.head_dim % group:
            raise BadInputError(f"{tensor.label}: head_dim {tensor.head_dim} is not a multiple of --group-size {group}")
        kind = "asymmetric" if not symmetric else "symmetric"
        return TensorPlan(tensor.past_input, tensor.label, bits, granularity, symmetric, None, None,
                          reason=f"{kind} scale computed for every {group} channels of each token", group=group)
    absmax = stats.tensors[tensor.past_input].absmax
    if not symmetric:
        return _asymmetric_static_plan(tensor, stats, bits, granularity)
    if granularity == "per-channel" and tensor.centerable:
        return centered_channel_plan(tensor, stats, bits, clip)
    samples = stats.tensors[tensor.past_input].samples
    if granularity == "per-tensor":
        scale = symmetric_scale(tensor_range(samples, bits, clip), bits)
        reason = f"one {clip} scale for the whole tensor (absmax {absmax.max():.3g})"
    else:
        scale = symmetric_scale(channel_ranges(samples, bits, clip), bits)
        ratio = float(absmax.max() / max(np.median(absmax), 1e-12))
        reason = f"{clip} scale per head and channel; channel absmax max/median {ratio:.1f}"
    return TensorPlan(tensor.past_input, tensor.label, bits, granularity, True, scale,
                      np.full((1, 1), symmetric_zero_point(bits), np.uint8), reason=reason)


def centered_channel_plan(tensor: KVTensor, stats: KVStats, bits: int, clip: str) -> TensorPlan:
    """Static symmetric scales per head and channel around each channel's calibrated midpoint:
    what is stored is x - center, what reads back is the dequantized value + center.

    Post-RoPE keys sit off zero in many channels (a symmetric grid then spends half its levels
    on values that never occur); centering gives the whole grid to the range seen, as an
    asymmetric range does, without a zero point the fused kernel cannot take. Only for keys
    whose center comes out exactly in softmax (`passes.quantize_gqa`: GroupQueryAttention).
    On SmolLM2 (4 x 1024 tokens, `python -m bench.storage_sweep`) keys centered with wmse
    scales cost +6.42%, with min/max scales +8.51%, symmetric wmse keys +12.88%."""
    tensor_stats = stats.tensors[tensor.past_input]
    low = tensor_stats.minimum.reshape(tensor_stats.minimum.shape[-2:])
    high = tensor_stats.maximum.reshape(tensor_stats.maximum.shape[-2:])
    center = ((low + high) / np.float32(2)).astype(np.float32)
    if tensor.dtype == "float16":  # the graph subtracts it in the keys' dtype: keep the value it holds
        center = center.astype(np.float16).astype(np.float32)
    if clip == "minmax":
        ranges = (high - low) / np.float32(2)
    else:
        ranges = channel_ranges(tensor_stats.samples - center, bits, clip)
    scale = symmetric_scale(ranges, bits)
    reason = f"{clip} scale per head and channel around the channel's calibrated midpoint (centered)"
    return TensorPlan(tensor.past_input, tensor.label, bits, "per-channel", True, scale,
                      np.full((1, 1), symmetric_zero_point(bits), np.uint8), reason=reason, center=center)


def _asymmetric_static_plan(tensor: KVTensor, stats: KVStats, bits: int, granularity: str) -> TensorPlan:
    """Static scale and zero point from the calibrated minimum and maximum (per head and channel,
    or one for the tensor), not clipped. The grid holds zero exactly: values of attention-sink
    tokens are near zero, and an error there is multiplied by the attention they receive. On
    SmolLM2's keys these ranges cost +5.6% where symmetric wmse ranges cost +8.2% (README)."""
    tensor_stats = stats.tensors[tensor.past_input]
    low, high = tensor_stats.minimum, tensor_stats.maximum
    if granularity == "per-tensor":
        low, high = low.min(keepdims=True)[:1, :1], high.max(keepdims=True)[:1, :1]
        reason = "one asymmetric min/max range for the whole tensor"
    else:
        reason = "asymmetric min/max range per head and channel"
    scale, zero_point = asymmetric_params(low.reshape(low.shape[-2:]), high.reshape(high.shape[-2:]), bits)
    return TensorPlan(tensor.past_input, tensor.label, bits, granularity, False, scale, zero_point, reason=reason)


def make_plan(kv: KVGraph, stats: KVStats, bits: int, scheme: str, clip: str = "wmse",
              group_size: int = 32, asymmetric: bool = False) -> QuantPlan:
    """One explicit scheme for every tensor (see module docstring); "auto" is in autoplan."""
    check_options(bits, scheme, clip, group_size)
    if scheme == "auto":
        raise ValueError("scheme auto is planned by kvcompile.autoplan.auto_plan")
    bits = int(bits)
    plans = []
    for tensor in kv.tensors:
        if scheme == "kivi":
            granularity = "per-channel" if tensor.kind == "key" else "per-token"
            symmetric = tensor.kind == "key"
        else:
            granularity, symmetric = scheme, not asymmetric
        plans.append(tensor_plan(tensor, stats, bits, granularity, clip, group_size, symmetric))
    return QuantPlan(tuple(plans), scheme=scheme, bits=float(bits), clip=clip)


def with_float_slots(plan: QuantPlan, kv: KVGraph, layers: set[int], sinks: int, recent: int) -> QuantPlan:
    """The plan with (sinks, recent) float slots on both cache tensors of each of `layers` (the
    4-bit GroupQueryAttention layers that can take them: passes.gqa_float_slots)."""
    if not sinks and not recent:
        return plan
    tensors = []
    for tensor in kv.tensors:
        chosen = plan.for_input(tensor.past_input)
        if tensor.layer in layers and chosen.bits is not None:
            chosen = dataclasses.replace(
                chosen, float_slots=(sinks, recent),
                float_slot_bytes=(sinks + recent) * tensor.num_heads * tensor.head_dim * 2,  # float16
                reason=f"{chosen.reason}; the first {sinks} and newest {recent} positions also in float")
        tensors.append(chosen)
    return dataclasses.replace(plan, tensors=tuple(tensors))


def stored_kvio(float_io: KVIO, plan: QuantPlan, packed: bool = True) -> KVIO:
    """The manifest entry of a cache tensor stored as the plan says."""
    tensor_plan = plan.for_input(float_io.input)
    if tensor_plan.bits is None:
        return float_io
    bits = tensor_plan.bits
    per_byte = codes_per_byte(bits) if packed else 1
    params = []
    if tensor_plan.float_slots is not None and float_io.kind == "key":  # the layer's keys and values
        for part in ("sink", "recent"):
            shape = list(float_io.logical_shape)
            shape[float_io.seq_axis] = f"{part}_seq"
            shape[float_io.heads_axis] = 2 * shape[float_io.heads_axis]
            params.append(StoredParam(part, slot_name(float_io.input, part), slot_name(float_io.output, part),
                                      "float16", shape))
    if tensor_plan.dynamic:
        shape = param_shape(float_io.logical_shape, float_io.head_dim_axis, tensor_plan.group)
        params.append(StoredParam("scale", scale_name(float_io.input), scale_name(float_io.output), "float16", shape))
        if not tensor_plan.symmetric:
            params.append(StoredParam("zero_point", zero_point_name(float_io.input),
                                      zero_point_name(float_io.output), "uint8", shape))
    return dataclasses.replace(
        float_io,
        stored_dtype="uint8",
        stored_shape=packed_dims(float_io.logical_shape, float_io.head_dim_axis, per_byte),
        bits=bits,
        granularity=tensor_plan.granularity,
        symmetric=tensor_plan.symmetric,
        group=tensor_plan.group,
        packing=Packing(axis=float_io.head_dim_axis, codes_per_byte=per_byte),
        scale=None if tensor_plan.dynamic else tensor_plan.scale.tolist(),
        scale_shape=None if tensor_plan.dynamic else list(tensor_plan.scale.shape),
        zero_point=None if tensor_plan.dynamic else tensor_plan.zero_point.tolist(),
        center=None if tensor_plan.center is None else tensor_plan.center.tolist(),
        params=params,
    )
