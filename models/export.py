"""Export the trained fixture in the forms users actually have.

Forms (each written as `<dir>/model.onnx` with the tokenizer next to it):
  onnx-dynamo   torch.onnx dynamo export, opset 18, decomposed attention (MatMul/Softmax, RoPE as
                Cos/Sin/Neg/Concat), optimum-style KV names `past_key_values.N.key|value` ->
                `present.N.key|value`, layout [batch, kv_heads, seq, head_dim], float32.
  onnx-fp16     the same export of the model cast to float16 (the FP16-KV baseline).
  onnx-genai    the onnxruntime-genai model builder (`-p fp32 -e cpu`): GroupQueryAttention with
                packed QKV, rotary inside the op, plus its genai_config.json.
and the outlier-injected model (see outliers.py) in the onnx-dynamo form.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from models.exporters import FlatCacheDecoder, example_inputs, kv_names
from models.outliers import inject_outliers

MODELS_DIR = Path(__file__).resolve().parent
FIXTURE_DIR = MODELS_DIR / "fixture"
HF_DIR = FIXTURE_DIR / "hf"
OUTLIER_DIR = MODELS_DIR / "fixture-outliers"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPSET = 18


def export_dynamo(model: LlamaForCausalLM, out_dir: Path, dtype: torch.dtype = torch.float32,
                  external_data: bool = False, tokenizer: bool = True) -> Path:
    model = model.to(dtype).eval()
    wrapper = FlatCacheDecoder(model)
    num_layers = model.config.num_hidden_layers
    past_spec = {0: "batch", 2: "past_sequence_length"}
    dynamic_shapes = {
        "input_ids": {0: "batch", 1: "sequence_length"},
        "attention_mask": {0: "batch", 1: "total_sequence_length"},
        "position_ids": {0: "batch", 1: "sequence_length"},
        "past": tuple((past_spec, past_spec) for _ in range(num_layers)),
    }
    past_names, present_names = kv_names(num_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            example_inputs(model, dtype),
            path,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            opset_version=OPSET,
            external_data=external_data,
        )
    if tokenizer:
        copy_tokenizer(out_dir)
    return path


def export_genai(hf_dir: Path, out_dir: Path) -> Path:
    """Run the onnxruntime-genai model builder on an HF folder (fp32, CPU)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
             "-o", str(out_dir), "-p", "fp32", "-e", "cpu", "-c", cache_dir],
            check=True,
        )
    return out_dir / "model.onnx"


def copy_tokenizer(out_dir: Path, hf_dir: Path = HF_DIR) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(hf_dir / name, out_dir / name)


def load_fixture(hf_dir: Path = HF_DIR) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", nargs="*", default=["dynamo", "fp16", "genai", "outliers"])
    args = parser.parse_args()
    if "dynamo" in args.forms:
        print("exported", export_dynamo(load_fixture(), FIXTURE_DIR / "onnx-dynamo"))
    if "fp16" in args.forms:
        print("exported", export_dynamo(load_fixture(), FIXTURE_DIR / "onnx-fp16", torch.float16))
    if "genai" in args.forms:
        print("exported", export_genai(HF_DIR, FIXTURE_DIR / "onnx-genai"))
    if "outliers" in args.forms:
        model = inject_outliers(load_fixture())
        print("exported", export_dynamo(model, OUTLIER_DIR / "onnx-dynamo"))


if __name__ == "__main__":
    main()
