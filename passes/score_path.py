"""The one definition of an attention's score path: from its score MatMul (Q.K^T) to its Softmax.

Discovery (find_kv_cache) follows it to tell keys from values; fusion (fuse_gqa) reads the scale
factor on it; the static decode graph (static_decode) places its attention bias on it. All three
walk the same ops, `SCORE_PATH_OPS`; a rewrite that can represent only some of them refuses the
others by name (`refuse_other_ops`), instead of not finding the Softmax.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import onnx_ir as ir

from kvcompile.errors import UnsupportedModelError

# Ops that move or re-type data without mixing positions: the cache keeps its identity through them.
LAYOUT_OPS = frozenset(
    {"Cast", "Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Tile",
     "Flatten", "DequantizeLinear", "QuantizeLinear", "Slice", "Split", "Gather"}
)
# What may sit between Q.K^T and its Softmax (layout moves, scaling, additive or selective
# masking, soft-capping, clipping), and between the Softmax and P.V (dropout, casts).
SCORE_PATH_OPS = LAYOUT_OPS | {"Mul", "Div", "Add", "Sub", "Where", "Tanh", "Max", "Min", "Clip", "Dropout"}


@dataclass(frozen=True)
class ScorePath:
    """The nodes from Q.K^T to the Softmax. `steps` holds each node after the MatMul with the
    index of its input that comes from the MatMul's side, in order; the Softmax is the last."""

    matmul: ir.Node
    steps: tuple[tuple[ir.Node, int], ...]

    @property
    def softmax(self) -> ir.Node:
        return self.steps[-1][0]

    def between(self) -> list[tuple[ir.Node, int]]:
        """The steps strictly between Q.K^T and the Softmax."""
        return list(self.steps[:-1])


def score_path(matmul: ir.Node) -> ScorePath | None:
    """The shortest path from `matmul` through SCORE_PATH_OPS to a Softmax (None if there is none)."""
    parents: dict[int, tuple[ir.Node, int]] = {}
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
                return ScorePath(matmul, tuple(_steps(matmul, child, parents)))
            if child.op_type in SCORE_PATH_OPS:
                queue.append(child)
    return None


def _steps(matmul: ir.Node, softmax: ir.Node, parents: dict[int, tuple[ir.Node, int]]) -> list[tuple[ir.Node, int]]:
    steps, node = [], softmax
    while node is not matmul:
        parent, index = parents[id(node)]
        steps.append((node, index))
        node = parent
    return steps[::-1]


def refuse_other_ops(path: ScorePath, handled: frozenset[str], rewrite: str) -> None:
    """Refuse, naming it, the first op on the path `rewrite` cannot represent."""
    for node, _ in path.between():
        if node.op_type not in handled:
            raise UnsupportedModelError(f"{node.op_type} ({node.name}) between Q.K^T and its Softmax: {rewrite} "
                                        f"handles only {', '.join(sorted(handled))} there")
