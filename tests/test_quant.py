"""kvcompile.quant matches ONNX QuantizeLinear/DequantizeLinear as onnxruntime runs them.

Property tests (hypothesis) draw tensors, scales and grids and compare quant.py with real
onnxruntime sessions: codes against QuantizeLinear (uint8 zero point, saturated onto the grid),
4-bit round trips against QuantizeLinear/DequantizeLinear on ONNX UINT4 tensors, and packing
against ONNX's own 4-bit packing.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from kvcompile import quant

FLOATS = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
SCALES = st.floats(min_value=0.0010000000474974513, max_value=10.0, allow_nan=False, width=32)


def session(nodes, inputs, outputs, initializers, opset=21) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_codes(x: np.ndarray, scale: float, zero_point: int, bits: int) -> np.ndarray:
    """QuantizeLinear to uint8 with the zero point, then saturate onto the bits grid."""
    s = session(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("Clip", ["q", "lo", "hi"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, list(x.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("zp", TensorProto.UINT8, [], [zero_point]),
         helper.make_tensor("lo", TensorProto.UINT8, [], [0]),
         helper.make_tensor("hi", TensorProto.UINT8, [], [quant.code_max(bits)])],
    )
    return s.run(None, {"x": x})[0]


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, st.integers(1, 64), elements=FLOATS), scale=SCALES,
       bits=st.sampled_from(quant.SUPPORTED_BITS), data=st.data())
def test_quantize_matches_onnxruntime(x, scale, bits, data):
    zero_point = data.draw(st.integers(0, quant.code_max(bits)))
    expected = ort_codes(x, scale, zero_point, bits)
    np.testing.assert_array_equal(quant.quantize(x, scale, zero_point, bits), expected)


@settings(max_examples=60, deadline=None)
@given(codes=arrays(np.uint8, st.integers(1, 64), elements=st.integers(0, 15)), scale=SCALES,
       zero_point=st.integers(0, 15))
def test_dequantize_matches_onnxruntime(codes, scale, zero_point):
    s = session(
        [helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, list(codes.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(codes.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("zp", TensorProto.UINT8, [], [zero_point])],
    )
    np.testing.assert_array_equal(quant.dequantize(codes, scale, zero_point), s.run(None, {"q": codes})[0])


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, st.integers(1, 64), elements=FLOATS), scale=SCALES)
def test_4bit_round_trip_matches_onnx_uint4(x, scale):
    """fake_quantize on the symmetric 4-bit grid == QuantizeLinear->DequantizeLinear on UINT4."""
    s = session(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("zp", TensorProto.UINT4, [], [8])],
    )
    zero_point = quant.symmetric_zero_point(4)
    np.testing.assert_array_equal(quant.fake_quantize(x, scale, zero_point, 4), s.run(None, {"x": x})[0])


def test_round_half_to_even_like_onnx():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    np.testing.assert_array_equal(quant.quantize(x, 1.0, 8, 4), ort_codes(x, 1.0, 8, 4))
    np.testing.assert_array_equal(quant.quantize(x, 1.0, 8, 4), [8, 10, 10, 8, 6, 6])


@given(codes=arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 4).map(lambda n: 2 * n)),
                    elements=st.integers(0, 15)))
def test_4bit_packing_is_onnx_order(codes):
    """Along the last axis, pack() gives exactly ONNX's UINT4 raw bytes (first code low nibble)."""
    onnx_bytes = numpy_helper.from_array(codes.astype(ml_dtypes.uint4)).raw_data
    assert quant.pack(codes, 4, axis=-1).tobytes() == onnx_bytes


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_pack_unpack_round_trip(bits, axis):
    rng = np.random.default_rng(bits * 10 + axis)
    shape = [4, 4, 4]
    codes = rng.integers(0, quant.code_max(bits) + 1, shape).astype(np.uint8)
    packed = quant.pack(codes, bits, axis)
    assert packed.shape[axis] == shape[axis] // quant.codes_per_byte(bits)
    np.testing.assert_array_equal(quant.unpack(packed, bits, axis), codes)


def test_symmetric_scale_maps_absmax_to_top_level():
    absmax = np.array([[0.0, 1.0, 7.0]], np.float32)
    scale = quant.symmetric_scale(absmax, 4)
    assert scale[0, 2] == np.float32(1.0)
    assert quant.quantize(np.float32(7.0), scale[0, 2], 8, 4) == 15
    assert scale[0, 0] > 0, "an all-zero channel still gets a usable (tiny) scale"
    assert quant.quantize(np.float32(0.0), scale[0, 0], 8, 4) == 8


def test_asymmetric_params_cover_range():
    scale, zero_point = quant.asymmetric_params(np.float32(-1.0), np.float32(3.0), 4)
    x = np.linspace(-1, 3, 50, dtype=np.float32)
    error = np.abs(quant.fake_quantize(x, scale, zero_point, 4) - x)
    assert error.max() <= scale / 2 + 1e-6


def test_codec_per_channel_broadcast_round_trip():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
    absmax = np.abs(x).max(axis=(0, 2), keepdims=True)
    codec = quant.Codec(4, quant.symmetric_scale(absmax, 4), 8, pack_axis=3)
    packed, scale, zero_point = codec.encode(x)
    assert packed.shape == (2, 3, 5, 4) and packed.dtype == np.uint8
    assert scale is None and zero_point is None, "static codecs store no per-token parameters"
    np.testing.assert_allclose(codec.decode(packed), x, atol=float(codec.scale.max()) / 2 + 1e-6)


def reference_dynamic(x: np.ndarray, group: int, bits: int, symmetric: bool) -> np.ndarray:
    """A plain-loop reference of per-group dynamic quantization along the last axis."""
    out = np.empty_like(x)
    levels = (1 << bits) - 1
    for index in np.ndindex(*x.shape[:-1]):
        for start in range(0, x.shape[-1], group):
            chunk = x[index][start : start + group].astype(np.float32)
            if symmetric:
                scale = np.float32(max(np.float32(np.abs(chunk).max() / np.float32((1 << (bits - 1)) - 1)), quant.DYNAMIC_SCALE_FLOOR))
                zero_point = 1 << (bits - 1)
            else:
                scale = np.float32(max(np.float32((chunk.max() - chunk.min()) / np.float32(levels)), quant.DYNAMIC_SCALE_FLOOR))
            scale = np.float32(np.float16(scale))
            if not symmetric:
                zero_point = int(np.clip(np.rint(-chunk.min() / scale), 0, levels))
            codes = np.clip(np.rint(chunk / scale) + zero_point, 0, levels)
            out[index][start : start + group] = (codes - zero_point) * scale
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_codec_matches_loop_reference(bits, group, symmetric):
    x = np.random.default_rng(bits + group).normal(size=(2, 3, 5, 16)).astype(np.float32) * 3
    codec = quant.Codec(bits, None, None, pack_axis=3, group=group, symmetric=symmetric)
    packed, scale, zero_point = codec.encode(x)
    assert scale.dtype == np.float16 and scale.shape == (2, 3, 5, 16 // group)
    assert (zero_point is None) == symmetric
    np.testing.assert_array_equal(codec.decode(packed, scale, zero_point), reference_dynamic(x, group, bits, symmetric))


def test_dynamic_scales_depend_on_each_token_alone():
    """Quantizing a sequence at once or token by token stores identical codes and scales."""
    x = np.random.default_rng(3).normal(size=(1, 2, 9, 16)).astype(np.float32)
    x[:, :, 4] = 0.0  # an all-zero token gets the floor scale, not a neighbour's
    for symmetric in (True, False):
        codec = quant.Codec(4, None, None, pack_axis=3, group=8, symmetric=symmetric)
        whole = codec.encode(x)
        pieces = [codec.encode(x[:, :, t : t + 1]) for t in range(9)]
        for i, part in enumerate(whole):
            if part is None:
                continue
            np.testing.assert_array_equal(part, np.concatenate([p[i] for p in pieces], axis=2))
