"""One conformance run for the corpus and SmolLM2 tests: every export built (cached outside git),
then every case compiled by the real CLI, two at a time (two cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.corpus import SMOLLM2_CI_FORMS, CaseResult, corpus_cases, run_cases, smollm2_cases


@pytest.fixture(scope="session")
def conformance(tmp_path_factory) -> tuple[Path, dict[str, CaseResult]]:
    work = tmp_path_factory.mktemp("conformance")
    return work, run_cases(corpus_cases() + smollm2_cases(SMOLLM2_CI_FORMS), work, workers=2, fidelity=False)
