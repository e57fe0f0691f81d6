"""Load a user's ``model.py`` and split the model into a streamable trunk and a head.

The convention, kept small:

* ``build_model()`` returns a ``torch.nn.Module`` (or a module-level ``model`` is one);
* optionally ``split(model)`` returns ``(trunk, head)`` with ``head(trunk(x)) == model(x)``.

Without ``split``, the trunk ends at the last point of the model's traced graph where a single
feature map is all that flows on, and everything before it can be streamed: that is before the
first non-local layer (global pooling, flatten, a linear classifier...). ``--split NAME`` ends the
trunk after the module (or graph node) called NAME instead.

The loaded model is put in eval mode: BatchNorm inside the trunk streams only with frozen
statistics (its affine weights still train).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch.fx
from torch import nn

from executor import StreamingError, UnsupportedLayerError, analyze_trunk

__all__ = ["LoadedModel", "ModelFileError", "load_model_file", "split_model"]

log = logging.getLogger(__name__)


class ModelFileError(StreamingError):
    """The model file cannot be loaded or split; the message says how to fix it."""


@dataclass(frozen=True)
class LoadedModel:
    """A user's model, split for streaming.

    Attributes:
        path: the model file.
        entry: how the model was obtained (``build_model()`` or ``model``).
        model: the whole model (eval mode).
        trunk: the streamed part; shares parameters with ``model``.
        head: the rest, applied to the trunk's output map.
        split: where the trunk ends, in words.
    """

    path: Path
    entry: str
    model: nn.Module
    trunk: nn.Module
    head: nn.Module
    split: str

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_model_file(path: str | Path, split: str = "auto") -> LoadedModel:
    """Import ``path``, build the model and split it.

    Args:
        path: a Python file defining ``build_model()`` or ``model`` (and maybe ``split``).
        split: ``"auto"`` (default: the file's ``split`` if it has one, else the largest
            streamable prefix) or the name of the module after which the trunk ends.

    Raises:
        ModelFileError: missing or broken file, no model in it, no streamable trunk.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file '{path}' does not exist; pass the path of your model.py")
    namespace = _import(path)
    if callable(getattr(namespace, "build_model", None)):
        entry, model = "build_model()", _call(path, namespace.build_model, "build_model()")
    elif isinstance(getattr(namespace, "model", None), nn.Module):
        entry, model = "model", namespace.model
    else:
        raise ModelFileError(
            f"'{path}' defines neither build_model() nor a module-level `model`; add "
            "`def build_model(): return <your torch.nn.Module>`"
        )
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"{entry} in '{path}' returned {type(model).__name__}, not a torch.nn.Module"
        )
    model.eval()
    user_split = getattr(namespace, "split", None)
    if split == "auto" and callable(user_split):
        parts = _call(path, lambda: user_split(model), "split(model)")
        if not (isinstance(parts, tuple) and len(parts) == 2 and all(
            isinstance(p, nn.Module) for p in parts
        )):  # fmt: skip
            raise ModelFileError(f"split(model) in '{path}' must return (trunk, head) modules")
        trunk, head = parts
        analyze_trunk(trunk)  # refuse an unstreamable trunk now, naming the layer
        return LoadedModel(path, entry, model, trunk, head, "split(model) in the model file")
    trunk, head, where = split_model(model, None if split == "auto" else split)
    return LoadedModel(path, entry, model, trunk, head, where)


def _import(path: Path) -> object:
    name = f"tileplan_user_model_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"'{path}' is not a Python file; pass your model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ModelFileError(f"importing '{path}' failed: {type(err).__name__}: {err}") from err
    return module


def _call(path: Path, fn: object, what: str) -> object:
    try:
        return fn()  # type: ignore[operator]
    except Exception as err:
        raise ModelFileError(f"{what} in '{path}' failed: {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------------------------
# Splitting a traced model
# --------------------------------------------------------------------------------------------


def split_model(model: nn.Module, name: str | None = None) -> tuple[nn.Module, nn.Module, str]:
    """Split ``model`` into (trunk, head) at a point where one feature map flows on.

    Args:
        model: the whole model.
        name: end the trunk after this module (qualified name) or graph node; ``None`` picks
            the largest streamable prefix.

    Returns:
        ``(trunk, head, description)``; both parts share the model's parameters.

    Raises:
        ModelFileError: the model cannot be traced, ``name`` is not a cut point, or no prefix
            of the model can be streamed.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:
        raise ModelFileError(
            f"cannot trace {type(model).__name__} with torch.fx to find the trunk "
            f"({type(err).__name__}); define split(model) -> (trunk, head) in the model file"
        ) from err
    nodes = list(gm.graph.nodes)
    cuts = _single_value_cuts(nodes)
    if name is not None:
        return _split_at_name(gm, nodes, cuts, name)
    last_error: UnsupportedLayerError | None = None
    for index in reversed(cuts):
        trunk = _prefix(gm, nodes, index)
        try:
            analyze_trunk(trunk)
        except UnsupportedLayerError as err:
            last_error = err
            continue
        where = _describe(nodes[index])
        log.info("trunk ends after %s", where)
        return trunk, _suffix(gm, nodes, index), f"auto: trunk ends after {where}"
    raise ModelFileError(
        f"no part of {type(model).__name__} can be streamed ({last_error}); "
        "define split(model) in the model file"
    )


def _split_at_name(
    gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], cuts: list[int], name: str
) -> tuple[nn.Module, nn.Module, str]:
    owned = [
        i for i, n in enumerate(nodes)
        if n.name == name or (n.op == "call_module" and (
            str(n.target) == name or str(n.target).startswith(name + ".")))
    ]  # fmt: skip
    if not owned:
        modules = [str(n.target) for n in nodes if n.op == "call_module"]
        raise ModelFileError(
            f"--split {name}: no module or node of that name; modules are e.g. "
            f"{', '.join(modules[-6:])}"
        )
    index = owned[-1]
    if index not in cuts:
        raise ModelFileError(
            f"--split {name}: more than one value flows past it (e.g. a skip connection); "
            "choose the end of a whole block"
        )
    trunk = _prefix(gm, nodes, index)
    analyze_trunk(trunk)
    return trunk, _suffix(gm, nodes, index), f"trunk ends after {_describe(nodes[index])}"


def _single_value_cuts(nodes: list[torch.fx.Node]) -> list[int]:
    """Indices i such that node i is the only value computed up to i that is used after i."""
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=-1) for n in nodes}
    cuts = []
    open_values: set[torch.fx.Node] = set()
    for i, node in enumerate(nodes[:-1]):  # the output node is never a cut
        open_values = {n for n in open_values if last_use[n] > i}
        if last_use[node] > i:
            open_values.add(node)
        if node.op != "placeholder" and open_values == {node}:
            cuts.append(i)
    return cuts


def _prefix(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], index: int) -> nn.Module:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes[: index + 1]:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[nodes[index]])
    return torch.fx.GraphModule(gm, graph, class_name="Trunk")


def _suffix(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], index: int) -> nn.Module:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {nodes[index]: graph.placeholder("features")}
    for node in nodes[index + 1 :]:
        env[node] = graph.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(gm, graph, class_name="Head")


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}'"
    stack = node.meta.get("nn_module_stack")
    if stack:
        return f"'{list(stack.values())[-1][0]}' ({node.name})"
    return f"'{node.name}'"
