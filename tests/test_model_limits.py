"""The model's context limits: read from the graph (position tables, rotary tables, sliding-window
caches) and its config files, and every context kvcompile runs kept within them."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from kvcompile.errors import BadInputError, UnsupportedModelError
from kvcompile.limits import ModelLimits, config_limits, read_limits
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.model_limits import graph_limits
from kvcompile.pipeline import CompileOptions, within_limits
from synthetic import build_decoder


def _with_position_table(rows: int, offset: int) -> ir.Model:
    """The llama synthetic decoder plus a learned position table added to its embeddings."""
    proto = build_decoder("llama", layers=1)
    graph = proto.graph
    graph.initializer.append(numpy_helper.from_array(np.zeros((rows, 16), np.float32), "wpe"))
    indices = "position_ids"
    if offset:
        graph.initializer.append(numpy_helper.from_array(np.array(offset, np.int64), "offset"))
        graph.node.insert(0, helper.make_node("Add", ["position_ids", "offset"], ["shifted"], name="shift"))
        indices = "shifted"
    embedding = graph.node[1 if offset else 0]  # the token embedding Gather
    assert embedding.op_type == "Gather"
    graph.node.insert(2 if offset else 1, helper.make_node("Gather", ["wpe", indices], ["pos"], name="pos_gather"))
    graph.node.insert(3 if offset else 2, helper.make_node("Add", [embedding.output[0], "pos"], ["x_pos"], name="add_pos"))
    for node in list(graph.node)[3 if offset else 2:]:
        for i, name in enumerate(node.input):
            if name == embedding.output[0] and node.name != "add_pos":
                node.input[i] = "x_pos"
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("rows,offset,positions", [(256, 0, 256), (2050, 2, 2048)])
def test_learned_position_table(rows, offset, positions):
    """GPT-2 indexes its table by position; OPT adds 2 to the position first."""
    model = _with_position_table(rows, offset)
    limits = graph_limits(model, find_kv_cache(model))
    assert [(limit.kind, limit.value) for limit in limits] == [("positions", positions)]
    assert "'wpe'" in limits[0].source


def test_rotary_table_of_group_query_attention():
    """onnxruntime-genai exports give GroupQueryAttention a cos_cache of one row per position."""
    model = ir.serde.deserialize_model(build_decoder("gqa_op", layers=1))
    cos = ir.Value(name="cos_cache", const_value=ir.tensor(np.zeros((512, 4), np.float32)))
    cos.shape = ir.Shape([512, 4])
    model.graph.register_initializer(cos)
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    gqa.resize_inputs(9)
    gqa.replace_input_with(7, cos)
    limits = graph_limits(model, find_kv_cache(model))
    assert [(limit.kind, limit.value) for limit in limits] == [("positions", 512)]


def test_sliding_window_cache():
    model = ir.serde.deserialize_model(build_decoder("llama", layers=2, window=6))
    limits = graph_limits(model, find_kv_cache(model))
    assert [(limit.kind, limit.value) for limit in limits] == [("window", 6)]
    assert "layer(s) 0, 1" in limits[0].source


def test_config_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"max_position_embeddings": 2048, "sliding_window": 4096, "use_sliding_window": False}))
    assert [(l.kind, l.value) for l in config_limits(tmp_path)] == [("positions", 2048)]
    (tmp_path / "config.json").write_text(json.dumps(
        {"n_positions": 256, "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}))
    assert [(l.kind, l.value) for l in config_limits(tmp_path)] == [("positions", 256), ("window", 64)]
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "genai_config.json").write_text(json.dumps(
        {"model": {"context_length": 1024, "decoder": {"sliding_window": {"window_size": 128}}}}))
    assert [(l.kind, l.value) for l in config_limits(tmp_path)] == [("positions", 1024), ("window", 128)]


def test_read_limits_takes_the_smallest(tmp_path):
    model = _with_position_table(300, 0)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024, "sliding_window": 96}))
    limits = read_limits(model, find_kv_cache(model), tmp_path / "model.onnx")
    assert (limits.max_context, limits.window) == (300, 96)
    assert any("position table" in fact for fact in limits.facts)


def test_contexts_stay_within_the_limits(tmp_path):
    def stages(*targets: str, **options):
        return CompileOptions(model=tmp_path / "m.onnx", targets=targets, **options).stages()

    def contexts(stages):
        return stages.texts.window, stages.texts.prefill, stages.target.max_context

    # The context it will run at: calibration and verification windows, and the static buffer.
    assert contexts(within_limits(stages("ort-cpu"), ModelLimits(None, None))) == (1024, 32, None)
    assert contexts(within_limits(stages("ort-cpu", max_context=4096), ModelLimits(None, None))) == (4096, 32, None)
    short = within_limits(stages("ort-cpu", "nnapi"), ModelLimits(100, None, ("context 100: test",)))
    assert contexts(short) == (100, 25, 100)
    # A sliding window bounds the static buffer only: the dynamic artifact is verified past it.
    assert contexts(within_limits(stages("tflite"), ModelLimits(4096, 64))) == (1024, 32, 64)
    with pytest.raises(BadInputError, match="--max-context 2048 is longer than the model's context limit, 1000"):
        within_limits(stages("qnn-htp", max_context=2048), ModelLimits(1000, None))
    with pytest.raises(BadInputError, match="--max-context 2048 is longer than the model's context limit, 1000"):
        within_limits(stages("ort-cpu", max_context=2048), ModelLimits(1000, None))
    with pytest.raises(BadInputError, match="--max-context 128 is longer than its attention window, 64"):
        within_limits(stages("tflite", max_context=128), ModelLimits(4096, 64))
    with pytest.raises(BadInputError, match="--max-context 8 is too short"):
        within_limits(stages("nnapi", max_context=8), ModelLimits(None, None))
    with pytest.raises(UnsupportedModelError, match="at most 8 tokens"):
        within_limits(stages("ort-cpu"), ModelLimits(8, None))


def test_prefill_length_fits_the_static_buffer(tmp_path):
    """qnn-htp's prefill graph takes 128 tokens a call, or half a shorter buffer; 0 means none; a
    length the buffer cannot hold is refused before anything runs."""
    def prefill_len(buffer_limit: int | None, **options) -> int | None:
        stages = CompileOptions(model=tmp_path / "m.onnx", targets=("qnn-htp",), **options).stages()
        return within_limits(stages, ModelLimits(buffer_limit, None)).target.prefill_len

    assert prefill_len(None) == 128 and prefill_len(100) == 50
    assert prefill_len(None, prefill_len=0) == 0 and prefill_len(None, prefill_len=1) == 0
    assert prefill_len(None, prefill_len=512) == 512
    with pytest.raises(BadInputError, match="--prefill-len 100 does not fit the static buffer of 100 tokens"):
        prefill_len(100, prefill_len=100)
    only_dynamic = CompileOptions(model=tmp_path / "m.onnx", targets=("ort-cpu",)).stages()
    assert within_limits(only_dynamic, ModelLimits(None, None)).target.prefill_len is None
