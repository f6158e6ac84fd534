"""Compile a model with kvcompile's Python API, then generate from the result.

    python examples/compile_and_run.py models/fixture/onnx-dynamo/model.onnx build/example
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvcompile.manifest import read_manifest
from kvcompile.pipeline import CompileOptions, compile_model
from kvcompile.runtimes.generate import Generation
from kvcompile.runtimes.targets import load_decoder
from kvcompile.tokens import load_tokenizer


def main(model: Path, out: Path) -> None:
    report = compile_model(CompileOptions(model=model, out_dir=out, kv_bits=4)).report
    print(f"KV cache {report.memory.ratio_vs_fp16:.2f}x smaller than float16, "
          f"perplexity {report.quality.gate.ppl_delta_pct:+.2f}%")
    manifest = read_manifest(out)
    tokenizer = load_tokenizer(out / manifest.tokenizer)
    prompt = tokenizer.encode("The GNU General Public License").ids
    generation = Generation(load_decoder(out, manifest), prompt)
    print(tokenizer.decode(prompt + list(generation.tokens(40))))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
