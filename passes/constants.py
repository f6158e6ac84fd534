"""Reading constants out of a graph: initializers and Constant nodes alike (onnx_ir's
`get_const_tensor`), as the small numpy values analyses compare against."""

from __future__ import annotations

import onnx_ir as ir


def constant_ints(value: ir.Value | None) -> list[int] | None:
    """The integers a constant value holds (flattened), or None if it is not a constant."""
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node
        return None
    return None if tensor is None else [int(x) for x in tensor.numpy().reshape(-1)]
