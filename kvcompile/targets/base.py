"""The Target protocol: what every back end provides, and the typed values it takes and returns.

A target is one module under `kvcompile/targets/` holding one object that satisfies `Target`,
listed once in `kvcompile/targets/__init__.py` (the registry). The pipeline lowers every
requested target, writes the manifest, then verifies each one:

    LoweringInput --lower--> Artifact --verify(VerifyInput)--> TargetQuality

- `check` refuses, right after the analysis, a model or option the target cannot take.
- `lower` writes the target's files under the output folder and returns an `Artifact`: the
  manifest entry (`TargetIO`), how the cache is stored, and the facts the report shows (sizes,
  coverage, ...). Lowering runs a model only where building the artifact needs it (qnn-htp
  calibrates its QDQ quantization on its own float graph).
- `verify` runs the artifact on the runtime named by `runs_on` through the one verifier in
  `runtimes/verify.py` and returns the same `TargetQuality` for every target.
- `open` loads a written artifact for running (`kvcompile run`, `eval`, and `verify` itself).
- `capabilities` says what the target's cache can hold; `legalize` (below) turns the compile's
  plan into one the target holds, in one place for every target, before `lower` sees it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from kvcompile.kvgraph import KVGraph, KVTensor
from kvcompile.kvstats import KVStats
from kvcompile.manifest import TargetIO
from kvcompile.plan import QuantPlan, TensorPlan, centered_channel_plan, tensor_plan
from kvcompile.quality import TargetQuality
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.weights import WeightPool


@dataclass(frozen=True)
class Capabilities:
    """What a target's cache can hold."""

    bits: tuple[int, ...]  # code widths the stored cache takes
    float_tensors: bool  # tensors a plan leaves in float
    dynamic_scales: bool  # per-token / per-group scales computed in the graph
    asymmetric: bool  # a zero point next to the scale
    dynamic_shapes: bool  # False: one fixed buffer of max_context tokens (a static graph)
    needs_calibration: bool  # static scales and float checks: refused with --no-calibration
    centered: bool = False  # a per-channel center taken out before quantizing (GroupQueryAttention)
    float_slots: bool = False  # sink and recent positions also kept in float (GroupQueryAttention)
    # static graphs: every per-channel key is stored centered (taken out in the graph, any attention)
    centers_every_key: bool = False


@dataclass(frozen=True)
class TargetOptions:
    """The per-target flags: the static graphs' buffer, the SoCs qnn-htp compiles for and its
    prefill graph's tokens per call."""

    max_context: int | None = None  # static targets: tokens the fixed buffer holds
    socs: tuple[str, ...] = ("SM8650",)
    prefill_len: int | None = None  # qnn-htp: 0 for none (resolved by pipeline.within_limits)
    htp_precision: str = "quantized"  # qnn-htp: "quantized" (uint16 activations, 8-bit weights), "fp16" or
    # "auto" (the pipeline builds quantized, then float16 if that fails the gate)


@dataclass(frozen=True)
class LoweringInput:
    """What lowering reads. `model`/`kv` are the rewritten model the dynamic-shape target ships;
    static-shape targets build their own graph from the decomposed float model at `float_path`
    (`float_kv` names its cache) with the plan legalised for them."""

    model: ir.Model
    kv: KVGraph
    plan: QuantPlan
    float_path: Path
    float_kv: KVGraph
    stats: KVStats | None
    stage: Path  # the output folder being written
    source_dir: Path  # the input model's folder (configs next to it)
    calib_ids: np.ndarray | None  # calibration tokens, for targets that calibrate their own graph
    options: TargetOptions


@dataclass(frozen=True)
class Artifact:
    """A lowered target: its manifest entry and what the report says about it."""

    target: str
    io: TargetIO
    kv_storage: str  # how the cache is stored, in words
    facts: dict[str, Any] = field(default_factory=dict)  # sizes, coverage, checker results


@dataclass(frozen=True)
class VerifyInput:
    """What verification reads: the float model to compare with, held-out text, the gate."""

    float_decoder: Decoder
    eval_windows: np.ndarray  # [windows, window] held-out tokens
    eval_text: str
    prefill: int  # tokens fed at once before the one-token steps (dynamic-shape targets)
    quality_gate_pct: float
    folder: Path  # the output folder holding the artifacts
    progress: Callable[[str, int], Callable[[int], None]]
    stop_once_failed: bool = False  # a failure only decides a rebuild: stop once the gate cannot pass
    weights: WeightPool | None = None  # CPU sessions share the compile's one copy of the weights


class Target(Protocol):
    name: str
    runs_on: str  # where `verify` and `kvcompile run` execute it
    capabilities: Capabilities

    def check(self, kv: KVGraph, options: TargetOptions) -> None:
        """Refuse, before any float run, what this target cannot build (one line, naming it)."""

    def lower(self, lowering: LoweringInput) -> Artifact: ...

    def verify(self, artifact: Artifact, verifying: VerifyInput) -> TargetQuality: ...

    def open(self, folder: Path, io: TargetIO, soc: str | None = None) -> Decoder: ...


def legalize(kv: KVGraph, stats: KVStats | None, plan: QuantPlan,
             capabilities: Capabilities) -> tuple[QuantPlan, tuple[str, ...]]:
    """The compile's plan as `capabilities` can hold it, and a note per tensor it changed.

    A tensor whose bit width, dynamic scales, zero point or center the target cannot hold is re-planned
    with static symmetric per-channel scales at the target's widest bit width (calibrated:
    targets that cannot hold dynamic scales need calibration). Targets that center every key
    (static graphs) get centered per-channel keys; float slots are kept where the target holds
    them (a static graph: on every tensor or none)."""
    if stats is None:
        return plan, ()
    notes, tensors = [], []
    bits = max(capabilities.bits)
    for tensor in kv.tensors:
        chosen = plan.for_input(tensor.past_input)
        if chosen.bits is None and capabilities.float_tensors:
            tensors.append(chosen)
            continue
        holds_center = capabilities.centered or (capabilities.centers_every_key and tensor.kind == "key")
        uncentered = chosen.center is not None and not holds_center
        if (chosen.bits not in capabilities.bits or (chosen.dynamic and not capabilities.dynamic_scales)
                or (not chosen.symmetric and not capabilities.asymmetric) or uncentered):
            if uncentered:
                why = ("a center comes back exactly only through softmax: keys" if capabilities.centers_every_key
                       else "a center comes back exactly only through GroupQueryAttention")
            else:
                why = ("static-shape targets take static scales" if not capabilities.dynamic_shapes
                       else "the most this target's cache holds")
        elif (capabilities.centers_every_key and tensor.kind == "key" and chosen.center is None
              and chosen.granularity == "per-channel"):
            why = "the static graph takes the center out"
        else:
            why = None
        if why is not None:
            replanned = _per_channel(tensor, stats, bits, plan.clip, capabilities)
            notes.append(f"{tensor.label}: {chosen.name} -> {replanned.name} ({why})")
            chosen = dataclasses.replace(replanned, float_slots=chosen.float_slots,
                                         float_slot_bytes=chosen.float_slot_bytes)
        if chosen.float_slots is not None and not capabilities.float_slots:
            notes.append(f"{tensor.label}: without the float sink and recent slots (they take GroupQueryAttention)")
            chosen = dataclasses.replace(chosen, float_slots=None, float_slot_bytes=0)
        tensors.append(chosen)
    if not capabilities.dynamic_shapes and len({t.float_slots for t in tensors}) > 1:
        notes.append("without the float sink and recent slots (a static graph takes them on every cache tensor "
                     "or none, and the plan has them on some)")
        tensors = [dataclasses.replace(t, float_slots=None, float_slot_bytes=0) for t in tensors]
    return dataclasses.replace(plan, tensors=tuple(tensors)), tuple(notes)


def _per_channel(tensor: KVTensor, stats: KVStats, bits: int, clip: str, capabilities: Capabilities) -> TensorPlan:
    """Static symmetric per-channel scales; keys centered where the target centers every key."""
    if capabilities.centers_every_key and tensor.kind == "key":
        return centered_channel_plan(tensor, stats, bits, clip)
    return tensor_plan(tensor, stats, bits, "per-channel", clip)
