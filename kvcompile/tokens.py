"""Token ids for calibration and evaluation: from text (with the model's tokenizer) or `.npy`.

The bundled default texts are the fixture corpus' calibration and held-out splits
(`models/data/`, shipped as `kvcompile.data`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from kvcompile.errors import BadInputError

TOKENIZER_NAME = "tokenizer.json"


def bundled_text(name: str) -> Path:
    """Path of a bundled text: "calib.txt" or "heldout.txt"."""
    return Path(str(importlib.resources.files("kvcompile.data").joinpath(name)))


def find_tokenizer(model_path: Path, explicit: Path | None) -> Path | None:
    """The --tokenizer file, else tokenizer.json next to the model, else None."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise BadInputError(f"tokenizer {str(explicit)!r} does not exist")
        return Path(explicit)
    candidate = Path(model_path).parent / TOKENIZER_NAME
    return candidate if candidate.is_file() else None


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise BadInputError(f"tokenizer {str(path)!r} cannot be read: {exc}") from None


def load_token_ids(source: Path, tokenizer: Path | None, vocab_size: int | None = None) -> np.ndarray:
    """1-D int64 token ids from a `.npy` file or a text file (tokenized)."""
    source = Path(source)
    if not source.is_file():
        raise BadInputError(f"text file {str(source)!r} does not exist")
    if source.suffix == ".npy":
        try:
            ids = np.load(source, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise BadInputError(f"{str(source)!r} is not a readable .npy array ({exc})") from None
        if not np.issubdtype(ids.dtype, np.integer):
            raise BadInputError(f"{str(source)!r} holds {ids.dtype}, not integer token ids")
        ids = ids.reshape(-1).astype(np.int64)
    else:
        if tokenizer is None:
            raise BadInputError(
                f"cannot tokenize {str(source)!r}: no tokenizer.json next to the model; pass "
                "--tokenizer FILE, or token ids as a .npy file"
            )
        try:
            text = source.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BadInputError(f"{str(source)!r} is not UTF-8 text") from None
        ids = np.asarray(load_tokenizer(tokenizer).encode(text).ids, dtype=np.int64)
    if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise BadInputError(
            f"token ids in {str(source)!r} fall outside the model's vocabulary (0..{vocab_size - 1})"
        )
    return ids


def decode_prefill(window: int, wanted: int) -> int:
    """Prefill tokens of a `window`-token decode-path window: `wanted`, at most a quarter of the
    window so that most of it is scored one token per step (the verifier's and `kvcompile eval`'s rule)."""
    return min(wanted, window // 4)


MIN_TEXT_WINDOWS = 2  # the fewest windows a text may give before it is refused as too short


def make_windows(ids: np.ndarray, length: int, count: int, what: str, minimum: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `length` tokens [n, length]: `count` of them, or with `minimum`
    as many as the text holds up to `count` (a text a user gives is used whole). Refuses a text
    with fewer than `minimum` (or `count`) windows."""
    have = ids.size // length
    least = count if minimum is None else min(minimum, count)
    if have < least:
        raise BadInputError(
            f"{what} text has {ids.size} tokens: {have} window(s) of {length}, and at least {least} are needed "
            f"({least * length} tokens); give a longer text"
        )
    n = min(count, have)
    return ids[: n * length].reshape(n, length)
