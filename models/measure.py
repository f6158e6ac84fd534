"""Print each fixture's KV I/O and float perplexity through the decode path (for models/README.md).

Perplexity is measured with kvcompile's own evaluator (`kvcompile.runtimes.perplexity`): 48
held-out windows of 256 tokens, a 32-token prefill, then one token per step, scoring the tokens
after each decode step. The untrained model (same architecture, seed 0, no training) is exported
to a temporary folder and measured the same way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import decode_path_scores
from kvcompile.runtimes.session import cpu_session
from kvcompile.tokens import load_token_ids, make_windows
from models.export import FIXTURE_DIR, OUTLIER_DIR, export_dynamo
from models.train import DATA_DIR, HF_DIR, fixture_config

WINDOWS, WINDOW, PREFILL = 48, 256, 32


def decode_path_ppl(path: Path, windows) -> float:
    kv = find_kv_cache(load_model(path))
    decoder = Decoder(cpu_session(path), float_model_io(kv, str(path)))
    return decode_path_scores([decoder], windows, PREFILL)[0].ppl


def describe(path: Path) -> str:
    kv = find_kv_cache(load_model(path))
    first = kv.tensors[0]
    return (f"{len(kv.tensors)} tensors `{kv.tensors[0].past_input}` ... -> `{kv.tensors[0].present_output}` ...,"
            f" {first.dtype}, shape {list(first.past_shape)}, attention {first.attention}")


def main() -> None:
    ids = load_token_ids(DATA_DIR / "heldout.txt", HF_DIR / "tokenizer.json")
    windows = make_windows(ids, WINDOW, WINDOWS, "held-out")
    paths = {
        "fixture/onnx-dynamo": FIXTURE_DIR / "onnx-dynamo" / "model.onnx",
        "fixture/onnx-fp16": FIXTURE_DIR / "onnx-fp16" / "model.onnx",
        "fixture/onnx-genai": FIXTURE_DIR / "onnx-genai" / "model.onnx",
        "fixture-outliers/onnx-dynamo": OUTLIER_DIR / "onnx-dynamo" / "model.onnx",
    }
    print(f"decode-path perplexity, {WINDOWS} x {WINDOW} held-out tokens, prefill {PREFILL}:")
    for name, path in paths.items():
        print(f"- {name}: ppl {decode_path_ppl(path, windows):.3f}; {describe(path)}")
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(fixture_config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_dynamo(untrained, Path(tmp) / "untrained")
        print(f"- untrained (seed 0, same architecture): ppl {decode_path_ppl(path, windows):.1f}")


if __name__ == "__main__":
    main()
