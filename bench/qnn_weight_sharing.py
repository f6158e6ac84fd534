"""What weight sharing saves in a compiled qnn-htp folder: context binary bytes for each graph
compiled alone, for both compiled apart, and for both in the folder's shared context.

    python -m bench.qnn_weight_sharing OUT [--soc SM8650]

Each graph the contexts were compiled from (`qnn-htp/model.qdq.onnx` and `prefill.qdq.onnx`, or
`*.float.onnx` for --htp-precision fp16) is compiled again for the SoC, alone, into a temporary
folder, exactly as kvcompile compiles a lone graph; the shared figure is the folder's own context
binary. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kvcompile.manifest import read_manifest
from kvcompile.runtimes.session import qnn_session
from kvcompile.targets.qnn_htp import compile_source, compiled_precision


def binary_bytes(folder: Path, stem: str) -> int:
    return sum(b.stat().st_size for b in folder.glob(f"{stem}*.bin"))


def sharing_sizes(out: Path, soc: str) -> dict:
    io = read_manifest(out).targets["qnn-htp"]
    context = io.options.qnn_contexts[soc]
    if context.prefill_context_model is None:
        raise SystemExit(f"{out} has no prefill graph (compiled with --prefill-len 0): nothing is shared")
    shared_folder = (out / context.context_model).parent
    alone = {}
    with tempfile.TemporaryDirectory() as tmp:
        for graph, source in (("decode", io.options.compiled_from), ("prefill", io.options.prefill_compiled_from)):
            started = time.perf_counter()
            qnn_session(compile_source(out / source), soc, context_file=Path(tmp) / f"{graph}_ctx.onnx")
            alone[graph] = {"context_binary_bytes": binary_bytes(Path(tmp), f"{graph}_ctx"),
                            "aot_seconds": round(time.perf_counter() - started, 2)}
    apart = sum(g["context_binary_bytes"] for g in alone.values())
    shared = binary_bytes(shared_folder, "")
    return {"soc": soc, "precision": compiled_precision(io), "prefill_len": io.options.prefill_len, "alone": alone, "both_apart_bytes": apart,
            "both_shared_bytes": shared, "shared_vs_apart": round(shared / apart, 4),
            "shared_vs_decode_alone": round(shared / alone["decode"]["context_binary_bytes"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a kvcompile output folder with a qnn-htp artifact")
    parser.add_argument("--soc", default=None, help="which compiled SoC [default: the first]")
    args = parser.parse_args()
    soc = args.soc or next(iter(read_manifest(args.out).targets["qnn-htp"].options.qnn_contexts))
    print(json.dumps(sharing_sizes(args.out, soc), indent=2))


if __name__ == "__main__":
    main()
