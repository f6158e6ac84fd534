"""The conformance contract on the corpus: 14 transformers families x every exporter form.

Each model is exported (models/exporters.py, cached outside git) and compiled by the real
`kvcompile` command in a fresh process (the `conformance` fixture), with shorter texts than the
default (bench.corpus CORPUS_FLAGS: 16 evaluation windows of 256 tokens, longer than every
sliding window here).

Every legitimate model ends in exit 0 (compiled, gate passed), 2 (refused: one line naming the
construct) or 3 (gate failed, honest report), never 1. Beyond that, each case must end exactly as
listed below: a family that stops compiling, or starts failing its gate, is a regression.
"""

from __future__ import annotations

import json

import pytest

from bench.corpus import corpus_cases

pytestmark = pytest.mark.slow

NOT_SUPPORTED_BY_GENAI = ("falcon", "gpt_neox", "opt", "gpt2", "stablelm", "olmo2")
# Exporters that refuse a family (their own error; there is no model to compile).
EXPORTER_REFUSES = {
    **{(family, form): "is not currently supported" for family in NOT_SUPPORTED_BY_GENAI
       for form in ("genai", "genai-int4")},
    # onnxruntime-genai 0.18's builder reads config.rope_scaling["rope_type"], which transformers 5
    # configs keep elsewhere (rope_parameters).
    ("gemma3", "genai"): "KeyError: 'rope_type'",
    ("gemma3", "genai-int4"): "KeyError: 'rope_type'",
    # torch.onnx cannot lower Falcon's attention at opset 23.
    ("falcon", "dynamo-opset23"): "ConversionError",
}
# Models kvcompile refuses (exit 2), with the construct its one-line message must name.
KVCOMPILE_REFUSES = {
    ("gemma2", "genai"): "sliding_window_cache=1",
    ("gemma2", "genai-int4"): "sliding_window_cache=1",
}


@pytest.mark.parametrize("case", corpus_cases(), ids=lambda case: case.key)
def test_every_corpus_model_compiles_or_is_refused_by_name(case, conformance):
    work, results = conformance
    model, form, result = case.model, case.form, results[case.key]
    assert result.outcome != "internal-error", f"exit {result.exit_code}: {result.message}"
    if (model, form) in EXPORTER_REFUSES:
        assert result.outcome == "exporter-refused" and EXPORTER_REFUSES[(model, form)] in result.message
        return
    assert result.outcome != "exporter-refused", f"the exporter now refuses {model}/{form}: {result.message}"
    if (model, form) in KVCOMPILE_REFUSES:
        assert result.outcome == "refused", result.message
        assert KVCOMPILE_REFUSES[(model, form)] in result.message
        assert result.message.startswith("kvcompile: error: ") and "\n" not in result.message
        return
    assert result.outcome == "passed", f"{result.outcome}: {result.message}"
    report = json.loads((work / f"{model}-{form}" / "report.json").read_text())
    limits = report["limits"]
    if limits["sliding_window"] is not None:  # checked at a context longer than the window
        assert limits["eval_window"] > limits["sliding_window"]
    assert report["quality"]["eval_tokens"] > 3000
    assert 3.5 < report["memory"]["ratio_vs_fp16"] < 4.5
