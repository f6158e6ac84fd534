#!/usr/bin/env python3
"""Run a kvcompile output folder with onnxruntime alone: the file to copy to a device.

Depends only on onnxruntime, numpy and tokenizers (no kvcompile import). It reads
`kvcompile.json`, keeps the KV cache in the form the manifest says it is stored (4-bit codes
packed in uint8, per-token scales where present) and feeds it back step by step:

- dynamic-shape targets (ort-cpu): the cache grows; each step's present outputs are the next
  step's past inputs;
- static-shape targets (nnapi's .ort): fixed buffers of max_context - 1 slots, an attention_bias
  input (0 where a slot holds a token, -100 elsewhere), the step's new entries written into the
  next slot; when full, the oldest slots are reused except the first `attention_sinks` tokens.
  With `float_slots` [S, R] in the options, the last S + R slots are float16 copies (each
  tensor's `float_slots` input): the first S tokens stay there, later tokens enter a ring of the
  R newest and their codes (returned when they were fed) go into the coded slots when they
  leave it.

    python ort_runner.py OUTDIR --prompt "Once upon a time" --max-new-tokens 64
    python ort_runner.py OUTDIR --target nnapi --providers NnapiExecutionProvider,CPUExecutionProvider ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "int8": np.int8,
          "int64": np.int64, "int32": np.int32}
MASKED_BIAS = -100.0  # the attention_bias of an empty slot (kvcompile.manifest.MASKED_BIAS)


def concrete(shape: list, batch: int, seq: int) -> tuple[int, ...]:
    """Sizes for a stored shape; float slots ("sink_seq", "recent_seq") start empty like the cache."""
    return tuple(batch if d == "batch" else seq if d in ("seq", "sink_seq", "recent_seq") else d for d in shape)


def stored_tensors(kv: dict) -> list[dict]:
    """The cache tensor and any per-token parameters stored next to it (not a static graph's float
    slots: `Cache` keeps those)."""
    return [{"input": kv["input"], "output": kv["output"], "dtype": kv["stored_dtype"], "shape": kv["stored_shape"],
             "seq_axis": kv["seq_axis"], "zero_point": kv.get("zero_point"), "bits": kv.get("bits"),
             "per_byte": (kv.get("packing") or {}).get("codes_per_byte", 1)}] + \
        [{"input": p["input"], "output": p["output"], "dtype": p["stored_dtype"], "shape": p["stored_shape"],
          "seq_axis": kv["seq_axis"], "zero_point": None, "bits": None, "per_byte": 1} for p in kv.get("params", [])
         if p["kind"] != "float_slots"]


def float_slot_tensors(kv: dict) -> list[dict]:
    return [{"input": p["input"], "output": p["output"], "dtype": p["stored_dtype"], "shape": p["stored_shape"],
             "seq_axis": kv["seq_axis"], "codes": kv["input"]} for p in kv.get("params", [])
            if p["kind"] == "float_slots"]


def empty_code(tensor: dict) -> int:
    """The byte an empty slot holds: codes that read back as 0."""
    if tensor["bits"] is None or tensor["dtype"] != "uint8":
        return 0
    zero = int(np.asarray(tensor["zero_point"]).reshape(-1)[0])
    return sum(zero << (tensor["bits"] * i) for i in range(tensor["per_byte"]))


def put(buffer: np.ndarray, axis: int, index: int, entry: np.ndarray) -> None:
    where = [slice(None)] * buffer.ndim
    where[axis] = index
    buffer[tuple(where)] = entry


class Cache:
    def __init__(self, io: dict):
        self.tensors = [t for kv in io["kv"] for t in stored_tensors(kv)]
        self.float_tensors = [t for kv in io["kv"] for t in float_slot_tensors(kv)]
        self.max_context = io.get("max_context")
        options = io.get("options", {})
        self.float_sinks, self.float_recent = options.get("float_slots") or (0, 0)
        self.sinks = 0 if options.get("float_slots") else options.get("attention_sinks", 4)
        self.length = 0  # tokens fed: the next token's position
        self.coded = 0  # tokens written into the coded slots
        if self.max_context is None:
            self.buffers = {t["input"]: np.zeros(concrete(t["shape"], 1, 0), DTYPES[t["dtype"]]) for t in self.tensors}
        else:
            self.slots = self.max_context - 1 - self.float_sinks - self.float_recent
            self.filled = np.zeros(self.slots, dtype=bool)
            self.buffers = {t["input"]: np.full(concrete(t["shape"], 1, self.slots), empty_code(t), DTYPES[t["dtype"]])
                            for t in self.tensors}
            self.buffers.update({t["input"]: np.zeros(concrete(t["shape"], 1, 0), DTYPES[t["dtype"]])
                                 for t in self.float_tensors})
            self.pending = {t["input"]: np.zeros(concrete(t["shape"], 1, self.float_recent), DTYPES[t["dtype"]])
                            for t in self.tensors}  # codes of the tokens in the float ring

    def next_slot(self) -> int:
        if self.coded < self.slots:
            return self.coded
        return self.sinks + (self.coded - self.slots) % (self.slots - self.sinks)

    def bias(self) -> np.ndarray:
        read = self.filled
        if self.float_tensors:
            in_float = np.zeros(self.float_sinks + self.float_recent, dtype=bool)
            in_float[: min(self.length, self.float_sinks)] = True
            recent = min(self.float_recent, max(0, self.length - self.float_sinks))
            in_float[self.float_sinks : self.float_sinks + recent] = True
            read = np.concatenate([read, in_float])
        return np.where(np.append(read, True), 0.0, MASKED_BIAS).astype(np.float32).reshape(1, 1, 1, -1)

    def write_coded(self, entries: dict) -> None:
        slot = self.next_slot()
        for t in self.tensors:
            put(self.buffers[t["input"]], t["seq_axis"], slot, np.take(entries[t["input"]], 0, axis=t["seq_axis"]))
        self.filled[slot] = True
        self.coded += 1

    def update(self, presents: dict, new_tokens: int) -> None:
        if self.max_context is None:
            for t in self.tensors:
                self.buffers[t["input"]] = presents[t["output"]]
        elif not self.float_tensors:
            self.write_coded({t["input"]: presents[t["output"]] for t in self.tensors})
        else:
            if self.length < self.float_sinks:
                index = self.length
            else:
                ring = (self.length - self.float_sinks) % self.float_recent
                if self.length - self.float_sinks >= self.float_recent:  # the oldest leaves the ring
                    self.write_coded({t["input"]: np.take(self.pending[t["input"]], [ring], axis=t["seq_axis"])
                                      for t in self.tensors})
                for t in self.tensors:
                    put(self.pending[t["input"]], t["seq_axis"], ring,
                        np.take(presents[t["output"]], 0, axis=t["seq_axis"]))
                index = self.float_sinks + ring
            for t in self.float_tensors:
                put(self.buffers[t["input"]], t["seq_axis"], index, np.take(presents[t["output"]], 0, axis=t["seq_axis"]))
        self.length += new_tokens


def step(session: ort.InferenceSession, io: dict, cache: Cache, tokens: list[int]) -> np.ndarray:
    """Feed tokens (one at a time on static targets); returns the last position's logits."""
    if cache.max_context is not None and len(tokens) > 1:
        for token in tokens:
            logits = step(session, io, cache, [token])
        return logits
    feeds = dict(cache.buffers)
    for item in io["inputs"]:
        dtype = DTYPES.get(item["dtype"], np.int64)
        if item["role"] == "input_ids":
            feeds[item["name"]] = np.array([tokens], dtype=dtype)
        elif item["role"] == "position_ids":
            feeds[item["name"]] = np.arange(cache.length, cache.length + len(tokens), dtype=dtype)[None]
        elif item["role"] == "attention_mask":
            feeds[item["name"]] = np.ones((1, cache.length + len(tokens)), dtype=dtype)
        elif item["role"] == "attention_bias":
            feeds[item["name"]] = cache.bias()
    outputs = [io["logits"]] + [t["output"] for t in cache.tensors + cache.float_tensors]
    results = session.run(outputs, feeds)
    cache.update(dict(zip(outputs[1:], results[1:])), len(tokens))
    return results[0][0, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate text with a kvcompile output folder (onnxruntime only).")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--target", default=None, help="ort-cpu (default) or nnapi")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="comma-separated onnxruntime execution providers, e.g. NnapiExecutionProvider,CPUExecutionProvider")
    args = parser.parse_args()

    manifest = json.loads((args.folder / "kvcompile.json").read_text())
    target = args.target or ("ort-cpu" if "ort-cpu" in manifest["targets"] else sorted(manifest["targets"])[0])
    if target not in ("ort-cpu", "nnapi"):
        sys.exit(f"ort_runner.py runs the onnxruntime targets (ort-cpu, nnapi); use kvcompile run for {target}")
    io = manifest["targets"][target]
    session = ort.InferenceSession(str(args.folder / io["model"]), providers=args.providers.split(","))
    tokenizer = Tokenizer.from_file(str(args.folder / manifest["tokenizer"]))
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}

    cache = Cache(io)
    started = time.perf_counter()
    logits = step(session, io, cache, tokenizer.encode(args.prompt).ids)
    generated, shown = [], ""
    print(args.prompt, end="", flush=True)
    for _ in range(args.max_new_tokens):
        token = int(np.argmax(logits))
        generated.append(token)
        text = tokenizer.decode(generated)
        print(text[len(shown):], end="", flush=True)
        shown = text
        if token in special:
            break
        logits = step(session, io, cache, [token])
    seconds = time.perf_counter() - started
    cache_bytes = sum(b.nbytes for b in cache.buffers.values())
    print()
    print(f"{len(generated)} tokens in {seconds:.2f} s ({len(generated) / seconds:.1f} tokens/s, prompt included); "
          f"KV cache {cache_bytes:,} bytes as stored", file=sys.stderr)


if __name__ == "__main__":
    main()
