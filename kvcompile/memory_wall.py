"""The memory wall: how much longer a context fits, and a bandwidth bound on decode time.

Everything here is arithmetic on two kinds of numbers, and the report keeps them apart:
- the compiled model's own figures (KV bytes per token as stored, static scale bytes, weight
  bytes), which kvcompile counted from the artifact;
- a device profile (DRAM peak bandwidth, on-chip memory), which is a published specification
  from `devices.toml`, not a measurement.

The decode-time figure is a model, not a measurement: every generated token reads every weight
and the whole KV cache once, so time/token >= (weight bytes + KV bytes(context)) / peak DRAM
bandwidth. Real decoding is slower (compute, imperfect bandwidth use); the bound says how much
of that floor the KV cache is, and how much 4-bit storage lowers it.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import onnx_ir as ir

from kvcompile.errors import BadInputError

DEFAULT_DEVICE = "snapdragon-8-gen-3"
DEFAULT_BUDGET = "1GiB"
# --soc (qnn-htp) -> the matching profile, the default device when compiling for that SoC
SOC_DEVICES = {"SM8650": "snapdragon-8-gen-3", "SM8750": "snapdragon-8-elite"}
DECODE_CONTEXTS = (1024, 4096, 16384, 65536)
MIB = 1024 * 1024


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    memory: str
    transfer_mts: int
    bus_bits: int
    on_chip_bytes: int | None
    on_chip_kind: str
    kind: str
    sources: tuple[str, ...]

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.transfer_mts * 1e6 * self.bus_bits / 8

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key, "name": self.name, "memory": self.memory, "transfer_mts": self.transfer_mts,
            "bus_bits": self.bus_bits, "peak_bandwidth_gb_s": round(self.bandwidth_bytes_per_s / 1e9, 1),
            "on_chip_bytes": self.on_chip_bytes, "on_chip_kind": self.on_chip_kind, "kind": self.kind,
            "sources": list(self.sources),
            "note": "published specifications, not measurements",
        }


def device_from_summary(summary: dict[str, Any]) -> Device:
    """The Device a report was written for (its `memory_wall.device` entry)."""
    return Device(key=summary["key"], name=summary["name"], memory=summary["memory"],
                  transfer_mts=summary["transfer_mts"], bus_bits=summary["bus_bits"],
                  on_chip_bytes=summary["on_chip_bytes"], on_chip_kind=summary["on_chip_kind"],
                  kind=summary["kind"], sources=tuple(summary["sources"]))


def _device(key: str, entry: dict[str, Any], where: str) -> Device:
    try:
        on_chip = entry.get("on_chip_mib")
        return Device(
            key=key, name=str(entry["name"]), memory=str(entry["memory"]),
            transfer_mts=int(entry["transfer_mts"]), bus_bits=int(entry["bus_bits"]),
            on_chip_bytes=None if on_chip is None else int(float(on_chip) * MIB),
            on_chip_kind=str(entry.get("on_chip_kind", "on-chip memory")) if on_chip is not None else "not published",
            kind=str(entry.get("kind", "user-supplied")), sources=tuple(str(s) for s in entry.get("sources", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"device profile {where}: needs name, memory, transfer_mts and bus_bits "
                            f"(optional on_chip_mib, on_chip_kind, kind, sources); {type(exc).__name__}: {exc}") from None


def bundled_devices() -> dict[str, Device]:
    text = resources.files("kvcompile").joinpath("devices.toml").read_text()
    return {key: _device(key, entry, key) for key, entry in tomllib.loads(text).items()}


def load_device(name: str) -> Device:
    """A bundled profile by key, or a TOML file holding one profile (with or without its [key])."""
    devices = bundled_devices()
    if name in devices:
        return devices[name]
    path = Path(name)
    if not path.suffix == ".toml":
        raise BadInputError(f"unknown device {name!r}; choose from {', '.join(devices)} or pass a .toml profile")
    try:
        entry = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadInputError(f"--device {name!r} is not a readable TOML file ({exc})") from None
    if "name" not in entry and len(entry) == 1 and isinstance(next(iter(entry.values())), dict):
        key, entry = next(iter(entry.items()))
        return _device(key, entry, f"{name} [{key}]")
    return _device(path.stem, entry, name)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """"1GiB", "512MiB", "2GB", "1048576" -> bytes."""
    match = _SIZE.match(str(text))
    if not match or (match.group(2) or "B").lower() not in _UNITS:
        raise BadInputError(f"--budget {text!r} is not a size; write e.g. 1GiB, 512MiB, 2GB or a byte count")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if size <= 0:
        raise BadInputError(f"--budget {text!r} must be more than 0 bytes")
    return size


def format_bytes(size: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def model_weights(path: Path) -> dict[str, int]:
    """Parameters and bytes of a model's initializers, as stored (external data is not read)."""
    model = ir.load(path)
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    return {"parameters": sum(math.prod(t.shape.numpy()) for t in tensors),
            "bytes": sum(t.nbytes for t in tensors)}


def tokens_that_fit(capacity: float, per_token: float, static: float = 0.0) -> int:
    return max(0, int((capacity - static) // per_token)) if capacity > static else 0


def memory_wall(memory: dict[str, Any], weights: dict[str, int], device: Device, budget: int,
                weight_bits: float | None = None) -> dict[str, Any]:
    """The report's memory-wall section from its memory figures (report.memory_figures)."""
    fp16 = float(memory["fp16_bytes_per_token"])
    compiled = float(memory["quantized_bytes_per_token"])
    static = float(memory["static_bytes"])
    elements = float(memory["elements_per_token"])
    weight_bytes = weights["bytes"] if weight_bits is None else weights["parameters"] * weight_bits / 8
    bandwidth = device.bandwidth_bytes_per_s

    def fits(capacity: float | None) -> dict[str, int | None]:
        if capacity is None:
            return {"fp16": None, "compiled": None}
        return {"fp16": tokens_that_fit(capacity, fp16), "compiled": tokens_that_fit(capacity, compiled, static)}

    decode = []
    for context in DECODE_CONTEXTS:
        fp16_s = (weight_bytes + fp16 * context) / bandwidth
        compiled_s = (weight_bytes + compiled * context + static) / bandwidth
        decode.append({"context": context, "fp16_ms": round(1e3 * fp16_s, 4), "compiled_ms": round(1e3 * compiled_s, 4),
                       "kv_share_fp16": round(fp16 * context / (weight_bytes + fp16 * context), 4),
                       "speedup": round(fp16_s / compiled_s, 3)})
    return {
        "device": device.summary(),
        "budget_bytes": budget,
        "kv_bytes_per_token": {"fp16": fp16, "int8": elements, "int4": elements / 2, "compiled": compiled},
        "static_bytes": static,
        "on_chip_fit_tokens": fits(device.on_chip_bytes),
        "budget_fit_tokens": fits(budget),
        "weights": {**weights, "bytes_in_bound": int(weight_bytes),
                    "as": "as stored in the artifact" if weight_bits is None else f"{weight_bits:g}-bit weights"},
        "decode_lower_bound": decode,
        "model": "time per token >= (weight bytes + KV bytes at the context) / peak DRAM bandwidth; "
                 "a bound from published specifications, not a measurement",
    }
