"""`kvcompile eval`: decode-path perplexity of a compiled folder, with the verifier's evaluator.

Windows are as long as the context the compile verified at (report.json's `limits.eval_window`),
unless `window` says otherwise: a static cache's ranges hold up to the context they were checked
at, so scoring shorter windows would flatter the artifact. Static targets score windows of at
most their buffer."""

from __future__ import annotations

import json
from pathlib import Path

from kvcompile.manifest import read_manifest
from kvcompile.runtimes.perplexity import decode_path_scores
from kvcompile.runtimes.targets import default_target, load_decoder
from kvcompile.tokens import MIN_TEXT_WINDOWS, bundled_text, decode_prefill, load_token_ids, make_windows

PREFILL = 32
DEFAULT_WINDOW = 1024  # the compile's default context, for a folder whose report does not say


def verified_window(folder: Path) -> int:
    """The calibration and verification window of the compile that wrote `folder` (else 1024)."""
    try:
        limits = json.loads((Path(folder) / "report.json").read_text()).get("limits") or {}
    except (OSError, ValueError):
        return DEFAULT_WINDOW
    return limits.get("eval_window") or DEFAULT_WINDOW


def evaluate_folder(folder: Path, text: Path | None, target: str | None, soc: str | None, tokens: int,
                    window: int | None = None) -> dict:
    manifest = read_manifest(folder)
    target = target or default_target(manifest)
    decoder = load_decoder(folder, manifest, target, soc)
    tokenizer = folder / manifest.tokenizer if manifest.tokenizer else None
    source = Path(text) if text else bundled_text("heldout.txt")
    static = decoder.io.max_context is not None
    window = window or verified_window(folder)
    window = min(window, decoder.io.max_context) if static else window
    windows = make_windows(load_token_ids(source, tokenizer), window, max(1, tokens // window), "evaluation",
                           MIN_TEXT_WINDOWS)
    prefill = decode_prefill(window, PREFILL)
    (score,) = decode_path_scores([decoder], windows, prefill, batch=1 if static else 16)
    return {"target": target, "ppl": round(score.ppl, 4), "nll": round(score.nll, 6), "tokens": score.tokens,
            "text": source.name if text else "bundled heldout.txt", "window": window, "prefill": prefill}
