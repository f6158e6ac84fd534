"""KVGraph: what the analysis found out about a model's KV cache (a plain value, no logic).

It is produced by `kvcompile.passes.find_kv_cache` and read by the planner, the rewrite passes,
calibration and the manifest writer, so it lives here where all of them may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

KVKind = Literal["key", "value"]

# Attention forms the analysis recognises.
DECOMPOSED = "decomposed"  # MatMul -> Softmax -> MatMul, cache grown by a Concat
GROUP_QUERY_ATTENTION = "com.microsoft.GroupQueryAttention"
MULTI_HEAD_ATTENTION = "com.microsoft.MultiHeadAttention"
ONNX_ATTENTION = "Attention"


@dataclass(frozen=True)
class KVAxes:
    """Which axis of a cache tensor is which. `heads` is None when each head has its own tensor."""

    batch: int
    heads: int | None
    seq: int
    head_dim: int

    @property
    def keys_transposed(self) -> bool:
        """True for caches stored as [..., head_dim, seq] (seq after head_dim)."""
        return self.seq > self.head_dim


@dataclass(frozen=True)
class KVTensor:
    """One cache tensor: a past graph input and the present graph output it becomes."""

    layer: int
    kind: KVKind
    past_input: str
    present_output: str
    axes: KVAxes
    num_heads: int
    head_dim: int
    dtype: str  # "float32" | "float16"
    attention: str  # one of the attention forms above
    # Shape of the past input with the batch and sequence dims named "batch" and "seq".
    past_shape: tuple[int | str, ...]
    head: int | None = None  # head index when the model keeps one cache tensor per head
    # Decomposed attention: the Concat that appends the new entries, and the value it appends.
    concat_node: str | None = None
    new_entries: str | None = None
    # Producer chain from the appended entries back to the K/V projection (through RoPE).
    producer_chain: tuple[str, ...] = ()
    projection: str | None = None
    rope: bool = False
    # Decomposed attention: the MatMul that reads the cache (Q.K^T for keys, P.V for values)
    # and which of its inputs carries the cache.
    reader: str | None = None
    reader_operand: int | None = None
    # A sliding-window cache: the present output keeps only the last N entries (window N + 1).
    kept_entries: int | None = None
    # GroupQueryAttention keys: a per-channel center subtracted from the keys the op appends
    # comes out exactly through its softmax (find_kv_cache.key_centering_error says when).
    centerable: bool = False

    @property
    def label(self) -> str:
        head = "" if self.head is None else f".h{self.head}"
        return f"L{self.layer}.{self.kind[0].upper()}{head}"

    @property
    def elements_per_token(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def rank(self) -> int:
        return 3 if self.axes.heads is None else 4


@dataclass(frozen=True)
class ModelInput:
    """A non-cache graph input and the role the decode loop gives it."""

    name: str
    role: str  # "input_ids" | "attention_mask" | "position_ids"
    dtype: str


@dataclass(frozen=True)
class KVGraph:
    tensors: tuple[KVTensor, ...]
    inputs: tuple[ModelInput, ...]
    logits_output: str
    source: str = "structural"  # or "kv-map"
    notes: tuple[str, ...] = field(default=())

    @property
    def num_layers(self) -> int:
        return len({t.layer for t in self.tensors})

    @property
    def attention_forms(self) -> tuple[str, ...]:
        return tuple(sorted({t.attention for t in self.tensors}))

    def fp16_bytes_per_token(self) -> int:
        """Bytes one token adds to the cache when K and V are stored in float16."""
        return sum(2 * t.elements_per_token for t in self.tensors)

    def by_label(self) -> dict[str, KVTensor]:
        return {t.label: t for t in self.tensors}
