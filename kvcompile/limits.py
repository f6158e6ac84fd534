"""The model's context limits, from its graph and the config files exported next to it.

Read from the graph (`passes.model_limits`): learned position tables, rotary tables, sliding-window
caches. Read from the folder: `config.json` (transformers: `max_position_embeddings` /
`n_positions`, `sliding_window` where the layers use it) and `genai_config.json`
(onnxruntime-genai: `context_length`, `sliding_window.window_size`).

`max_context` is the smallest position limit found: every probe, calibration and verification
run stays within it, and the static targets' buffer may not exceed it. `window` is the shortest
attention window of any layer: a rewrite of attention is checked at a context longer than it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from kvcompile.kvgraph import KVGraph
from kvcompile.passes.model_limits import GraphLimit, graph_limits

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")


@dataclass(frozen=True)
class ModelLimits:
    max_context: int | None  # the most tokens the model can take (None: no limit found)
    window: int | None  # the shortest attention window of any layer (None: full attention)
    facts: tuple[str, ...] = ()  # each limit found and where, for the report

    def clamp(self, tokens: int) -> int:
        """`tokens`, or the model's limit if that is smaller."""
        return tokens if self.max_context is None else min(tokens, self.max_context)

    def summary(self) -> dict:
        return {"max_context": self.max_context, "sliding_window": self.window, "facts": list(self.facts)}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def config_limits(folder: Path) -> list[GraphLimit]:
    """Limits stated by config.json (transformers) and genai_config.json (onnxruntime-genai)."""
    limits: list[GraphLimit] = []
    config = _read_json(folder / "config.json")
    if config is not None:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        for key in POSITION_KEYS:
            if _int(text.get(key)):
                limits.append(GraphLimit("positions", text[key], f"config.json {key}"))
                break
        window = _int(text.get("sliding_window"))
        layer_types = text.get("layer_types")
        used = text.get("use_sliding_window", True) is not False and (
            not isinstance(layer_types, list) or "sliding_attention" in layer_types)
        if window and used:
            limits.append(GraphLimit("window", window, "config.json sliding_window"))
    genai = _read_json(folder / "genai_config.json")
    model = genai.get("model") if genai is not None and isinstance(genai.get("model"), dict) else None
    if model is not None:
        if _int(model.get("context_length")):
            limits.append(GraphLimit("positions", model["context_length"], "genai_config.json context_length"))
        sliding = (model.get("decoder") or {}).get("sliding_window") if isinstance(model.get("decoder"), dict) else None
        if isinstance(sliding, dict) and _int(sliding.get("window_size")):
            limits.append(GraphLimit("window", sliding["window_size"], "genai_config.json sliding_window.window_size"))
    return limits


def read_limits(model: ir.Model, kv: KVGraph, model_path: Path) -> ModelLimits:
    limits = graph_limits(model, kv) + config_limits(Path(model_path).parent)
    positions = [limit.value for limit in limits if limit.kind == "positions"]
    windows = [limit.value for limit in limits if limit.kind == "window"]
    facts = tuple(f"{'context' if limit.kind == 'positions' else 'attention window'} {limit.value}: {limit.source}"
                  for limit in limits)
    return ModelLimits(min(positions) if positions else None, min(windows) if windows else None, facts)
