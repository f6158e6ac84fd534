"""The exporters users turn decoders into ONNX with, applied to any transformers causal LM.

Every form keeps the KV cache as graph I/O: past inputs `past_key_values.N.key|value`, present
outputs `present.N.key|value` (the names optimum and onnxruntime-genai use), plus `input_ids`,
`attention_mask`, `position_ids` (torch exports) and `logits`.

| form            | how                                                                              |
| --------------- | -------------------------------------------------------------------------------- |
| `dynamo`        | `torch.onnx.export(dynamo=True, opset_version=18)`: decomposed attention          |
| `dynamo-fp16`   | the same, of the model cast to float16                                           |
| `dynamo-opset23`| `torch.onnx.export(dynamo=True, opset_version=23)`: ONNX `Attention`, `RotaryEmbedding`, `RMSNormalization` where the exporter uses them |
| `torchscript`   | `torch.onnx.export(dynamo=False)` (the TorchScript exporter), opset 18            |
| `genai`         | `python -m onnxruntime_genai.models.builder -p fp32 -e cpu`: GroupQueryAttention |
| `genai-int4`    | the same with `-p int4`: MatMulNBits 4-bit weights                               |

Each function returns the `model.onnx` path it wrote; exporters raise (with their own message)
on families they cannot handle, and `export_form` turns that into an `ExportRefused`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

FORMS = ("dynamo", "dynamo-fp16", "dynamo-opset23", "torchscript", "genai", "genai-int4")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ExportRefused(Exception):
    """An exporter does not accept this model; the message says which and why (first line)."""


class FlatCacheDecoder(torch.nn.Module):
    """Wraps an HF causal LM so the KV cache enters and leaves as flat tensors (graph I/O).

    The cache layers are the model's own (`DynamicCache(config=...)`): full-attention layers grow,
    sliding-window layers keep their last `sliding_window - 1` entries, as the model runs them.
    `full_cache`: every layer keeps every token (`DynamicCache()`, as older transformers and
    exporters did); a sliding window then lives in the attention mask only."""

    def __init__(self, model: PreTrainedModel, full_cache: bool = False):
        super().__init__()
        self.model = model
        self.full_cache = full_cache

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = DynamicCache() if self.full_cache else DynamicCache(config=self.model.config)
        for layer, (key, value) in enumerate(past):
            cache.update(key, value, layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


def cache_shape(model: PreTrainedModel, past_len: int, batch: int = 1) -> tuple[int, int, int, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if getattr(cfg, "multi_query", False):  # Falcon-style multi-query attention
        kv_heads = 1
    return batch, kv_heads, past_len, head_dim


def example_inputs(model: PreTrainedModel, dtype: torch.dtype, past_len: int = 5, new_len: int = 3):
    shape = cache_shape(model, past_len)
    past = tuple(
        (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
        for _ in range(model.config.num_hidden_layers)
    )
    input_ids = torch.zeros((1, new_len), dtype=torch.long)
    attention_mask = torch.ones((1, past_len + new_len), dtype=torch.long)
    position_ids = torch.arange(past_len, past_len + new_len)[None]
    return input_ids, attention_mask, position_ids, past


def past_length_names(model: PreTrainedModel) -> list[str]:
    """The symbolic name of each layer's past length. Hybrid models (Gemma 2/3: sliding-window
    layers beside full-attention ones) hold caches of different lengths, which must not share a
    dim name (onnxruntime binds one size per name)."""
    types = getattr(model.config, "layer_types", None) or []
    hybrid = len(set(types)) > 1
    return ["past_window_length" if hybrid and kind == "sliding_attention" else "past_sequence_length"
            for kind in (types if hybrid else [None] * model.config.num_hidden_layers)]


def _io_names(model: PreTrainedModel) -> tuple[list[str], list[str]]:
    past, present = kv_names(model.config.num_hidden_layers)
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_dynamo(model: PreTrainedModel, out_dir: Path, dtype: torch.dtype = torch.float32,
                  opset: int = 18, external_data: bool = False, full_cache: bool = False) -> Path:
    """torch.onnx's dynamo exporter; string dim names (no Dim arithmetic), nested past spec."""
    model = model.to(dtype).eval()
    dynamic_shapes = {
        "input_ids": {0: "batch", 1: "sequence_length"},
        "attention_mask": {0: "batch", 1: "total_sequence_length"},
        "position_ids": {0: "batch", 1: "sequence_length"},
        "past": tuple(({0: "batch", 2: name}, {0: "batch", 2: name}) for name in past_length_names(model)),
    }
    input_names, output_names = _io_names(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(FlatCacheDecoder(model, full_cache).eval(), example_inputs(model, dtype), path, dynamo=True,
                          dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                          opset_version=opset, external_data=external_data)
    return path


def export_torchscript(model: PreTrainedModel, out_dir: Path, opset: int = 18,
                       external_data: bool = False) -> Path:
    """torch.onnx's TorchScript exporter (`dynamo=False`), as older export scripts use it."""
    model = model.float().eval()
    input_names, output_names = _io_names(model)
    past, present = kv_names(model.config.num_hidden_layers)
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence_length"},
                    "attention_mask": {0: "batch", 1: "total_sequence_length"},
                    "position_ids": {0: "batch", 1: "sequence_length"},
                    "logits": {0: "batch", 1: "sequence_length"}}
    lengths = [length for length in past_length_names(model) for _ in range(2)]
    dynamic_axes.update({name: {0: "batch", 2: length} for name, length in zip(past, lengths)})
    grown = {"past_sequence_length": "total_sequence_length", "past_window_length": "present_window_length"}
    dynamic_axes.update({name: {0: "batch", 2: grown[length]} for name, length in zip(present, lengths)})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(FlatCacheDecoder(model).eval(), example_inputs(model, torch.float32), str(path), dynamo=False,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=opset, external_data=external_data)
    return path


def export_genai(hf_dir: Path, out_dir: Path, precision: str = "fp32") -> Path:
    """The onnxruntime-genai model builder on an HF folder (CPU), `precision` fp32 or int4."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        done = subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
             "-p", precision, "-e", "cpu", "-c", cache_dir],
            capture_output=True, text=True)
    if done.returncode != 0 or not (out_dir / "model.onnx").is_file():
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "not supported" in line.lower()]
        reason = (errors or lines or [f"builder exited {done.returncode}"])[-1][:300]
        raise ExportRefused(reason.replace(str(hf_dir), hf_dir.name))
    return out_dir / "model.onnx"


def export_form(form: str, model_loader, hf_dir: Path, out_dir: Path, external_data: bool = False) -> Path:
    """Write `form` of the model to `out_dir/model.onnx` (tokenizer files copied next to it).

    `model_loader()` returns a fresh float32 HF model (exports may cast it). A failed export
    leaves no `out_dir` behind and raises ExportRefused with the exporter's last message line."""
    if form not in FORMS:
        raise ValueError(f"unknown export form {form!r}; choose from {FORMS}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if form == "dynamo":
                path = export_dynamo(model_loader(), out_dir, external_data=external_data)
            elif form == "dynamo-fp16":
                path = export_dynamo(model_loader(), out_dir, torch.float16, external_data=external_data)
            elif form == "dynamo-opset23":
                path = export_dynamo(model_loader(), out_dir, opset=23, external_data=external_data)
            elif form == "torchscript":
                path = export_torchscript(model_loader(), out_dir, external_data=external_data)
            else:
                path = export_genai(hf_dir, out_dir, "int4" if form == "genai-int4" else "fp32")
    except ExportRefused:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    except Exception as exc:  # exporters fail with many error types; keep their first line
        shutil.rmtree(out_dir, ignore_errors=True)
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [""])[0])  # no terminal colours
        raise ExportRefused(f"{type(exc).__name__}: {first[:300]}") from exc
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file() and not (out_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / name)
    return path
