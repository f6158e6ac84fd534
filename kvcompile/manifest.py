"""The manifest (`OUTDIR/kvcompile.json`): everything a runner needs to drive an artifact.

One manifest per output folder, with one entry per target. For each KV cache tensor it gives
the graph input and output names, the logical (float) and stored shapes and dtypes, the packing
of 4-bit codes into bytes, the sequence axis, the quantization grid and its scales, so a runner
can allocate and feed the cache in its stored form without knowing how it was made.

The same `TargetIO` value also describes an *unmodified* float model (`float_model_io`), so the
runtimes drive float and compiled models with one code path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvcompile.errors import BadInputError
from kvcompile.kvgraph import GROUP_QUERY_ATTENTION, KVGraph, KVTensor

SCHEMA_VERSION = 1
PACKING_ORDER = "first-code-in-lowest-bits"
# Static-shape targets take an `attention_bias` input [1, 1, 1, max_context]: 0 where a slot
# holds a token (and for the new token, the last position), this value where it does not. Not
# the float minimum: a 16-bit quantized score tensor must still resolve the real scores.
MASKED_BIAS = -100.0


@dataclass(frozen=True)
class Packing:
    axis: int  # the (head_dim) axis along which codes share bytes
    codes_per_byte: int
    order: str = PACKING_ORDER


@dataclass(frozen=True)
class StoredParam:
    """What is stored next to a cache tensor's codes: per-token quantization parameters (dynamic
    scales), or a layer's float slots, listed with its key cache (GroupQueryAttention: the keys and
    values of the first `sinks` and the newest `recent` positions in float16, stacked along the
    heads axis, keys first, as the node takes them: centered keys minus their center)."""

    kind: str  # "scale" | "zero_point" | "sink" | "recent"
    input: str
    output: str
    stored_dtype: str  # float16 | uint8
    stored_shape: list[int | str]


@dataclass(frozen=True)
class KVIO:
    """One cache tensor as a runner sees it."""

    layer: int
    kind: str  # "key" | "value"
    input: str
    output: str
    logical_dtype: str  # float32 | float16
    logical_shape: list[int | str]  # symbolic dims as strings ("batch", "seq")
    stored_dtype: str  # uint8 (codes) | float32 | float16
    stored_shape: list[int | str]
    seq_axis: int
    head_dim_axis: int
    heads_axis: int | None  # None when the model keeps one cache tensor per head
    head: int | None = None
    bits: int | None = None  # None: stored in float
    granularity: str | None = None  # per-tensor | per-channel | per-token | per-group
    symmetric: bool | None = None
    group: int | None = None  # dynamic scales: head_dim channels per scale
    packing: Packing | None = None
    # Static scales in the logical layout's broadcast shape (e.g. [1, H, 1, D]) and zero point.
    scale: list | float | None = None
    scale_shape: list[int] | None = None
    zero_point: list | int | None = None
    params: list[StoredParam] = field(default_factory=list)
    # Centered storage (GroupQueryAttention): the codes hold x - center; a runner that reads the
    # cache back as floats adds it (shape as `scale_shape`). The compiled graph applies it itself.
    center: list | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def label(self) -> str:
        head = "" if self.head is None else f".h{self.head}"
        return f"L{self.layer}.{self.kind[0].upper()}{head}"


@dataclass(frozen=True)
class ModelInputIO:
    name: str
    role: str  # input_ids | attention_mask | position_ids | attention_bias
    dtype: str


@dataclass(frozen=True)
class QnnContext:
    """One SoC's compiled QNN context: the EPContext model and the provider options to load it."""

    context_model: str  # relative path of the EPContext model
    provider_options: dict[str, str]  # onnxruntime-qnn provider options (backend, SoC model, HTP arch)
    prefill_context_model: str | None = None  # the prefill graph's EPContext model (same context binary)


@dataclass(frozen=True)
class RunOptions:
    """How a runner drives the model beyond its I/O (written to the manifest only when set)."""

    # onnxruntime's GroupQueryAttention takes several tokens per step only for batch 1
    chunks_one_row_at_a_time: bool = False
    attention_sinks: int | None = None  # static targets: slots kept when the fixed buffer slides
    qnn_contexts: dict[str, QnnContext] = field(default_factory=dict)  # qnn-htp: one per SoC
    # qnn-htp: the ONNX graph its contexts were compiled from (QDQ, or float for --htp-precision fp16);
    # it runs on the CPU EP as the reference, and on x86 the simulator compiles it again
    compiled_from: str | None = None
    # [sinks, recent]: float slots next to a 4-bit GroupQueryAttention cache. With `seq` tokens
    # cached, a "sink_seq" dim is min(sinks, seq) and a "recent_seq" dim min(recent, max(0, seq - sinks)).
    float_slots: list[int] | None = None
    # static targets with a prefill graph: the tokens it takes per call, and (qnn-htp) its source graph
    prefill_len: int | None = None
    prefill_compiled_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.prefill_len is not None:
            out["prefill_len"] = self.prefill_len
        if self.prefill_compiled_from is not None:
            out["prefill_compiled_from"] = self.prefill_compiled_from
        if self.float_slots is not None:
            out["float_slots"] = list(self.float_slots)
        if self.attention_sinks is not None:
            out["attention_sinks"] = self.attention_sinks
        if self.chunks_one_row_at_a_time:
            out["chunks_one_row_at_a_time"] = True
        if self.compiled_from is not None:
            out["compiled_from"] = self.compiled_from
        if self.qnn_contexts:
            out["socs"] = {soc: {"context_model": c.context_model, **c.provider_options,
                                 **({"prefill_context_model": c.prefill_context_model}
                                    if c.prefill_context_model else {})}
                           for soc, c in self.qnn_contexts.items()}
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RunOptions:
        contexts = {}
        for soc, entry in data.get("socs", {}).items():
            entry = dict(entry)
            contexts[soc] = QnnContext(context_model=entry.pop("context_model"),
                                       prefill_context_model=entry.pop("prefill_context_model", None),
                                       provider_options=entry)
        return RunOptions(chunks_one_row_at_a_time=bool(data.get("chunks_one_row_at_a_time", False)),
                          attention_sinks=data.get("attention_sinks"), qnn_contexts=contexts,
                          compiled_from=data.get("compiled_from"), float_slots=data.get("float_slots"),
                          prefill_len=data.get("prefill_len"), prefill_compiled_from=data.get("prefill_compiled_from"))


@dataclass(frozen=True)
class TargetIO:
    """How to drive one model file: its inputs, logits output and KV cache tensors."""

    model: str  # path of the model file, relative to the manifest's folder
    inputs: list[ModelInputIO]
    logits: str
    kv: list[KVIO]
    max_context: int | None = None  # static-shape targets: the fixed cache length
    options: RunOptions = field(default_factory=RunOptions)

    def input_of(self, role: str) -> ModelInputIO | None:
        return next((i for i in self.inputs if i.role == role), None)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "inputs": [asdict(i) for i in self.inputs], "logits": self.logits,
                "kv": [asdict(k) for k in self.kv], "max_context": self.max_context,
                "options": self.options.to_dict()}


@dataclass(frozen=True)
class Manifest:
    kvcompile_version: str
    source: dict[str, str]  # {"path": ..., "sha256": ...}
    targets: dict[str, TargetIO]
    tokenizer: str | None = None  # relative path of tokenizer.json copied next to the manifest
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        data = {**asdict(self), "targets": {name: io.to_dict() for name, io in self.targets.items()}}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def write(self, folder: Path) -> Path:
        path = Path(folder) / "kvcompile.json"
        path.write_text(self.to_json())
        return path


# The stored form's names and shapes: the rewrite passes create graph I/O with them and the
# manifest describes it with them, so both read them from here.

def scale_name(cache_name: str) -> str:
    """Graph I/O name of the per-token scales stored next to a cache tensor."""
    return f"{cache_name}_scale"


def zero_point_name(cache_name: str) -> str:
    return f"{cache_name}_zero_point"


def slot_name(key_cache_name: str, part: str) -> str:
    """Graph I/O name of a layer's float slots (part "sink" or "recent"), named after its key cache:
    keys and values stacked along the heads axis, keys first."""
    return f"{key_cache_name}_kv_{part}"


def float_slots_name(cache_name: str) -> str:
    """Graph input of a static graph's float positions next to one cache tensor (the runner's
    sink and recent float16 copies)."""
    return f"{cache_name}_float_slots"


def new_float_name(present_name: str) -> str:
    """Graph output of a static graph: the new token's entries of one cache tensor in float16."""
    return f"{present_name}_float"


def slot_lengths(seq: int, sinks: int, recent: int) -> dict[str, int]:
    """The float slots' lengths with `seq` tokens cached (RunOptions.float_slots)."""
    return {"sink_seq": min(sinks, seq), "recent_seq": min(recent, max(0, seq - sinks))}


def param_shape(dims, axis: int, group: int) -> list:
    """Shape of per-group parameters: the head_dim axis holds one entry per group."""
    out = list(dims)
    out[axis] = out[axis] // group
    return out


def packed_dims(dims, axis: int, per_byte: int) -> list:
    """The stored shape: the head_dim axis shrinks by the number of codes per byte."""
    out = list(dims)
    out[axis] = out[axis] // per_byte
    return out


def float_kvio(tensor: KVTensor) -> KVIO:
    """The cache tensor as the unmodified model stores it (float, unpacked)."""
    shape = list(tensor.past_shape)
    return KVIO(
        layer=tensor.layer, kind=tensor.kind, input=tensor.past_input, output=tensor.present_output,
        logical_dtype=tensor.dtype, logical_shape=shape, stored_dtype=tensor.dtype, stored_shape=shape,
        seq_axis=tensor.axes.seq, head_dim_axis=tensor.axes.head_dim, heads_axis=tensor.axes.heads,
        head=tensor.head,
    )


def float_model_io(kv: KVGraph, model_path: str) -> TargetIO:
    """Describe an unmodified float model so the runtimes can drive it like a compiled one."""
    options = RunOptions(chunks_one_row_at_a_time=GROUP_QUERY_ATTENTION in kv.attention_forms)
    return TargetIO(
        model=model_path,
        inputs=[ModelInputIO(i.name, i.role, i.dtype) for i in kv.inputs],
        logits=kv.logits_output,
        kv=[float_kvio(t) for t in kv.tensors],
        options=options,
    )


def _kvio_from_dict(data: dict) -> KVIO:
    packing = data.get("packing")
    params = [StoredParam(**p) for p in data.get("params", [])]
    return KVIO(**{**data, "packing": Packing(**packing) if packing else None, "params": params})


def _target_from_dict(data: dict) -> TargetIO:
    return TargetIO(
        model=data["model"],
        inputs=[ModelInputIO(**i) for i in data["inputs"]],
        logits=data["logits"],
        kv=[_kvio_from_dict(k) for k in data["kv"]],
        max_context=data.get("max_context"),
        options=RunOptions.from_dict(data.get("options", {})),
    )


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / "kvcompile.json"
    if not path.is_file():
        raise BadInputError(f"{str(folder)!r} has no kvcompile.json; pass a kvcompile output folder")
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA_VERSION:
            raise BadInputError(
                f"{str(path)!r} has manifest schema {data.get('schema')}, this kvcompile reads "
                f"schema {SCHEMA_VERSION}; recompile the model"
            )
        return Manifest(
            kvcompile_version=data["kvcompile_version"],
            source=data["source"],
            targets={name: _target_from_dict(t) for name, t in data["targets"].items()},
            tokenizer=data.get("tokenizer"),
            schema=data["schema"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{str(path)!r} is not a valid kvcompile manifest ({exc})") from None
