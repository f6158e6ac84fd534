"""genai_config.json for the ort-cpu artifact, so onnxruntime-genai can run it unchanged.

If the input model came with a genai_config.json (the onnxruntime-genai builder writes one), it
is updated: the model file, the input/output names, and `past_present_share_buffer` off (the
cache is now uint8 codes, which onnxruntime-genai then reads and writes as separate past and
present buffers, as its own quantized builds do). Otherwise one is written from what the
analysis knows (layers, heads, head size, names) and the tokenizer's special tokens.

onnxruntime-genai drives caches named by one pattern per kind (`past_key_values.%d.key`) and
no other inputs; a compile whose cache does not fit that (per-head tensors, per-token scales
stored as extra inputs) gets no genai_config.json and the report says why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kvcompile.kvgraph import KVGraph
from kvcompile.manifest import TargetIO

DEFAULT_CONTEXT_LENGTH = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _pattern(names: list[str]) -> str | None:
    """"past_key_values.%d.key" when names[i] is that pattern with i filled in, else None."""
    if not names:
        return None
    match = re.search(r"\d+", names[0])
    if match is None:
        return None
    pattern = names[0][: match.start()] + "%d" + names[0][match.end() :]
    return pattern if all(pattern % i == name for i, name in enumerate(names)) else None


def unsupported_reason(kv: KVGraph, io: TargetIO) -> str | None:
    if any(k.head is not None for k in io.kv):
        return "the cache is one tensor per head"
    kinds = {p.kind for k in io.kv for p in k.params}
    if kinds & {"sink", "recent"}:
        return ("the float sink and recent slots are extra cache inputs, which onnxruntime-genai does not "
                "feed (--float-slots 0 0 leaves them out, if the gate passes without them)")
    if kinds:
        return "per-token scales are stored as extra cache inputs, which onnxruntime-genai does not feed"
    for kind in ("key", "value"):
        for side in ("input", "output"):
            names = [getattr(k, side) for k in io.kv if k.kind == kind]
            if _pattern(names) is None:
                return f"the {kind} cache {side}s are not named by one pattern with the layer number"
    return None


def _special_token_ids(model_dir: Path) -> dict[str, int]:
    """bos/eos/pad token ids from tokenizer_config.json + tokenizer.json next to the model."""
    config_path, tokenizer_path = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if not config_path.is_file() or not tokenizer_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    vocab = {t["content"]: t["id"] for t in json.loads(tokenizer_path.read_text()).get("added_tokens", [])}
    ids = {}
    for key in ("bos", "eos", "pad"):
        token = config.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            ids[f"{key}_token_id"] = vocab[token]
    return ids


def genai_config(kv: KVGraph, io: TargetIO, query_heads: int, vocab_size: int, source_dir: Path) -> dict[str, Any]:
    keys = [k for k in io.kv if k.kind == "key"]
    values = [k for k in io.kv if k.kind == "value"]
    inputs = {i.role: i.name for i in io.inputs}
    names = {
        "inputs": {**inputs,
                   "past_key_names": _pattern([k.input for k in keys]),
                   "past_value_names": _pattern([k.input for k in values])},
        "outputs": {"logits": io.logits,
                    "present_key_names": _pattern([k.output for k in keys]),
                    "present_value_names": _pattern([k.output for k in values])},
    }
    existing = source_dir / "genai_config.json"
    if existing.is_file():
        config = json.loads(existing.read_text())
        decoder = config["model"]["decoder"]
        decoder["filename"] = Path(io.model).name
        decoder["inputs"] = names["inputs"]
        decoder["outputs"] = names["outputs"]
    else:
        head_dim = kv.tensors[0].head_dim
        config = {
            "model": {
                "type": "llama",
                "context_length": DEFAULT_CONTEXT_LENGTH,
                "vocab_size": vocab_size,
                **_special_token_ids(source_dir),
                "decoder": {
                    "filename": Path(io.model).name,
                    "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "head_size": head_dim,
                    "hidden_size": query_heads * head_dim,
                    "num_attention_heads": query_heads,
                    "num_key_value_heads": kv.tensors[0].num_heads,
                    "num_hidden_layers": kv.num_layers,
                    **names,
                },
            },
            "search": {"do_sample": False, "max_length": DEFAULT_CONTEXT_LENGTH, "num_beams": 1,
                       "num_return_sequences": 1, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
        }
    config.setdefault("search", {})["past_present_share_buffer"] = not any(k.quantized for k in io.kv)
    return config


def write_genai_config(kv: KVGraph, io: TargetIO, query_heads: int, vocab_size: int, source_dir: Path,
                       folder: Path) -> str:
    """Write genai_config.json (and the tokenizer files) into `folder`; returns what was done."""
    reason = unsupported_reason(kv, io)
    if reason is not None:
        return f"no genai_config.json: {reason}"
    config = genai_config(kv, io, query_heads, vocab_size, source_dir)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=4, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            (folder / name).write_bytes((source_dir / name).read_bytes())
    origin = "updated from the input's" if (source_dir / "genai_config.json").is_file() else "written"
    return f"genai_config.json {origin}: runs in onnxruntime-genai"
