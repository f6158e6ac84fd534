"""The path from an attention's score MatMul (Q.K^T) to its Softmax, shared by the passes that
need to read it (fusion: the scale factor) or rewrite it (static decode: the mask)."""

from __future__ import annotations

from collections import deque

import onnx_ir as ir

# (parent node, input index of the child) for every node on the path, keyed by id(child).
Parents = dict[int, tuple[ir.Node, int]]


def path_to_softmax(matmul: ir.Node, through: frozenset[str]) -> tuple[ir.Node | None, Parents]:
    """Breadth-first from `matmul` through ops in `through` to the first Softmax (None if none)."""
    parents: Parents = {}
    queue, seen = deque([matmul]), {id(matmul)}
    while queue:
        node = queue.popleft()
        for use in node.outputs[0].uses():
            child = use.node
            if id(child) in seen:
                continue
            seen.add(id(child))
            parents[id(child)] = (node, use.idx)
            if child.op_type == "Softmax":
                return child, parents
            if child.op_type in through:
                queue.append(child)
    return None, parents
