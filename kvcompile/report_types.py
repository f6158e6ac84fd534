"""The compile report as typed values: assembled only by `pipeline.py`, written by `report.py`.

`Report.to_dict()` is report.json's content (the form users and CI read); report.md and
report.png are rendered from that same form, so `kvcompile report` can redo them for a folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kvcompile.quality import TargetQuality

STATUS = {True: "passed", False: "failed-quality-gate", None: "unverified"}


@dataclass(frozen=True)
class TensorRow:
    """One cache tensor: where it is, how it is stored and why, and how well its plan fits."""

    label: str
    layer: int
    kind: str
    input: str
    output: str
    layout: str
    kv_heads: int
    head_dim: int
    dtype: str
    attention: str
    rope: str | None
    bits: int | None
    granularity: str | None
    group: int | None
    symmetric: bool | None
    scheme: str
    stored_bits_per_element: float
    reason: str
    sqnr_db: float | None  # calibration-set reconstruction SQNR (None without calibration)
    measured_kl: dict | None  # auto's measurements for this tensor
    calib_absmax: float | None


@dataclass(frozen=True)
class KVSection:
    layers: int
    discovery: str  # "graph" analysis or a --kv-map file
    attention_forms: list[str]
    tensors: list[TensorRow]


@dataclass(frozen=True)
class BudgetPoint:
    bits: float
    summed_kl: float


@dataclass(frozen=True)
class PlanSection:
    bits: float
    scheme: str
    clip: str
    storage: str
    budget_curve: list[BudgetPoint]
    rotate: str | None
    fold_scales: bool
    bit_widths: list[int]
    choices: dict[str, str]  # tensor label -> its storage


@dataclass(frozen=True)
class CalibrationSection:
    tokens: int
    text: str
    window: int


@dataclass(frozen=True)
class MemoryFigures:
    """Every stored byte (codes, scales, zero points); see report.py's docstring."""

    fp16_bytes_per_token: int
    quantized_bytes_per_token: float
    static_bytes: int
    reference_context: int
    fp16_bytes_at_reference: int
    quantized_bytes_at_reference: float
    ratio_vs_fp16: float
    avg_bits_per_element: float
    elements_per_token: int


@dataclass(frozen=True)
class Verdict:
    """The quality gate over every verified target. `gate` holds the ort-cpu figures the gate
    reads; None (with `reason`) for a compile that ran nothing."""

    passed: bool | None
    gate: TargetQuality | None
    failed_targets: tuple[str, ...] = ()
    target_failures: tuple[str, ...] = ()  # one line per failed target: why
    advice: tuple[str, ...] = ()
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.gate is None:
            return {"passed": self.passed, "verified": False, "reason": self.reason}
        figures = {k: v for k, v in asdict(self.gate).items() if k not in ("ran_on", "agreement")}
        out = {**figures, "passed": self.passed}
        if self.failed_targets:
            out["failed_targets"] = list(self.failed_targets)
            out["target_failures"] = list(self.target_failures)
        if self.advice:
            out["advice"] = list(self.advice)
        return out


@dataclass(frozen=True)
class TargetReport:
    """One target's artifact: what it stores, what it changed in the plan, how it ran."""

    artifact: str
    kv_storage: str
    quality: TargetQuality | None  # None: not run (an unverified compile)
    plan_changes: tuple[str, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)  # the target's own figures (sizes, coverage)

    def to_dict(self) -> dict[str, Any]:
        return {**self.facts, "artifact": self.artifact, "ran": self.quality is not None,
                "kv_storage": self.kv_storage, "plan_changes": list(self.plan_changes),
                "quality": None if self.quality is None else asdict(self.quality)}


@dataclass(frozen=True)
class FusionSection:
    fused: bool
    reason: str
    float_slots: str | None = None  # GroupQueryAttention: whether sink/recent float slots were added, and why


@dataclass(frozen=True)
class LimitsSection:
    max_context: int | None
    sliding_window: int | None
    facts: list[str]  # where each limit was read
    eval_window: int | None = None  # calibration and verification windows (calibrated compiles)
    prefill: int | None = None


@dataclass(frozen=True)
class Report:
    kvcompile_version: str
    source: dict[str, str]  # the input's file name and sha256
    kv: KVSection
    plan: PlanSection
    calibration: CalibrationSection | None
    memory: MemoryFigures
    memory_wall: dict[str, Any]  # kvcompile.memory_wall.memory_wall's section (recomputed by `kvcompile report`)
    quality: Verdict
    targets: dict[str, TargetReport]
    fusion: FusionSection
    limits: LimitsSection
    timings: dict[str, Any]  # seconds per stage; fusion's latency measurements

    @property
    def status(self) -> str:
        return STATUS[self.quality.passed]

    def to_dict(self) -> dict[str, Any]:
        limits = asdict(self.limits)
        if self.limits.eval_window is None:
            limits = {k: v for k, v in limits.items() if k not in ("eval_window", "prefill")}
        return {
            "kvcompile_version": self.kvcompile_version,
            "source": dict(self.source),
            "status": self.status,
            "kv": asdict(self.kv),
            "plan": asdict(self.plan),
            "calibration": None if self.calibration is None else asdict(self.calibration),
            "memory": asdict(self.memory),
            "memory_wall": self.memory_wall,
            "quality": self.quality.to_dict(),
            "targets": {name: target.to_dict() for name, target in self.targets.items()},
            "fusion": asdict(self.fusion),
            "limits": limits,
            "timings": self.timings,
        }
