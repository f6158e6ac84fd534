"""Where the HTP departs from the CPU EP inside a compiled qnn-htp graph: the residual stream
after every layer, from one call of the same graph on both, fed the same inputs.

    python -m bench.qnn_layer_drift OUT [--graph prefill|model] [--soc SM8650] [--text heldout.txt]

OUT is a kvcompile output folder with a qnn-htp artifact. The graph its contexts were compiled
from (`qnn-htp/prefill.qdq.onnx` or `model.qdq.onnx`; `*.float.onnx` for fp16) gets every
value an RMSNorm reads (the residual stream before each layer's attention and MLP, and before the
final norm) as an extra graph output, and runs once on the CPU EP and once on the HTP simulator
(CPU fallback off), from an empty cache, on the first tokens of the bundled held-out text. Where a
norm reads a dequantized value, the uint16 codes before the DequantizeLinear are exposed instead
(an extra output there would split the node unit the HTP fuses) and dequantized here.

Prints one JSON line per residual value, in graph order: the worst row's cosine between the two
runs (rows are tokens), the relative error of the whole tensor, and the largest |value| on the
CPU run; then the logits' worst-row cosine. The modified graph is written into a temporary folder
inside OUT/qnn-htp (its weights hard-linked, not copied) and removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from kvcompile.manifest import read_manifest
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session, qnn_session
from kvcompile.tokens import bundled_text, load_token_ids


def residual_values(graph: onnx.GraphProto) -> list[tuple[str, str, float, int]]:
    """(value read by each RMSNorm, value to expose, scale, zero point): the exposed value is the
    codes before a DequantizeLinear (scale and zero point to decode them), else the value itself
    (scale 0)."""
    producers = {output: node for node in graph.node for output in node.output}
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if not i.external_data}
    found = []
    for node in graph.node:
        if node.op_type != "SimplifiedLayerNormalization":
            continue
        read = node.input[0]
        source = producers.get(read)
        if source is not None and source.op_type == "DequantizeLinear":
            found.append((read, source.input[0], float(constants[source.input[1]]), int(constants[source.input[2]])))
        else:
            found.append((read, read, 0.0, 0))
    return found


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--graph", choices=("prefill", "model"), default="prefill")
    parser.add_argument("--soc", default=None)
    parser.add_argument("--text", default="heldout.txt")
    args = parser.parse_args()
    io = read_manifest(args.out).targets["qnn-htp"]
    soc = args.soc or next(iter(io.options.qnn_contexts))
    source = args.out / (io.options.prefill_compiled_from if args.graph == "prefill" else io.options.compiled_from)
    model = onnx.load(source, load_external_data=False)
    values = residual_values(model.graph)
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=exposed) for _, exposed, _, _ in values if exposed not in outputs)
    tokenizer = args.out / "tokenizer.json"
    ids = load_token_ids(bundled_text(args.text), tokenizer if tokenizer.exists() else None, None)
    new_tokens = io.options.prefill_len if args.graph == "prefill" else 1
    with tempfile.TemporaryDirectory(dir=source.parent, prefix=".layer-drift-") as scratch:
        for data in source.parent.glob(source.name + ".data"):
            os.link(data, Path(scratch) / data.name)
        exposed_path = Path(scratch) / source.name
        onnx.save(model, exposed_path)
        del model
        cpu = cpu_session(exposed_path)
        decoder = Decoder(cpu, io)
        wanted = {i.name for i in cpu.get_inputs()}
        feeds = {k: v for k, v in decoder.feeds(decoder.new_cache(1), ids[None, :new_tokens]).items() if k in wanted}
        names = [o.name for o in cpu.get_outputs()]
        on_cpu = dict(zip(names, cpu.run(None, feeds)))
        del cpu, decoder
        started = time.perf_counter()
        htp = qnn_session(exposed_path, soc)
        compiled = time.perf_counter() - started
        on_htp = dict(zip(names, htp.run(None, feeds)))
        del htp
    for index, (read, exposed, scale, zero_point) in enumerate(values):
        a, b = (run[exposed].astype(np.float64) for run in (on_cpu, on_htp))
        if scale:
            a, b = (a - zero_point) * scale, (b - zero_point) * scale
        cosines = row_cosines(a, b)
        print(json.dumps({"norm": index, "value": read, "stored": "uint16" if scale else "float",
                          "worst_row": int(cosines.argmin()), "row_cosine_min": round(float(cosines.min()), 6),
                          "relative_error": round(float(np.linalg.norm(a - b) / np.linalg.norm(a)), 6),
                          "max_abs": round(float(np.abs(a).max()), 1)}), flush=True)
    logits = row_cosines(on_cpu[io.logits], on_htp[io.logits])
    print(json.dumps({"logits_row_cosine_min": round(float(logits.min()), 6), "worst_row": int(logits.argmin()),
                      "rows": int(logits.size), "graph": args.graph, "soc": soc,
                      "htp_compile_seconds": round(compiled, 1)}), flush=True)


if __name__ == "__main__":
    main()
