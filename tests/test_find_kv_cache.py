"""The KV-cache analysis on synthetic graphs of every form, on the fixtures, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import DYNAMO, FP16, GENAI
from kvcompile.errors import BadInputError, UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, GROUP_QUERY_ATTENTION
from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache, load_kv_map
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from synthetic import build_decoder, build_encoder


def analyse(proto: onnx.ModelProto):
    return find_kv_cache(ir.serde.deserialize_model(proto))


def runs(proto: onnx.ModelProto, kv) -> np.ndarray:
    """The model passes the checker and decodes 3 tokens after a 4-token prefill in onnxruntime."""
    onnx.checker.check_model(proto, full_check=True)
    decoder = Decoder(cpu_session(proto.SerializeToString()), float_model_io(kv, "synthetic"))
    cache = decoder.new_cache(2)
    decoder.step(cache, np.ones((2, 4), np.int64))
    for _ in range(3):
        logits, _ = decoder.step(cache, np.ones((2, 1), np.int64))
    assert cache.length == 7
    return logits


def test_llama_form_gqa_rope():
    proto = build_decoder("llama", layers=2, heads=4, kv_heads=2)
    kv = analyse(proto)
    assert [(t.layer, t.kind) for t in kv.tensors] == [(0, "key"), (0, "value"), (1, "key"), (1, "value")]
    key = kv.tensors[0]
    assert key.past_input == "past_key_values.0.key" and key.present_output == "present.0.key"
    assert (key.axes.batch, key.axes.heads, key.axes.seq, key.axes.head_dim) == (0, 1, 2, 3)
    assert key.num_heads == 2 and key.head_dim == 8 and key.attention == DECOMPOSED
    assert key.rope and not kv.tensors[1].rope
    assert key.projection is not None and kv.tensors[1].projection is not None
    assert [i.role for i in kv.inputs] == ["input_ids", "attention_mask", "position_ids"]
    assert kv.fp16_bytes_per_token() == 2 * 2 * (2 * 8) * 2
    runs(proto, kv)


def test_gpt2_form_fused_qkv_bias_transposed_keys_opaque_names():
    """Names say nothing and values are listed first: the dataflow alone finds keys and values."""
    proto = build_decoder("gpt2", layers=2, heads=2)
    assert [i.name for i in proto.graph.input][2:] == ["in_11", "in_13", "in_10", "in_12"]
    kv = analyse(proto)
    assert [(t.layer, t.kind, t.past_input) for t in kv.tensors] == [
        (0, "key", "in_10"), (0, "value", "in_11"), (1, "key", "in_12"), (1, "value", "in_13")]
    key, value = kv.tensors[0], kv.tensors[1]
    assert key.axes.keys_transposed and (key.axes.head_dim, key.axes.seq) == (2, 3)
    assert not value.axes.keys_transposed
    assert key.projection == value.projection, "one fused QKV projection feeds both"
    runs(proto, kv)


def test_one_cache_tensor_per_head():
    proto = build_decoder("per_head", layers=2, heads=2)
    kv = analyse(proto)
    assert len(kv.tensors) == 8 and kv.num_layers == 2
    assert {(t.layer, t.kind, t.head) for t in kv.tensors} == {
        (layer, kind, head) for layer in range(2) for kind in ("key", "value") for head in range(2)}
    first = kv.tensors[0]
    assert first.axes.heads is None and first.rank == 3 and first.num_heads == 1
    assert first.past_input == "past_key_values.0.head0.key"
    runs(proto, kv)


def test_group_query_attention_op():
    proto = build_decoder("gqa_op", layers=2, heads=4, kv_heads=2)
    kv = analyse(proto)
    assert kv.attention_forms == (GROUP_QUERY_ATTENTION,)
    assert [(t.layer, t.kind) for t in kv.tensors] == [(0, "key"), (0, "value"), (1, "key"), (1, "value")]
    assert kv.tensors[0].num_heads == 2 and kv.tensors[0].head_dim == 8
    onnx.checker.check_model(proto)
    runs_gqa = Decoder(cpu_session(proto.SerializeToString()), float_model_io(kv, "gqa"))
    cache = runs_gqa.new_cache(1)
    runs_gqa.step(cache, np.ones((1, 3), np.int64))
    runs_gqa.step(cache, np.ones((1, 1), np.int64))
    assert cache.length == 4


def test_float16_form():
    proto = build_decoder("llama", dtype=np.float16)
    kv = analyse(proto)
    assert {t.dtype for t in kv.tensors} == {"float16"}
    runs(proto, kv)


@pytest.mark.parametrize("path,form,dtype", [(DYNAMO, DECOMPOSED, "float32"), (FP16, DECOMPOSED, "float16"),
                                              (GENAI, GROUP_QUERY_ATTENTION, "float32")])
def test_fixture_exports(path, form, dtype):
    kv = find_kv_cache(load_model(path))
    assert kv.num_layers == 4 and len(kv.tensors) == 8
    assert kv.attention_forms == (form,)
    assert {t.dtype for t in kv.tensors} == {dtype}
    assert [t.past_input for t in kv.tensors[:2]] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert kv.fp16_bytes_per_token() == 4 * 2 * 2 * 64 * 2


def test_no_kv_cache_is_refused_with_what_was_found():
    with pytest.raises(UnsupportedModelError, match="no KV cache found.*input_ids INT64"):
        analyse(build_encoder())


def test_past_input_without_present_output_is_refused():
    with pytest.raises(UnsupportedModelError, match="no graph output carries the updated cache"):
        analyse(build_decoder("llama", present_outputs=False))


def test_kv_map_overrides_discovery(tmp_path):
    proto = build_decoder("gpt2", layers=1, heads=2)
    spec = {"layers": [{"key": {"past": "in_10", "present": "out_10", "layout": "bhds"},
                        "value": {"past": "in_11", "present": "out_11"}}]}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(spec))
    kv = load_kv_map(ir.serde.deserialize_model(proto), path)
    assert kv.source == "kv-map"
    assert kv.tensors[0].axes.keys_transposed and kv.tensors[0].kind == "key"
    assert kv.tensors[1].axes.seq == 2


@pytest.mark.parametrize("spec,message", [
    ({"layers": [{"key": {"past": "nope", "present": "out_10"}, "value": {"past": "in_11", "present": "out_11"}}]},
     "has no input 'nope'"),
    ({"layers": [{"key": {"past": "in_10", "present": "out_10", "layout": "bxyz"},
                  "value": {"past": "in_11", "present": "out_11"}}]}, "permutation"),
    ({"nolayers": []}, "not a valid map"),
])
def test_bad_kv_map_is_refused(tmp_path, spec, message):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(BadInputError, match=message):
        load_kv_map(ir.serde.deserialize_model(build_decoder("gpt2", layers=1, heads=2)), path)


def test_sdpa_export_scales_keys_before_the_matmul(tmp_path):
    """torch.onnx's SDPA decomposition multiplies K by sqrt(scale) between the cache and Q.K^T."""
    import torch
    from transformers import LlamaForCausalLM

    from models.export import export_dynamo
    from models.train import fixture_config

    torch.manual_seed(0)
    config = fixture_config()
    config.num_hidden_layers = 2
    path = export_dynamo(LlamaForCausalLM(config).eval(), tmp_path / "sdpa")  # default: sdpa attention
    model = load_model(path)
    kinds = {n.op_type for n in model.graph}
    assert "Softmax" in kinds
    kv = find_kv_cache(model)
    assert [(t.layer, t.kind) for t in kv.tensors] == [(0, "key"), (0, "value"), (1, "key"), (1, "value")]
    runs(onnx.load(path), kv)
