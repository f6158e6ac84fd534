"""Shared fixtures: paths of the committed fixture models and small helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `models` package (fixture scripts) lives at the repo root

MODELS = REPO / "models"
FIXTURE = MODELS / "fixture"
DYNAMO = FIXTURE / "onnx-dynamo" / "model.onnx"
FP16 = FIXTURE / "onnx-fp16" / "model.onnx"
GENAI = FIXTURE / "onnx-genai" / "model.onnx"
OUTLIERS = MODELS / "fixture-outliers" / "onnx-dynamo" / "model.onnx"
TOKENIZER = FIXTURE / "hf" / "tokenizer.json"
HELDOUT = MODELS / "data" / "heldout.txt"
CALIB = MODELS / "data" / "calib.txt"


@pytest.fixture(scope="session")
def heldout_ids() -> np.ndarray:
    from kvcompile.tokens import load_token_ids

    return load_token_ids(HELDOUT, TOKENIZER)
