"""What each way of storing SmolLM2's cache costs, measured through the decode path by simulation.

    python -m bench.storage_sweep [--windows 16] [--window 256] [--sinks 4] [--only K:V,...]

Every row stores the keys one way and the values another ("-": float) and runs the float export
of SmolLM2 (`models/real.py`: dynamo form) with each new cache entry replaced, as it enters the
cache, by what that storage reads back (`runtimes/simulate.py`; exact for the Q/DQ form, tested).
Ranges are calibrated on the bundled calib.txt (32 windows of 256, as a compile did before it
moved to --max-context windows (8 x 1024 by default); or
`--calib-window`), scored on held-out text (prefill 32, then one token per step; perplexity
against the float model's).
`--sinks N` keeps the first N positions of every window in float and calibrates without them;
`--recent R` keeps the newest R positions in float (an entry is stored when it leaves them).
Storages (static, 4-bit, per head and channel unless said):
  sym-wmse      symmetric, kvcompile's wmse clipping: --scheme per-channel
  sym-wmse-tied the same with RoPE channel pairs sharing a range (kvcompile before this sweep)
  sym-minmax    symmetric, no clipping
  mid-sym       minus the midpoint of the calibrated range, then symmetric (what the fused
                kernel could hold with an exact centering transform)
  mid-wmse      minus the midpoint, then symmetric with wmse clipping of the centered entries
  mid-rot-sym   the same after a Hadamard rotation of head_dim
  mid-rot-wmse  mid-wmse after a Hadamard rotation of head_dim
  mean-wmse     minus the channel's mean instead of its midpoint, then as mid-wmse
  sink-mid-wmse mid-wmse with the center moved (at most half a step) so that the first position's
                mean entry, the attention sink (content-independent after the first layers), is a
                grid point; where it lies beyond the codes, the scale widens to reach it
  sink-sym-wmse sym-wmse centered the same way (a center within half a step of zero)
  asym          asymmetric min/max, zero inside the range (kvcompile's --asymmetric static)
  asym-p9999    asymmetric, 0.01/99.99 percentiles
  tok-asym      dynamic per-token asymmetric (4.375 bits)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.normalize import normalize_export
from kvcompile.quant import Codec, asymmetric_params, fake_quantize, symmetric_scale
from kvcompile.ranges import MSE_GRID, channel_ranges
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import decode_path_scores
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.simulate import FakeQuantizedCache, StoredCacheDecoder
from kvcompile.tokens import bundled_text, find_tokenizer, load_token_ids, make_windows
from models.real import form_path

DEFAULT_ROWS = ("sym-wmse-tied:-", "sym-wmse:-", "sym-minmax:-", "mid-sym:-", "mid-rot-sym:-", "asym:-", "asym-p9999:-",
                "-:sym-wmse", "-:mid-sym", "-:asym", "sym-wmse-tied:sym-wmse", "sym-wmse:sym-wmse", "asym:asym", "asym-p9999:asym",
                "tok-asym:tok-asym")


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


class ChannelStorage:
    """Static 4-bit storage of [batch, heads, seq, head_dim] entries, optionally centered and rotated."""

    def __init__(self, scale, zero_point=8, center=None, rotation=None):
        self.scale, self.zero_point, self.center, self.rotation = scale, zero_point, center, rotation

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        y = x - self.center[None, :, None, :] if self.center is not None else x
        y = y @ self.rotation if self.rotation is not None else y
        zero_point = self.zero_point if np.isscalar(self.zero_point) else self.zero_point[None, :, None, :]
        y = fake_quantize(y.astype(np.float32), self.scale[None, :, None, :], zero_point, 4)
        y = y @ self.rotation.T if self.rotation is not None else y
        return y + self.center[None, :, None, :] if self.center is not None else y


def tied_wmse_ranges(samples: np.ndarray, rope: bool) -> np.ndarray:
    """wmse ranges with RoPE's channel pairs (i, i + D/2) sharing one: the error of each clipping
    fraction summed over the pair, the pair's wider absmax scaled."""
    if not rope:
        return channel_ranges(samples, 4, "wmse")
    half = samples.shape[-1] // 2
    partner = np.concatenate([np.arange(half, 2 * half), np.arange(half)])
    absmax = np.abs(samples).max(axis=0)
    absmax = np.maximum(absmax, absmax[:, partner])
    best_error = best = None
    for fraction in MSE_GRID:
        candidate = absmax * np.float32(fraction)
        scale = symmetric_scale(candidate, 4)
        error = (((fake_quantize(samples, scale, 8, 4) - samples) ** 2) * samples**2).mean(axis=0)
        error = error + error[:, partner]
        better = np.ones_like(error, bool) if best_error is None else error < best_error
        best_error = error if best_error is None else np.where(better, error, best_error)
        best = candidate if best is None else np.where(better, candidate, best)
    return best


def sink_on_grid(sink: np.ndarray, center: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Center and scale moved so the (content-independent) first-position entry `sink` [H, D] is a
    grid point: the center shifts by at most half a step; where the sink lies beyond the
    symmetric codes [-8, 7] the scale widens until it reaches the end code."""
    steps = (sink - center) / scale
    scale = np.where(steps > 7, (sink - center) / 7, np.where(steps < -8, (sink - center) / -8, scale))
    steps = np.round((sink - center) / scale)
    return (sink - steps * scale).astype(np.float32), scale.astype(np.float32)


def storage(kind: str, samples: np.ndarray, rope: bool, head_dim: int, sink: np.ndarray | None = None):
    if kind in ("sink-mid-wmse", "sink-sym-wmse"):
        center = (samples.max(0) + samples.min(0)) / 2 if kind == "sink-mid-wmse" else np.zeros_like(sink)
        scale = symmetric_scale(channel_ranges(samples - center, 4, "wmse"), 4)
        center, scale = sink_on_grid(sink, center, scale)
        return ChannelStorage(scale, center=center)
    if kind == "sym-wmse":
        return ChannelStorage(symmetric_scale(channel_ranges(samples, 4, "wmse"), 4))
    if kind == "sym-wmse-tied":
        return ChannelStorage(symmetric_scale(tied_wmse_ranges(samples, rope), 4))
    if kind == "sym-minmax":
        return ChannelStorage(symmetric_scale(np.abs(samples).max(0), 4))
    if kind in ("mid-wmse", "mid-rot-wmse", "mean-wmse"):
        center = samples.mean(0) if kind == "mean-wmse" else (samples.max(0) + samples.min(0)) / 2
        rotation = hadamard(head_dim) if kind == "mid-rot-wmse" else None
        centered = samples - center if rotation is None else (samples - center) @ rotation
        return ChannelStorage(symmetric_scale(channel_ranges(centered, 4, "wmse"), 4), center=center,
                              rotation=rotation)
    if kind in ("mid-sym", "mid-rot-sym"):
        center = (samples.max(0) + samples.min(0)) / 2
        rotation = hadamard(head_dim) if kind == "mid-rot-sym" else None
        centered = samples - center if rotation is None else (samples - center) @ rotation
        return ChannelStorage(symmetric_scale(np.abs(centered).max(0), 4), center=center, rotation=rotation)
    if kind == "asym":
        return ChannelStorage(*asymmetric_params(samples.min(0), samples.max(0), 4))
    if kind == "asym-p9999":
        low, high = np.percentile(samples, 0.01, axis=0), np.percentile(samples, 99.99, axis=0)
        return ChannelStorage(*asymmetric_params(low.astype(np.float32), high.astype(np.float32), 4))
    if kind == "tok-asym":
        return Codec(4, None, None, pack_axis=3, group=head_dim, symmetric=False, packed=False)
    raise ValueError(f"unknown storage {kind!r}")


class SinkCache(FakeQuantizedCache):
    """Keeps the first `sinks` positions of every window in float, and the newest `recent`
    positions too: an entry is stored (fake-quantized) when it leaves the recent window
    (layout [batch, heads, seq, dim])."""

    sinks = 0
    recent = 0

    def update(self, presents, new_tokens):
        if not self.recent:
            start, kept = self.length, {}
            for kv in self.io.kv:
                if kv.input in self.codecs and start < self.sinks:
                    kept[kv.input] = presents[kv.output][:, :, start : self.sinks].copy()
            super().update(presents, new_tokens)
            for name, entries in kept.items():
                self.tensors[name][:, :, start : self.sinks] = entries
            return
        stored_upto = max(self.sinks, self.length - self.recent)
        self.length += new_tokens
        leaving_upto = max(self.sinks, self.length - self.recent)
        for kv in self.io.kv:
            present = presents[kv.output].copy()
            codec = self.codecs.get(kv.input)
            if codec is not None and leaving_upto > stored_upto:
                part = present[:, :, stored_upto:leaving_upto]
                present[:, :, stored_upto:leaving_upto] = codec.fake_quantize(part).astype(present.dtype)
            self.tensors[kv.input] = present


class SinkDecoder(StoredCacheDecoder):
    def new_cache(self, batch):
        return SinkCache(self.io, batch, self.codecs)


def calibration_samples(decoder: Decoder, windows: np.ndarray, skip: int
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every cache entry of positions >= skip, [tokens, heads, head_dim] per past input, and the
    mean entry at the first position [heads, head_dim]."""
    pieces: dict[str, list[np.ndarray]] = {kv.input: [] for kv in decoder.io.kv}
    firsts: dict[str, list[np.ndarray]] = {kv.input: [] for kv in decoder.io.kv}
    for start in range(0, windows.shape[0], 8):
        _, presents = decoder.step(decoder.new_cache(len(windows[start : start + 8])), windows[start : start + 8])
        for kv in decoder.io.kv:
            x = presents[kv.output][:, :, skip:]
            pieces[kv.input].append(np.transpose(x, (0, 2, 1, 3)).reshape(-1, x.shape[1], x.shape[3]))
            firsts[kv.input].append(presents[kv.output][:, :, 0])
    return ({name: np.concatenate(parts) for name, parts in pieces.items()},
            {name: np.concatenate(parts).mean(0) for name, parts in firsts.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=0)
    parser.add_argument("--recent", type=int, default=0, help="newest positions kept in float")
    parser.add_argument("--calib-window", type=int, default=256, help="calibration windows (8,192 tokens in all)")
    parser.add_argument("--only", default=",".join(DEFAULT_ROWS), help="K:V storages, comma-separated")
    args = parser.parse_args()
    path = form_path("dynamo")
    model = load_model(path)
    normalize_export(model)
    kv = find_kv_cache(model)
    if any(t.axes.seq != 2 or t.axes.heads != 1 for t in kv.tensors):
        raise SystemExit("this sweep takes caches laid out [batch, heads, seq, head_dim]")
    decoder = Decoder(cpu_session(path), float_model_io(kv, str(path)))
    tokenizer = find_tokenizer(path, None)
    calib = make_windows(load_token_ids(bundled_text("calib.txt"), tokenizer, None), args.calib_window,
                         8192 // args.calib_window, "calibration", 1)
    held_out = make_windows(load_token_ids(bundled_text("heldout.txt"), tokenizer, None), args.window,
                            args.windows, "evaluation", 1)
    samples, sinks = calibration_samples(decoder, calib, args.sinks)
    SinkCache.sinks = args.sinks
    SinkCache.recent = args.recent
    rows = [row.split(":") for row in args.only.split(",")]
    decoders = [decoder]
    for keys, values in rows:
        codecs = {}
        for tensor in kv.tensors:
            kind = keys if tensor.kind == "key" else values
            if kind != "-":
                codecs[tensor.past_input] = storage(kind, samples[tensor.past_input],
                                                    tensor.kind == "key" and tensor.rope, tensor.head_dim,
                                                    sinks[tensor.past_input])
        decoders.append(SinkDecoder(decoder.session, decoder.io, codecs))
    started = time.time()
    scores = decode_path_scores(decoders, held_out, 32)
    print(f"SmolLM2 dynamo, {args.windows} x {args.window} held-out tokens, calibrated on windows of "
          f"{args.calib_window}, sinks {args.sinks}, recent {args.recent}, "
          f"float ppl {scores[0].ppl:.3f} ({time.time() - started:.0f} s)")
    print("| keys | values | perplexity | delta | top-1 | KL |\n| --- | --- | --- | --- | --- | --- |")
    results = []
    for (keys, values), score in zip(rows, scores[1:]):
        delta = 100 * (score.ppl / scores[0].ppl - 1)
        print(f"| {keys} | {values} | {score.ppl:.3f} | {delta:+.2f}% | {score.top1_agreement:.1%} | {score.mean_kl:.4f} |")
        results.append({"keys": keys, "values": values, "ppl": score.ppl, "delta_pct": delta})
    print(json.dumps({"float_ppl": scores[0].ppl, "windows": args.windows, "window": args.window,
                      "calib_window": args.calib_window,
                      "sinks": args.sinks, "recent": args.recent, "rows": results}))


if __name__ == "__main__":
    main()
