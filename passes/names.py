"""One name allocator for everything kvcompile inserts into a graph.

ONNX requires every value (graph input, initializer, node output) to have a name unique in the
model, and onnxruntime rejects duplicate node names in some builds; onnx_ir keeps what it is
given. Passes that add nodes, initializers or graph I/O take their names from a
`NameAllocator`: it reads every name the graph (and its subgraphs) already uses, once, and
hands out each stem unchanged if free, else with the first free `_2`, `_3`, ... suffix, so
names are unique by construction however many fragments a pass inserts (several Shape readers
of one cache input used to collide).

Create one allocator per pass run (`NameAllocator(graph)` at the start of `call`) and share it
between the fragments that pass builds: names other code added before are seen by the scan.
"""

from __future__ import annotations

import onnx_ir as ir


class NameAllocator:
    def __init__(self, graph: ir.Graph):
        self._taken: set[str] = set()
        for value in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
            self._add(value.name)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self._add(node.name)
            for value in (*node.inputs, *node.outputs):
                if value is not None:
                    self._add(value.name)
        for subgraph_node in ir.traversal.RecursiveGraphIterator(graph):
            for attribute in subgraph_node.attributes.values():
                for subgraph in _subgraphs(attribute):
                    for value in (*subgraph.inputs, *subgraph.initializers.values()):
                        self._add(value.name)

    def _add(self, name: str | None) -> None:
        if name:
            self._taken.add(name)

    def name(self, stem: str) -> str:
        """`stem` if no value or node uses it yet, else `stem_k` for the smallest free k >= 2."""
        candidate, k = stem, 2
        while candidate in self._taken:
            candidate, k = f"{stem}_{k}", k + 1
        self._taken.add(candidate)
        return candidate

    def rename(self, value: ir.Value, stem: str) -> None:
        """Give `value` a fresh unique name derived from `stem` (its old name stays reserved)."""
        value.name = self.name(stem)

    def reserve(self, name: str) -> None:
        """Mark `name` as used (a name taken over from a value that is being replaced)."""
        self._taken.add(name)


def _subgraphs(attribute) -> list[ir.Graph]:
    if not isinstance(attribute, ir.Attr) or attribute.is_ref():
        return []
    if attribute.type == ir.AttributeType.GRAPH:
        return [attribute.as_graph()]
    if attribute.type == ir.AttributeType.GRAPHS:
        return list(attribute.as_graphs())
    return []


def prefix_intermediate_names(model: ir.Model, prefix: str) -> None:
    """Put `prefix` before the name of every node and every value a node computes, except graph
    outputs: two graphs built from one model then share only their input, output and weight
    (initializer) names."""
    graph = model.graph
    keep = {v.name for v in graph.outputs} | set(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.name:
            node.name = prefix + node.name
        for value in node.outputs:
            if value.name and value.name not in keep:
                value.name = prefix + value.name
