"""The kvcompile command line (click). The only module that prints.

`kvcompile MODEL.onnx --kv-bits 4` runs the compile command (the default); `kvcompile inspect`
shows what the analysis finds. Exit codes: 0 success, 2 bad input (one-line error),
3 quality gate failed (artifacts written and marked failed), 1 internal error (a bug).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvcompile import __version__
from kvcompile.errors import KvCompileError, QualityGateError
from kvcompile.report_types import Report

err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80-column default.
out_console = Console(width=None if sys.stdout.isatty() else 140)


class DefaultCommandGroup(click.Group):
    """A group whose `compile` command runs when the first argument is not a command name."""

    default_command = "compile"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        group_flags = {"--help", "-h", "--version"}
        if args and args[0] not in self.commands and args[0] not in group_flags:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvcompile")
def cli() -> None:
    """Compile an exported decoder ONNX so its KV cache is stored in 4 bits.

    \b
    kvcompile MODEL.onnx --kv-bits 4          compile (the default command)
    kvcompile inspect MODEL.onnx              show the KV cache kvcompile finds
    """


def _rich_progress(console: Console) -> tuple[Any, Callable[[str, int], Callable[[int], None]]]:
    """Progress for the pipeline's stages: bars on a terminal; without one (a CI log, a file), one
    plain line per stage with the time elapsed since the compile started."""
    if not console.is_terminal:
        return _plain_progress(console)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=console, transient=True)

    def start(description: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(description, total=total or None)
        return lambda units: bar.advance(task, units)

    return bar, start


def _plain_progress(console: Console) -> tuple[Any, Callable[[str, int], Callable[[int], None]]]:
    started = time.perf_counter()

    def start(description: str, total: int) -> Callable[[int], None]:
        console.print(f"kvcompile: [{time.perf_counter() - started:7.1f} s] {description}",
                      markup=False, highlight=False, soft_wrap=True)
        return lambda _units: None

    return contextlib.nullcontext(), start


def _summary_table(report: Report) -> Table:
    from kvcompile.memory_wall import format_bytes

    memory, quality, plan = report.memory, report.quality, report.plan
    table = Table(title=f"kvcompile: {report.source['path']}", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("KV layers / tensors", f"{report.kv.layers} / {len(report.kv.tensors)}")
    table.add_row("scheme", f"{plan.scheme} (budget {plan.bits:g} bits/element)")
    counts: dict[str, int] = {}
    for choice in plan.choices.values():
        counts[choice] = counts.get(choice, 0) + 1
    table.add_row("stored as", ", ".join(f"{name} x{n}" for name, n in sorted(counts.items())))
    if report.fusion.float_slots and "alone lost" in report.fusion.float_slots:
        table.add_row("float slots", f"added (the 4-bit cache alone failed the gate); {memory.static_bytes:,} "
                                     "static bytes in all")
    table.add_row("average stored bits per element", f"{memory.avg_bits_per_element:.3f}")
    table.add_row("KV bytes per token (fp16 -> compiled)",
                  f"{memory.fp16_bytes_per_token} -> {memory.quantized_bytes_per_token:.1f}")
    table.add_row(f"memory ratio vs fp16 @ {memory.reference_context} tokens", f"{memory.ratio_vs_fp16:.2f}x")
    if quality.gate is None:
        table.add_row("quality", "UNVERIFIED (--no-calibration): measure it before shipping")
    else:
        table.add_row("perplexity float -> compiled",
                      f"{quality.gate.float_ppl:.3f} -> {quality.gate.quantized_ppl:.3f}")
        stderr = quality.gate.ppl_delta_stderr_pct
        table.add_row("perplexity change", f"{quality.gate.ppl_delta_pct:+.3f}%"
                      + ("" if stderr is None else f" (standard error {stderr:.3f} points)"))
        table.add_row("top-1 agreement", f"{100 * quality.gate.top1_agreement:.2f}%")
        table.add_row("quality gate", "passed" if quality.passed else "FAILED")
        if report.limits.eval_window:
            table.add_row("context calibrated and verified at (--max-context)", f"{report.limits.eval_window:,} tokens")
    wall = report.memory_wall
    budget = wall["budget_fit_tokens"]
    table.add_row(f"context in a {format_bytes(wall['budget_bytes'])} KV budget (fp16 -> compiled)",
                  f"{budget['fp16']:,} -> {budget['compiled']:,}")
    on_chip = wall["on_chip_fit_tokens"]
    if on_chip["fp16"] is not None:
        table.add_row(f"context on chip, {wall['device']['key']} (fp16 -> compiled)",
                      f"{on_chip['fp16']:,} -> {on_chip['compiled']:,}")
    for name, target in report.targets.items():
        table.add_row(f"target {name}", f"{target.artifact} (ran: {target.quality is not None})")
    return table


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="Compile every model listed in this TOML file instead of MODEL (the CI job).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: MODEL-STEM.kvcompiled next to the model].")
@click.option("--kv-bits", type=float, default=4, show_default=True,
              help="Budget: average stored bits per KV element, scales included.")
@click.option("--scheme", default="auto", show_default=True,
              help="auto (chosen per tensor by measurement), per-tensor, per-channel, per-token, "
                   "per-group, or kivi (keys per-channel, values per-token).")
@click.option("--group-size", type=int, default=32, show_default=True,
              help="head_dim channels per scale for --scheme per-group (32, 64, 128).")
@click.option("--asymmetric", is_flag=True, help="Zero points: per-token/per-group scales, or static per-tensor/per-channel ranges (min/max).")
@click.option("--uniform", is_flag=True, help="auto: keep every tensor at --kv-bits (choose scales only).")
@click.option("--rotate", type=click.Choice(["hadamard"]), default=None,
              help="Rotate K and V (after RoPE) by a Hadamard transform of head_dim before storing.")
@click.option("--fuse-attention", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Fuse decomposed attention into GroupQueryAttention with a 4-bit cache (auto: when "
                   "possible and faster).")
@click.option("--float-slots", type=(click.IntRange(min=0), click.IntRange(min=0)), default=(4, 128),
              show_default=True, metavar="SINKS RECENT",
              help="Fused GroupQueryAttention, when the 4-bit cache alone fails the gate: rebuild with the "
                   "first SINKS and newest RECENT positions of every layer also in float16 (a fixed number of "
                   "bytes; attention reads them exactly); the static targets are then built with them too. "
                   "0 0: never.")
@click.option("--fold-scales", is_flag=True,
              help="Fold per-channel scales into the attention so the cache takes one per-tensor scale.")
@click.option("--clip", default="wmse", show_default=True,
              help="How calibration picks ranges: minmax, percentile, mse, or wmse (error weighted by magnitude).")
@click.option("--target", "targets", multiple=True, default=("ort-cpu",), show_default=True,
              help="Artifact to build (repeatable, or 'all').")
@click.option("--soc", "socs", multiple=True, default=("SM8650",), show_default=True,
              help="qnn-htp: Snapdragon SoC(s) to compile for (SM8450, SM8550, SM8650, SM8750, SM8850).")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="The longest context the model will run at: calibration and verification use windows "
                   "this long (static key ranges are checked as far as they are used) and the static targets' "
                   "buffer holds it [default: 1024, or less if the model's context or attention window is shorter].")
@click.option("--prefill-len", type=click.IntRange(min=0), default=None,
              help="qnn-htp: tokens its prefill graph takes per call (a second graph sharing the decode graph's "
                   "weights and cache buffer) [default: 128, or half the buffer if less; 0: no prefill graph, "
                   "prompts go one token a call].")
@click.option("--htp-precision", type=click.Choice(["auto", "quantized", "fp16"]), default="auto", show_default=True,
              help="qnn-htp: 'quantized' runs the graphs in fixed point (uint16 activations, 8-bit weights, "
                   "calibrated); 'fp16' runs them in float16 on the HTP (twice the weight bytes, no calibration, "
                   "the float model's quality with the 4-bit cache); 'auto' builds the quantized graphs and "
                   "rebuilds them in float16 only if they fail the quality gate (the report says why).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text, or token ids as .npy [default: bundled text].")
@click.option("--calib-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Calibration tokens (in windows of --max-context).")
@click.option("--eval", "eval_text", type=click.Path(path_type=Path), default=None,
              help="Held-out text (or .npy ids) for verification [default: bundled text].")
@click.option("--eval-tokens", type=click.IntRange(min=1), default=12288, show_default=True)
@click.option("--no-calibration", is_flag=True,
              help="Run nothing: in-graph per-token scales, no calibration, no verification (report says "
                   "UNVERIFIED). For models too large to run here; ort-cpu only.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="tokenizer.json [default: the one next to the model].")
@click.option("--kv-map", type=click.Path(path_type=Path), default=None,
              help="JSON map of the KV cache tensors; overrides discovery.")
@click.option("--quality-gate", type=float, default=2.0, show_default=True,
              help="Fail (exit 3) if perplexity rises more than this many percent.")
@click.option("--device", default=None,
              help="Memory-wall report: device profile (see `kvcompile report --list-devices`) or a .toml "
                   "profile [default: the --soc's for qnn-htp, else snapdragon-8-gen-3].")
@click.option("--budget", default="1GiB", show_default=True,
              help="Memory-wall report: RAM for the KV cache (e.g. 512MiB, 2GB).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
def compile_command(model, config, as_json, **flags) -> None:
    """Compile MODEL so its KV cache is stored in --kv-bits bits, and verify it."""
    from kvcompile.compile_process import compile_in_child

    if (model is None) == (config is None):
        raise click.UsageError("give either MODEL or --config FILE")
    if config is not None:
        _compile_config(config, as_json)
        return

    def compile_stages(out_dir: Path, open_stage, progress):  # in the child: the pipeline is imported there
        from kvcompile.pipeline import compile_into

        return compile_into(_compile_options(model, flags), out_dir, open_stage, progress)

    bar, progress = _rich_progress(err_console)
    try:
        result = compile_in_child(model, flags["out_dir"], compile_stages, progress, bar)
    except QualityGateError as exc:
        if exc.result is not None:
            _print_result(exc.result, as_json)
        raise
    _print_result(result, as_json)


def _compile_options(model: Path, flags: dict[str, Any]):
    """The compile flags as CompileOptions: click names each value after its option, which is the
    field's name except where the option is shorter (--quality-gate) or repeatable (tuples)."""
    from kvcompile.pipeline import CompileOptions

    flags = dict(flags)
    flags["quality_gate_pct"] = flags.pop("quality_gate")
    flags["targets"], flags["socs"] = tuple(flags["targets"]), tuple(flags["socs"])
    return CompileOptions(model=model, **flags)


def _compile_config(config: Path, as_json: bool) -> None:
    from kvcompile.batch import compile_all, load_config

    jobs = load_config(config)
    bar, progress = _rich_progress(err_console)
    with bar:
        summaries, exit_code = compile_all(jobs, progress)
    if as_json:
        click.echo(json.dumps(summaries, indent=2, sort_keys=True))
    else:
        table = Table(title=f"kvcompile --config {config}")
        for column in ("model", "status", "ppl change", "ratio vs fp16", "output"):
            table.add_column(column)
        for s in summaries:
            report = s.get("report")
            table.add_row(s["model"], s["status"],
                          f"{report['quality']['ppl_delta_pct']:+.2f}%" if report else "-",
                          f"{report['memory']['ratio_vs_fp16']:.2f}x" if report else "-",
                          s.get("out_dir") or s.get("error", ""))
        out_console.print(table)
    if exit_code:
        failed = sum(s["status"] != "passed" for s in summaries)
        raise _ConfigFailed(exit_code, f"{failed} of {len(summaries)} compiles failed (see the table or --json)")


class _ConfigFailed(KvCompileError):
    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def _print_result(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.report.to_dict(), indent=2, sort_keys=True))
        return
    out_console.print(_summary_table(result.report))
    out_console.print(f"wrote {result.out_dir}/ (kvcompile.json, report.md, report.json, report.png)")


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--kv-map", type=click.Path(path_type=Path), default=None, help="JSON map overriding discovery.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
def inspect_command(model, kv_map, as_json) -> None:
    """Show the KV cache kvcompile finds in MODEL and what it would do with it."""
    from kvcompile.inspect import inspect_model

    info = inspect_model(model, kv_map)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    table = Table(title=f"{model}: {info['layers']} layers, attention {', '.join(info['attention_forms'])}")
    for column in ("tensor", "past input", "present output", "layout", "heads x dim", "dtype", "attention"):
        table.add_column(column)
    for row in info["tensors"]:
        table.add_row(row["label"], row["input"], row["output"], row["layout"],
                      f"{row['kv_heads']}x{row['head_dim']}", row["dtype"], row["attention"])
    out_console.print(table)
    inputs = ", ".join(f"{i['name']} ({i['role']})" for i in info["inputs"])
    out_console.print(f"model inputs: {inputs}")
    out_console.print(f"FP16 KV bytes per token: {info['fp16_bytes_per_token']}")
    out_console.print(f"kvcompile would: {info['would_do']}")


@cli.command("report")
@click.argument("folder", type=click.Path(path_type=Path), required=False)
@click.option("--device", default=None,
              help="Device profile key or a .toml profile [default: the one the report has].")
@click.option("--budget", default=None, help="RAM for the KV cache, e.g. 1GiB [default: the one the report has].")
@click.option("--weight-bits", type=click.FloatRange(min=1, max=32), default=None,
              help="Model the decode bound with weights stored in this many bits [default: as stored].")
@click.option("--list-devices", is_flag=True, help="List the bundled device profiles and their sources.")
@click.option("--json", "as_json", is_flag=True, help="Print the memory-wall section as JSON.")
def report_command(folder, device, budget, weight_bits, list_devices, as_json) -> None:
    """Redo a compiled FOLDER's memory-wall report (report.md/json/png) for a device and RAM budget."""
    from kvcompile.memory_wall import (
        bundled_devices,
        device_from_summary,
        format_bytes,
        load_device,
        memory_wall,
        parse_size,
    )
    from kvcompile.report import memory_wall_markdown, read_report, write_report_data

    if list_devices:
        for key, profile in bundled_devices().items():
            summary = profile.summary()
            on_chip = (f"{format_bytes(profile.on_chip_bytes)} ({profile.on_chip_kind})" if profile.on_chip_bytes
                       else "not published")
            out_console.print(f"{key}: {profile.name}; {profile.memory} {summary['peak_bandwidth_gb_s']} GB/s; "
                              f"on-chip {on_chip}; {profile.kind}",
                              markup=False, highlight=False)
        return
    if folder is None:
        raise click.UsageError("give a compiled FOLDER (or --list-devices)")
    report = read_report(folder)
    wall = report["memory_wall"]
    profile = load_device(device) if device else device_from_summary(wall["device"])
    budget_bytes = parse_size(budget) if budget else wall["budget_bytes"]
    weights = {k: wall["weights"][k] for k in ("parameters", "bytes")}
    report["memory_wall"] = memory_wall(report["memory"], weights, profile, budget_bytes, weight_bits)
    write_report_data(report, Path(folder))
    if as_json:
        click.echo(json.dumps(report["memory_wall"], indent=2, sort_keys=True))
    else:
        out_console.print("\n".join(memory_wall_markdown(report["memory_wall"])).strip(), markup=False,
                          highlight=False)
        out_console.print(f"wrote {folder}/report.md, report.json, report.png")


@cli.command("run")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--target", default=None, help="Which artifact [default: the first, ort-cpu].")
@click.option("--soc", default=None, help="qnn-htp: which compiled SoC [default: the first].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = no limit.")
@click.option("--seed", type=int, default=0, show_default=True)
def run_command(folder, prompt, target, soc, max_new_tokens, temperature, top_k, seed) -> None:
    """Generate text with a compiled FOLDER, streaming it; then tokens/s and the cache's bytes."""
    import time

    from kvcompile.manifest import read_manifest
    from kvcompile.runtimes.generate import Generation, Sampling
    from kvcompile.runtimes.targets import default_target, load_decoder, runs_on
    from kvcompile.tokens import load_tokenizer

    manifest = read_manifest(folder)
    if manifest.tokenizer is None:
        raise KvCompileError(f"{str(folder)!r} has no tokenizer.json; compile with --tokenizer to run text")
    tokenizer = load_tokenizer(Path(folder) / manifest.tokenizer)
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise KvCompileError("--prompt is empty after tokenization")
    target = target or default_target(manifest)
    loading = time.perf_counter()
    decoder = load_decoder(Path(folder), manifest, target, soc)
    loaded = time.perf_counter() - loading
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    started = time.perf_counter()
    generation = Generation(decoder, prompt_ids, Sampling(temperature, top_k, seed))
    first_token = time.perf_counter() - started
    tokens, shown = [], ""
    click.echo(prompt, nl=False)
    decoding = time.perf_counter()
    for token in generation.tokens(max_new_tokens, stop=lambda t: t in special):
        tokens.append(token)
        text = tokenizer.decode(tokens)
        click.echo(text[len(shown):], nl=False)
        shown = text
    seconds = time.perf_counter() - decoding
    click.echo()
    steps = max(len(tokens) - 1, 0)  # the first token came from the prompt's logits
    prefill_len = decoder.io.options.prefill_len if decoder.prefill is not None else None
    fed = (f"prefill graph, {prefill_len} tokens a call" if prefill_len
           else "one token a call" if decoder.io.max_context is not None else "one call")
    err_console.print(
        f"{len(tokens)} tokens generated; prompt of {len(prompt_ids)} tokens: time to first token {first_token:.2f} s "
        f"({fed}); decode: {steps} steps in {seconds:.2f} s ({steps / seconds if seconds > 0 else 0.0:.3g} tokens/s); "
        f"loaded in {loaded:.1f} s; KV cache {generation.cache.nbytes():,} bytes as stored; {target} on "
        f"{runs_on(target)}",
        markup=False, highlight=False)


@cli.command("eval")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Text (or token ids .npy) to score [default: the bundled held-out text].")
@click.option("--target", default=None, help="Which artifact [default: the first, ort-cpu].")
@click.option("--soc", default=None, help="qnn-htp: which compiled SoC [default: the first].")
@click.option("--tokens", "token_count", type=click.IntRange(min=1), default=12288, show_default=True,
              help="Tokens to use.")
@click.option("--window", type=click.IntRange(min=16), default=None,
              help="Tokens per window [default: the context the compile verified at; static targets: at most "
                   "their buffer].")
@click.option("--json", "as_json", is_flag=True)
def eval_command(folder, text, target, soc, token_count, window, as_json) -> None:
    """Decode-path perplexity of a compiled FOLDER (the measurement the compile's verifier uses)."""
    from kvcompile.evaluate import evaluate_folder

    result = evaluate_folder(Path(folder), text, target, soc, token_count, window)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        out_console.print(f"{result['target']}: perplexity {result['ppl']:.3f} over {result['tokens']} tokens "
                          f"({result['text']}, windows of {result['window']}, prefill {result['prefill']}, "
                          "scored after each decode step)")


def main() -> None:
    debug = bool(os.environ.get("KVCOMPILE_DEBUG"))
    try:
        cli.main(standalone_mode=False)
    except KvCompileError as exc:
        err_console.print(f"kvcompile: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("kvcompile: interrupted; previous output left untouched", markup=False)
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("kvcompile: interrupted; previous output left untouched", markup=False)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            _internal_error(exc, debug)
        # the machine's disk, not kvcompile: the staged output and the work folder are gone again
        err_console.print(f"kvcompile: error: no space left on the device ({exc.filename or 'a file being written'}); "
                          "free some, or point -o and TMPDIR at a larger disk. Previous output left untouched",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:  # a bug in kvcompile: say so in one line, traceback on request
        _internal_error(exc, debug)


def _internal_error(exc: Exception, debug: bool) -> NoReturn:
    if debug:
        traceback.print_exception(exc)
    type_name = getattr(exc, "type_name", type(exc).__name__)  # a child's error that did not pickle
    err_console.print(
        f"kvcompile: internal error ({type_name}: {exc}). This is a bug; rerun with "
        "KVCOMPILE_DEBUG=1 for a traceback and report it.", markup=False, highlight=False, soft_wrap=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
