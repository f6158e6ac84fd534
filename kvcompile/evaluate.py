"""`kvcompile eval`: decode-path perplexity of a compiled folder, with the verifier's evaluator."""

from __future__ import annotations

from pathlib import Path

from kvcompile.manifest import read_manifest
from kvcompile.runtimes.perplexity import decode_path_scores
from kvcompile.runtimes.targets import default_target, load_decoder
from kvcompile.tokens import MIN_TEXT_WINDOWS, bundled_text, load_token_ids, make_windows

WINDOW, PREFILL = 256, 32


def evaluate_folder(folder: Path, text: Path | None, target: str | None, soc: str | None, tokens: int) -> dict:
    manifest = read_manifest(folder)
    target = target or default_target(manifest)
    decoder = load_decoder(folder, manifest, target, soc)
    tokenizer = folder / manifest.tokenizer if manifest.tokenizer else None
    source = Path(text) if text else bundled_text("heldout.txt")
    static = decoder.io.max_context is not None
    window = min(WINDOW, decoder.io.max_context) if static else WINDOW
    windows = make_windows(load_token_ids(source, tokenizer), window, max(1, tokens // window), "evaluation",
                           MIN_TEXT_WINDOWS)
    (score,) = decode_path_scores([decoder], windows, PREFILL, batch=1 if static else 16)
    return {"target": target, "ppl": round(score.ppl, 4), "nll": round(score.nll, 6), "tokens": score.tokens,
            "text": source.name if text else "bundled heldout.txt", "window": window, "prefill": PREFILL}
