"""Cutting a traced model at points where a single feature map flows on.

The model's split into trunk and head, and the trunk's split into segments, cut the same way:
at a node of the traced graph after which exactly one value computed so far is still used. The
parts are GraphModules that share the model's parameters, and chained they compute what the
whole did: ``suffix(gm, n)(prefix(gm, n)(x)) == gm(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx
from torch import nn

from executor.classify import map_nodes, traced_trunk

__all__ = ["chain", "cut_points", "find_node", "map_cut_points", "prefix", "suffix"]


def cut_points(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the nodes after which exactly one value computed so far is used, in order."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=-1) for n in nodes}
    cuts = []
    open_values: set[torch.fx.Node] = set()
    for i, node in enumerate(nodes[:-1]):  # the output node is never a cut
        open_values = {n for n in open_values if last_use[n] > i}
        if last_use[node] > i:
            open_values.add(node)
        if node.op != "placeholder" and open_values == {node}:
            cuts.append(node.name)
    return cuts


def map_cut_points(trunk: nn.Module, n_axes: int = 2) -> list[str]:
    """The cut points of ``trace(trunk)`` where the single value is one feature map in
    (N, C, *spatial) layout: where a trunk can be cut into segments that each stream (its
    output is not one: nothing would be left after it).

    Raises:
        UnsupportedLayerError: the trunk does not stream as a whole.
    """
    traced = traced_trunk(trunk)
    maps = map_nodes(traced, n_axes)
    output = next(n for n in traced.gm.graph.nodes if n.op == "output").args[0]
    last = output.name if isinstance(output, torch.fx.Node) else None
    return [name for name in cut_points(traced.gm) if name in maps and name != last]


def find_node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node | None:
    """The node called ``name``, or else the last node of module ``name`` (a call of it or of
    a submodule, or code of its forward: fx records the module stack of every node); None if
    there is neither. How a user names where to cut: ``--split``, ``--cut``."""
    found = None
    for node in gm.graph.nodes:
        if node.name == name or _inside(node, name):
            found = node
    return found


def _inside(node: torch.fx.Node, module: str) -> bool:
    paths = [str(node.target)] if node.op == "call_module" else []
    paths += [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    return any(p == module or p.startswith(module + ".") for p in paths)


def _index(gm: torch.fx.GraphModule, name: str) -> tuple[list[torch.fx.Node], int]:
    nodes = list(gm.graph.nodes)
    for i, node in enumerate(nodes):
        if node.name == name:
            return nodes, i
    raise KeyError(f"no node '{name}' in the graph")


def prefix(gm: torch.fx.GraphModule, name: str, class_name: str = "Trunk") -> torch.fx.GraphModule:
    """The graph up to and including node ``name``, returning its value."""
    nodes, index = _index(gm, name)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes[: index + 1]:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[nodes[index]])
    return torch.fx.GraphModule(gm, graph, class_name=class_name)


def suffix(gm: torch.fx.GraphModule, name: str, class_name: str = "Head") -> torch.fx.GraphModule:
    """The graph after node ``name``, taking its value as the input."""
    nodes, index = _index(gm, name)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {nodes[index]: graph.placeholder("features")}
    for node in nodes[index + 1 :]:
        env[node] = graph.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(gm, graph, class_name=class_name)


def chain(gm: torch.fx.GraphModule, cuts: Sequence[str]) -> list[torch.fx.GraphModule]:
    """The parts of ``gm`` between consecutive ``cuts`` (cut points, in graph order)."""
    parts: list[torch.fx.GraphModule] = []
    rest = gm
    for k, name in enumerate(cuts):
        parts.append(prefix(rest, name, class_name=f"Segment{k + 1}"))
        rest = suffix(rest, name, class_name=f"Segment{k + 2}")
    return [*parts, rest]
