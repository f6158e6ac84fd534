"""Translate kvcompile's static decode graph (ONNX) into a TensorFlow function, op by op.

Why not onnx2tf: its releases for Python 3.11 pin onnx 1.19, onnxruntime 1.23 and numpy 1.26
(kvcompile needs onnx 1.23, onnxruntime 1.32, numpy 2), and its current release needs Python
3.12. The static decode graph uses a small, fixed set of ops with static shapes, so a direct
translation is short, and it lets kvcompile choose TF ops that convert to TFLite builtins only
(no Flex ops): FLOOR / DIV / MUL / ADD / CAST for the 4-bit packing, BATCH_MATMUL, SOFTMAX, ...

`tf_module(model)` returns a tf.Module holding the weights as variables, whose `serving_default`
tf.function has the ONNX graph's input and output names as its input signature and output dict
keys; a graph with an op outside `TRANSLATIONS` is refused with the op's name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from kvcompile.errors import TargetError

_TF_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _const(values: dict, name: str) -> np.ndarray:
    value = values.get(name)
    if not isinstance(value, np.ndarray):
        raise TargetError(f"tflite: {name!r} must be a constant in the static graph")
    return value


def _reshape_target(tf, x, shape: np.ndarray):
    """ONNX Reshape semantics: 0 copies the input's dim (allowzero=0), -1 is inferred."""
    dims = [int(x.shape[i]) if d == 0 else int(d) for i, d in enumerate(shape.tolist())]
    return tf.reshape(x, dims)


def _slice(tf, x, starts, ends, axes=None, steps=None):
    rank = len(x.shape)
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes.tolist()]
    steps = [1] * len(axes) if steps is None else steps.tolist()
    index = [slice(None)] * rank
    for axis, start, end, step in zip(axes, starts.tolist(), ends.tolist(), steps):
        end = None if end >= np.iinfo(np.int64).max // 2 else end
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _translations(tf) -> dict[str, Callable]:
    """ONNX op -> function(inputs, attributes, constant values) returning TF tensor(s)."""
    def binary(fn):
        return lambda ins, at, v: fn(ins[0], ins[1])

    return {
        "Add": binary(tf.add), "Sub": binary(tf.subtract), "Mul": binary(tf.multiply), "Div": binary(tf.divide),
        "MatMul": binary(tf.linalg.matmul), "Pow": binary(tf.pow),
        "Neg": lambda ins, at, v: tf.negative(ins[0]),
        "Sqrt": lambda ins, at, v: tf.sqrt(ins[0]),
        "Floor": lambda ins, at, v: tf.floor(ins[0]),
        "Sin": lambda ins, at, v: tf.sin(ins[0]),
        "Cos": lambda ins, at, v: tf.cos(ins[0]),
        "Sigmoid": lambda ins, at, v: tf.sigmoid(ins[0]),
        "Identity": lambda ins, at, v: tf.identity(ins[0]),
        "Softmax": lambda ins, at, v: tf.nn.softmax(ins[0], axis=at.get("axis", -1)),
        "Cast": lambda ins, at, v: tf.cast(ins[0], _TF_DTYPES[at["to"]]),
        "Clip": lambda ins, at, v: tf.clip_by_value(ins[0], ins[1], ins[2]),
        "Transpose": lambda ins, at, v: tf.transpose(ins[0], at["perm"]),
        "Concat": lambda ins, at, v: tf.concat(list(ins), axis=at["axis"]),
        "Gather": lambda ins, at, v: tf.gather(ins[0], ins[1], axis=at.get("axis", 0)),
        "Reshape": lambda ins, at, v: _reshape_target(tf, ins[0], v["shape"]),
        "Unsqueeze": lambda ins, at, v: _unsqueeze(tf, ins[0], v["axes"]),
        "Squeeze": lambda ins, at, v: tf.squeeze(ins[0], axis=[int(a) for a in v["axes"]]),
        "Slice": lambda ins, at, v: _slice(tf, ins[0], *v["slice"]),
        "ReduceMean": lambda ins, at, v: tf.reduce_mean(ins[0], axis=[int(a) for a in v["axes"]],
                                                        keepdims=bool(at.get("keepdims", 1))),
    }


def _unsqueeze(tf, x, axes: np.ndarray):
    rank = len(x.shape) + len(axes)
    for axis in sorted(int(a) % rank for a in axes):
        x = tf.expand_dims(x, axis)
    return x


def _shape_operands(node: onnx.NodeProto, values: dict) -> dict:
    """The constant operands some ops take as inputs (shapes, axes, slice bounds)."""
    if node.op_type == "Reshape":
        return {"shape": _const(values, node.input[1])}
    if node.op_type in ("Unsqueeze", "Squeeze", "ReduceMean") and len(node.input) > 1:
        return {"axes": _const(values, node.input[1])}
    if node.op_type in ("Unsqueeze", "Squeeze", "ReduceMean"):
        return {"axes": np.array(_attrs(node).get("axes", []))}
    if node.op_type == "Slice":
        return {"slice": [_const(values, n) if n else None for n in list(node.input[1:]) + [""] * (5 - len(node.input))]}
    return {}


def is_weight(array: np.ndarray) -> bool:
    """Whether a constant is held as a tf.Variable (`tf_module`): floating-point tensors of two or
    more dimensions (weight matrices, embedding tables, cache scales); shape operands and scalars
    stay constants, which the translation reads as numpy values."""
    return array.ndim >= 2 and np.issubdtype(array.dtype, np.floating)


def tf_module(model: onnx.ModelProto):
    """A tf.Module whose `serving_default` tf.function computes `model` (static shapes), keyed by
    the ONNX I/O names. The weights are the module's tf.Variables, not constants in the traced
    graph: TFLiteConverter copies a graph's constants through each of its GraphDef and MLIR
    stages (one 113 MB float32 matrix as a constant peaked at 2.9 GB RSS, as a variable at 1.5 GB;
    SmolLM2's graph did not fit in 19.8 GB). The converter freezes the variables into the same
    constant buffers, so the .tflite is the same."""
    import tensorflow as tf

    graph = model.graph
    translations = _translations(tf)
    unknown = sorted({n.op_type for n in graph.node} - set(translations))
    if unknown:
        raise TargetError(f"tflite: kvcompile does not translate {', '.join(unknown)} to TensorFlow")
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    module = tf.Module()
    module.weights = {name: tf.Variable(array, trainable=False)
                      for name, array in constants.items() if is_weight(array)}
    constants = {name: array for name, array in constants.items() if name not in module.weights}
    signature = [tf.TensorSpec([d.dim_value for d in i.type.tensor_type.shape.dim],
                               _TF_DTYPES[i.type.tensor_type.elem_type], name=i.name) for i in graph.input]
    names = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]

    def operand(name: str, tensors: dict):
        if not name:
            return None
        if name in tensors:
            return tensors[name]
        if name in module.weights:
            return module.weights[name].read_value()
        return tf.constant(constants[name])

    def run(*args):
        tensors = dict(zip(names, args))
        for node in graph.node:
            if node.op_type == "Constant":
                continue
            inputs = [operand(n, tensors) for n in node.input]
            result = translations[node.op_type](inputs, _attrs(node), _shape_operands(node, constants))
            tensors[node.output[0]] = result
        return {name: tensors[name] for name in outputs}

    module.serving_default = tf.function(run, input_signature=signature)
    return module


def tf_function(model: onnx.ModelProto):
    """The tf.function of `tf_module(model)` (its module kept alive with it)."""
    return tf_module(model).serving_default
