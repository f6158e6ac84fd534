"""SmolLM2's static (nnapi) decode graph with each way of storing its cache, measured as the
compile verifies a static target.

    python -m bench.static_storage [--only plain,centered,slots]

Builds the nnapi graph of SmolLM2 (`models/real.py`: dynamo form) at a 1,024-token buffer for
each storage, calibrated as a compile is (8 x 1,024 tokens of the bundled calib.txt), and scores
it on the CPU EP through the decode path on the windows a static target's verification reads
(`targets.static.long_verification_windows`: 2 x 1,024 held-out tokens, prefill 8, one token
per call) against the float export:
  plain     symmetric per-channel keys and values (the static graphs before centering and slots)
  centered  keys centered on their calibrated midpoint, symmetric wmse; values symmetric
  slots     centered, plus float slots: the first 4 and newest 128 positions in float16
About 20 minutes per storage on two cores (the static graph takes one token per call).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model, save_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.legalize_nnapi import legalize_nnapi_passes
from kvcompile.passes.manager import run_passes
from kvcompile.plan import centered_channel_plan, make_plan, with_float_slots
from kvcompile.runtimes.calibrate import collect_kv_stats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.verify import decode_quality
from kvcompile.targets.nnapi import OPSET
from kvcompile.targets.static import VERIFY_PREFILL, long_verification_windows, static_graph, static_target_io
from kvcompile.tokens import bundled_text, load_token_ids
from models.real import build_form

CONTEXT = 1024
STORAGES = ("plain", "centered", "slots")


def plans(kv, stats):
    plain = make_plan(kv, stats, 4, "per-channel")
    centered = dataclasses.replace(plain, tensors=tuple(
        centered_channel_plan(t, stats, 4, "wmse") if t.kind == "key" else plain.for_input(t.past_input)
        for t in kv.tensors))
    return {"plain": plain, "centered": centered,
            "slots": with_float_slots(centered, kv, {t.layer for t in kv.tensors}, 4, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STORAGES))
    chosen = parser.parse_args().only.split(",")
    model_path = build_form("dynamo")
    tokenizer = model_path.parent / "tokenizer.json"
    kv = find_kv_cache(load_model(model_path))
    float_decoder = Decoder(cpu_session(model_path), float_model_io(kv, str(model_path)))
    calib = load_token_ids(bundled_text("calib.txt"), tokenizer)[: 8 * CONTEXT].reshape(8, CONTEXT)
    heldout = load_token_ids(bundled_text("heldout.txt"), tokenizer)[: 12 * CONTEXT].reshape(12, CONTEXT)
    windows = long_verification_windows(heldout, CONTEXT)
    candidates = plans(kv, collect_kv_stats(float_decoder, calib))
    print("| static graph storage | perplexity | delta | top-1 | KL |\n| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="static-storage-") as work:
        for name in chosen:
            started = time.perf_counter()
            model, used = static_graph(model_path, kv, candidates[name], CONTEXT, style="arithmetic",
                                       fold_per_channel=False, fuse_rmsnorm=False, opset=OPSET)
            run_passes(model, *legalize_nnapi_passes())
            path = Path(work) / f"{name}.onnx"
            save_model(model, path)
            decoder = Decoder(cpu_session(path), static_target_io(kv, used, model, path.name, CONTEXT))
            q = decode_quality(float_decoder, decoder, windows, prefill=VERIFY_PREFILL, batch=1, gate_pct=2.0,
                               text="bundled heldout.txt", ran_on="onnxruntime CPU EP")
            print(f"| {name} | {q.quantized_ppl:.3f} | {q.ppl_delta_pct:+.2f}% | {q.top1_agreement:.1%} | "
                  f"{q.mean_kl:.4f} |  <!-- float {q.float_ppl:.3f}, {q.eval_tokens} predictions, "
                  f"{time.perf_counter() - started:.0f} s -->", flush=True)
            os.remove(path)


if __name__ == "__main__":
    main()
