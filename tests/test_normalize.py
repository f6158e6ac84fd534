"""NormalizeExportPass: exporter artifacts folded away so discovery sees the cache's dataflow."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvcompile.errors import UnsupportedModelError
from kvcompile.manifest import float_model_io
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.normalize import NormalizeExportPass
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from synthetic import build_decoder


def test_empty_concat_before_the_cache_is_folded_and_the_cache_found():
    """The TorchScript exporter concatenates the past onto an empty tensor before appending: a
    Concat with no present output behind it, which discovery took for an orphaned cache."""
    proto = build_decoder("llama", layers=2, empty_concat=True)
    with pytest.raises(UnsupportedModelError, match="no graph output carries"):
        find_kv_cache(ir.serde.deserialize_model(proto))
    model = ir.serde.deserialize_model(proto)
    assert NormalizeExportPass()(model).modified
    kv = find_kv_cache(model)
    assert [t.past_input for t in kv.tensors] == [f"past_key_values.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    normalized = ir.serde.serialize_model(model)
    onnx.checker.check_model(normalized, full_check=True)
    tokens = np.random.default_rng(0).integers(0, 32, (1, 6))
    before = Decoder(cpu_session(proto.SerializeToString()), float_model_io(kv, "before"))
    after = Decoder(cpu_session(normalized.SerializeToString()), float_model_io(kv, "after"))
    caches = before.new_cache(1), after.new_cache(1)
    for chunk in (tokens[:, :4], tokens[:, 4:5], tokens[:, 5:6]):
        a, _ = before.step(caches[0], chunk)
        b, _ = after.step(caches[1], chunk)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_model_without_artifacts_is_left_alone():
    model = ir.serde.deserialize_model(build_decoder("llama", layers=1))
    nodes = len(model.graph)
    assert not NormalizeExportPass()(model).modified
    assert len(model.graph) == nodes
