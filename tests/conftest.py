"""Shared fixtures: paths of the committed fixture models, small helpers, and the conformance run.

There is one conftest.py for the whole tree: test modules import it as `conftest`, and a second
one under tests/corpus/ would shadow it under that module name."""

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


@pytest.fixture(scope="session")
def conformance(tmp_path_factory):
    """One conformance run for the corpus and SmolLM2 tests (tests/corpus/): every export built
    (cached outside git), then every case compiled by the real CLI, two at a time (two cores)."""
    from bench.corpus import SMOLLM2_CI_DYNAMO_FLAGS, SMOLLM2_CI_FORMS, corpus_cases, run_cases, smollm2_cases

    work = tmp_path_factory.mktemp("conformance")
    cases = corpus_cases() + smollm2_cases(SMOLLM2_CI_FORMS, SMOLLM2_CI_DYNAMO_FLAGS)
    return work, run_cases(cases, work, workers=2, fidelity=False)
