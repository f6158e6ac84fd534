"""Fusing decomposed attention into GroupQueryAttention keeps the float model's function."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest

from conftest import DYNAMO
from kvcompile.errors import UnsupportedModelError
from kvcompile.limits import ModelLimits
from kvcompile.kvgraph import GROUP_QUERY_ATTENTION
from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.fuse_gqa import fuse_attention_passes
from kvcompile.passes.manager import run_passes
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.weights import WeightPool
from synthetic import build_decoder


def fuse(model: ir.Model) -> tuple[onnx.ModelProto, object]:
    kv = find_kv_cache(model)
    assert run_passes(model, *fuse_attention_passes(kv, "input_ids"))
    return ir.serde.serialize_model(model), kv


def logits_through_cache(proto: onnx.ModelProto, tokens: np.ndarray, prefill: int = 6) -> np.ndarray:
    kv = find_kv_cache(ir.serde.deserialize_model(proto))
    decoder = Decoder(cpu_session(proto.SerializeToString()), float_model_io(kv, "m"))
    cache = decoder.new_cache(tokens.shape[0])
    out = [decoder.step(cache, tokens[:, :prefill])[0]] if prefill else []
    out += [decoder.step(cache, tokens[:, t : t + 1])[0] for t in range(prefill, tokens.shape[1])]
    return np.concatenate(out, axis=1)


def test_fused_synthetic_llama_matches():
    """The synthetic graphs are not causally masked, so they are compared one token at a time
    (where masking changes nothing); a multi-token prefill differs, which is what the compile's
    float check catches before it uses a fused model."""
    proto = build_decoder("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    fused, _ = fuse(ir.serde.deserialize_model(proto))
    onnx.checker.check_model(fused, full_check=True)
    assert sum(n.op_type == "GroupQueryAttention" for n in fused.graph.node) == 2
    assert not any(n.op_type == "Softmax" for n in fused.graph.node), "the decomposed attention is gone"
    tokens = np.random.default_rng(0).integers(0, 32, (1, 12))
    np.testing.assert_allclose(logits_through_cache(fused, tokens, prefill=0),
                               logits_through_cache(proto, tokens, prefill=0), atol=1e-5)
    assert not np.allclose(logits_through_cache(fused, tokens), logits_through_cache(proto, tokens), atol=1e-3)


def test_fused_fixture_matches_and_reads_as_gqa():
    fused, _ = fuse(load_model(DYNAMO))
    assert find_kv_cache(ir.serde.deserialize_model(fused)).attention_forms == (GROUP_QUERY_ATTENTION,)
    node = next(n for n in fused.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2 and attrs["do_rotary"] == 0
    assert attrs["scale"] == pytest.approx(0.125), "1/sqrt(64) found on the score path"
    tokens = np.random.default_rng(1).integers(0, 2048, (1, 14))
    np.testing.assert_allclose(logits_through_cache(fused, tokens), logits_through_cache(onnx.load(DYNAMO), tokens),
                               atol=1e-4)


@pytest.mark.parametrize("form,message", [("gpt2", "laid out"), ("per_head", "one K and one V cache per layer")])
def test_other_layouts_are_not_fused(form, message):
    with pytest.raises(UnsupportedModelError, match=message):
        fuse(ir.serde.deserialize_model(build_decoder(form, layers=1, heads=2, head_dim=16)))


def test_decide_checks_the_fused_float_model(tmp_path):
    """A model whose attention is not causal cannot be fused: auto keeps it, on refuses it."""
    from kvcompile.fusion import decide
    from kvcompile.plan import PlanOptions

    proto = build_decoder("llama", layers=1, heads=4, kv_heads=2, head_dim=16)
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    kv = find_kv_cache(ir.serde.deserialize_model(proto))
    tokens = np.random.default_rng(0).integers(0, 32, 64)
    limits = ModelLimits(max_context=None, window=None)
    original = Decoder(cpu_session(path), float_model_io(kv, str(path)))
    decision = decide(PlanOptions(), original, path, kv, "input_ids", tokens, limits, tmp_path, WeightPool(), None)
    assert not decision.fused and "does not reproduce the model" in decision.reason
    with pytest.raises(UnsupportedModelError, match="cannot fuse"):
        decide(PlanOptions(fuse_attention="on"), original, path, kv, "input_ids", tokens, limits, tmp_path, WeightPool(), None)
    for scheme, bits, fold, message in (("kivi", 4, False, "per-token scales"), ("per-channel", 8, False, "not 8-bit"),
                                        ("per-channel", 4, True, "--fold-scales")):
        options = PlanOptions(scheme=scheme, kv_bits=bits, fold_scales=fold)
        assert message in decide(options, original, path, kv, "input_ids", tokens, limits, tmp_path, WeightPool(), None).reason


def test_the_fusion_check_runs_past_the_window_and_within_the_limit():
    """The fused kernel's causal mask replaces the model's: a sliding window only shows past it."""
    from kvcompile.fusion import CHECK_CONTEXT, check_context

    assert check_context(ModelLimits(None, None), 100_000) == CHECK_CONTEXT
    assert check_context(ModelLimits(None, 4096), 100_000) > 4096
    assert check_context(ModelLimits(256, None), 100_000) == 256
    assert check_context(ModelLimits(None, None), 300) == 300


@pytest.mark.slow
def test_a_sliding_window_kept_in_the_mask_is_not_fused_away(tmp_path):
    """Regression (issue 14): a Mistral-style export whose cache keeps every token while its mask
    applies a 64-token window was fused as full attention (checked over 24 tokens) and lost 45%.
    The check now runs past any window: the fused float model differs there, so the attention
    stays decomposed and the compile keeps the model's quality."""
    import shutil

    from kvcompile.pipeline import CompileOptions, compile_model
    from models.exporters import export_dynamo
    from models.families import family_dir, load_float32

    path = export_dynamo(load_float32("mistral"), tmp_path / "mistral", full_cache=True)
    shutil.copyfile(family_dir("mistral") / "tokenizer.json", path.parent / "tokenizer.json")
    assert find_kv_cache(load_model(path)).tensors[0].kept_entries is None, "the window is in the mask only"
    report = compile_model(CompileOptions(model=path, out_dir=tmp_path / "out", calib_tokens=2048,
                                          eval_tokens=4096)).report.to_dict()
    assert not report["fusion"]["fused"]
    assert "does not reproduce the model over 1024 tokens" in report["fusion"]["reason"]
    assert report["quality"]["passed"] and report["quality"]["ppl_delta_pct"] < 1.0
