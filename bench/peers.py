"""The peers kvcompile is measured against, on the same model, text and decode-path metric.

- onnxruntime-genai: the model builder's own 4-bit KV cache (`kv_cache_quant_scheme=
  int4_per_channel`), calibrated with its `kv_cache_calibration` tool on the same calibration
  text, scored by kvcompile's decode-path evaluator against the builder's float model.
- HF transformers `QuantizedCache` (optimum-quanto backend, int4, its defaults: per-group of
  64 asymmetric scales), with residual_length 128 (the default: the newest up to 128 tokens
  stay float) and 1, scored in PyTorch the same way against the float DynamicCache.

Every peer reports the same figures as kvcompile's verifier: perplexity of the tokens after
each decode step (48 x 256 held-out tokens, 32-token prefill), its delta, top-1 agreement and
mean KL against its own float model.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from kvcompile.manifest import Packing, float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import DecodeScore, decode_path_scores, log_softmax
from kvcompile.runtimes.session import cpu_session

REPO = Path(__file__).resolve().parents[1]
HF_DIR = REPO / "models" / "fixture" / "hf"
GENAI_FLOAT = REPO / "models" / "fixture" / "onnx-genai" / "model.onnx"


def build_genai_int4(work: Path, calib_text: Path, hf_dir: Path = HF_DIR, genai_float: Path = GENAI_FLOAT) -> Path:
    """Calibrate with onnxruntime-genai's tool and rebuild with its int4 per-channel KV cache."""
    scales = work / "kv_scales.json"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.quantization.kv_cache_calibration",
                    "--model", str(genai_float.parent), "--tokenizer", str(hf_dir), "--out", str(scales),
                    "--quant-type", "int4_per_channel", "--corpus-file", str(calib_text)],
                   check=True, capture_output=True)
    out = work / "genai-int4"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(work / "cache"), "--extra_options",
                    "kv_cache_quant_scheme=int4_per_channel", f"kv_cache_scale_file={scales}"],
                   check=True, capture_output=True)
    return out / "model.onnx"


def genai_int4_scores(work: Path, calib_text: Path, windows: np.ndarray, prefill: int, hf_dir: Path = HF_DIR,
                      genai_float: Path = GENAI_FLOAT) -> tuple[DecodeScore, DecodeScore]:
    """(float builder model, int4 builder model) decode-path scores."""
    kv = find_kv_cache(load_model(genai_float))
    float_io = float_model_io(kv, str(genai_float))
    int4_path = build_genai_int4(work, calib_text, hf_dir, genai_float)
    # The builder's int4 cache: uint8 [batch, kv_heads, seq, head_dim / 2], two codes per byte.
    int4_io = dataclasses.replace(float_io, model=str(int4_path), kv=[
        dataclasses.replace(k, stored_dtype="uint8", stored_shape=["batch", k.logical_shape[1], "seq", k.logical_shape[3] // 2],
                            bits=4, packing=Packing(axis=3, codes_per_byte=2))
        for k in float_io.kv])
    decoders = [Decoder(cpu_session(genai_float), float_io), Decoder(cpu_session(int4_path), int4_io)]
    float_score, int4_score = decode_path_scores(decoders, windows, prefill)
    return float_score, int4_score


def hf_quantized_cache_scores(windows: np.ndarray, prefill: int, residual_length: int,
                              batch: int = 16, hf_dir: Path = HF_DIR) -> tuple[DecodeScore, DecodeScore]:
    """(float DynamicCache, QuantizedCache int4) scores, teacher-forced through each cache."""
    from transformers import DynamicCache, QuantizedCache

    from models.export import load_fixture

    model = load_fixture(hf_dir)
    totals = {"float": [0.0, 0], "quant": [0.0, 0]}
    agree, kl = 0, 0.0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            tokens = torch.from_numpy(windows[start : start + batch])
            caches = {
                "float": DynamicCache(config=model.config),
                "quant": QuantizedCache(backend="quanto", config=model.config, nbits=4, residual_length=residual_length),
            }
            for name in caches:
                caches[name] = model(input_ids=tokens[:, :prefill], past_key_values=caches[name], use_cache=True).past_key_values
            for t in range(prefill, tokens.shape[1] - 1):
                log_probs = {}
                for name in caches:
                    out = model(input_ids=tokens[:, t : t + 1], past_key_values=caches[name], use_cache=True)
                    caches[name] = out.past_key_values
                    log_probs[name] = log_softmax(out.logits[:, -1].float().numpy())
                    target = tokens[:, t + 1].numpy()
                    totals[name][0] -= float(log_probs[name][np.arange(len(target)), target].sum())
                    totals[name][1] += len(target)
                agree += int((log_probs["float"].argmax(-1) == log_probs["quant"].argmax(-1)).sum())
                kl += float((np.exp(log_probs["float"]) * (log_probs["float"] - log_probs["quant"])).sum())
    scores = []
    for name in ("float", "quant"):
        nll = totals[name][0] / totals[name][1]
        reference = name == "float"
        scores.append(DecodeScore(float(np.exp(nll)), nll, totals[name][1],
                                  None if reference else agree / totals[name][1],
                                  None if reference else kl / totals[name][1]))
    return scores[0], scores[1]
