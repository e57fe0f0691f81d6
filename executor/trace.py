"""Tracing real model code into a ``torch.fx`` graph that ``executor.graph`` can classify.

Real CNN code is not always traceable as a whole: it asserts on shapes, computes 'same' padding
from the input size, or branches on data. ``trace`` copes with it the way the code's authors
meant it to be read:

* ``assert`` statements become ``torch._assert`` nodes (``trace_asserts``), so shape checks
  are kept and checked, not a reason to give up;
* functions that compute padding from the input's size (timm's ``pad_same``, used by
  ``Conv2dSame``, ``MaxPool2dSame``, ``AvgPool2dSame``) are kept as single calls, so the
  geometry can compute their padding exactly for the whole image;
* modules known as a whole (timm's ``SpaceToDepth``, which reshapes with the input's size)
  stay single calls;
* a submodule whose forward cannot be traced (data-dependent control flow) becomes a leaf: one
  opaque call. The graph still holds everything around it, and ``executor.graph`` refuses the
  leaf by name if it ends up inside a trunk.
"""

from __future__ import annotations

import bisect
import dis
import importlib
import inspect
import operator
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from executor.errors import UnsupportedLayerError

__all__ = [
    "INPLACE_VIEW", "Traced", "functionalize", "same_padding_functions", "space_to_depth_types",
    "trace", "trace_leaves",
]  # fmt: skip


def _optional(*names: tuple[str, str]) -> tuple[Any, ...]:
    """The objects ``(module, attribute)`` of optional libraries that are already imported.

    A model can only hold a library's modules or call its functions once the library is
    imported, so nothing is imported here (timm costs a second and 200 MB to import)."""
    found = []
    for module, name in names:
        if module.partition(".")[0] not in sys.modules:
            continue
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def same_padding_functions() -> tuple[Callable[..., Any], ...]:
    """timm's dynamic 'same' padding helpers, when timm is imported."""
    return _optional(("timm.layers.padding", "pad_same"))


def space_to_depth_types() -> tuple[type[nn.Module], ...]:
    """Modules that ``executor.classify`` knows as a whole (their code reshapes with the
    input's size, which only the whole operation makes local): timm's SpaceToDepth."""
    return _optional(("timm.layers.space_to_depth", "SpaceToDepth"))


class _Tracer(torch.fx.Tracer):
    """fx's tracer with asserts traced, padding helpers wrapped, and opaque leaves."""

    def __init__(self, leaves: frozenset[type[nn.Module]]) -> None:
        super().__init__(autowrap_functions=same_padding_functions())
        self.trace_asserts = True
        # Buffers become graph attributes: code that changes one in place (a batch counter)
        # is then a node that runs when the graph runs, not once, for real, while tracing.
        self.proxy_buffer_attributes = True
        self.leaves = leaves

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        """``assert cond`` on a traced value: record ``torch._assert(cond)`` and go on.

        fx's own ``trace_asserts`` looks for the bytecode of Python 3.10 and older; this
        recognises the jump ops of 3.11 and later too. Any other use of a traced value as a
        condition is data-dependent control flow, refused as before.
        """
        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame and frame.f_back else None  # Proxy.__bool__'s
        if caller is not None and _asserts(caller):
            self.create_proxy("call_function", torch._assert, (obj, "assert in traced code"), {})
            return True
        return super().to_bool(obj)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            type(m) in self.leaves
            or isinstance(m, space_to_depth_types())
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:  # fmt: skip
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            # Remember the innermost module whose forward failed: it becomes a leaf.
            if not hasattr(err, "_tileplan_untraceable"):
                err._tileplan_untraceable = (type(m), str(err).strip())  # type: ignore[attr-defined]
            raise


def _asserts(frame: types.FrameType) -> bool:
    """Whether ``frame`` is evaluating the condition of an ``assert`` statement."""
    instructions = list(dis.get_instructions(frame.f_code))
    at = bisect.bisect_left(instructions, frame.f_lasti, key=lambda i: i.offset)
    if at + 1 >= len(instructions):
        return False
    jump, after = instructions[at], instructions[at + 1]
    return jump.opname in ("POP_JUMP_IF_TRUE", "POP_JUMP_FORWARD_IF_TRUE") and (
        after.opname == "LOAD_ASSERTION_ERROR"
        or (after.opname == "LOAD_GLOBAL" and after.argval == "AssertionError")
    )


@dataclass(frozen=True)
class Traced:
    """A traced module and the leaves that tracing could not see into.

    Attributes:
        gm: the graph module (sharing the traced module's parameters).
        opaque: qualified name of each leaf whose forward cannot be traced -> why (one line).
    """

    gm: torch.fx.GraphModule
    opaque: dict[str, str]


def trace_leaves(module: nn.Module, *, max_leaves: int = 64) -> Traced:
    """Trace ``module`` (never modified); see the module docstring.

    A ``GraphModule`` (e.g. a trunk cut out of a traced model) is taken as it is: its graph is
    its code.

    Raises:
        UnsupportedLayerError: the module's own forward cannot be traced.
    """
    if isinstance(module, torch.fx.GraphModule):
        return Traced(module, _opaque_calls(module))
    leaves: dict[type[nn.Module], str] = {}
    for _ in range(max_leaves + 1):
        tracer = _Tracer(frozenset(leaves))
        try:
            graph = tracer.trace(module)
        except Exception as err:
            failed = getattr(err, "_tileplan_untraceable", None)
            if failed is None or failed[0] in leaves or failed[0] is type(module):
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UnsupportedLayerError(
                    type(module).__name__,
                    f"its forward cannot be traced by torch.fx ({first})",
                    "make the forward free of data-dependent Python control flow, or define "
                    "split(model) in the model file",
                ) from err
            leaves[failed[0]] = failed[1].splitlines()[0] if failed[1] else "untraceable"
            continue
        gm = torch.fx.GraphModule(tracer.root, graph, class_name=type(module).__name__)
        opaque = {
            str(node.target): leaves[type(gm.get_submodule(str(node.target)))]
            for node in gm.graph.nodes
            if node.op == "call_module" and type(gm.get_submodule(str(node.target))) in leaves
        }
        return Traced(gm, opaque)
    raise UnsupportedLayerError(
        type(module).__name__, f"more than {max_leaves} submodule types cannot be traced",
        "define split(model) in the model file",
    )  # fmt: skip


# In-place operators and their out-of-place forms (``x += y`` is ``operator.iadd``).
_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor,
}  # fmt: skip
_NOT_MUTATING = frozenset({"requires_grad_", "share_memory_", "retain_grad"})
# Ops whose result is the tensor they read, whole (a change of one is a change of the other).
_ALIASES = frozenset(
    {"contiguous", "detach", "to", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda"}
)
# Ops whose result may view part of the tensor they read.
_VIEWS = frozenset({
    "getitem", "view", "reshape", "permute", "transpose", "expand", "expand_as", "squeeze",
    "unsqueeze", "flatten", "unflatten", "narrow", "select", "movedim", "moveaxis", "swapaxes",
    "swapdims", "t", "view_as", "reshape_as", "chunk", "split", "unbind", "tensor_split",
    "diagonal", "as_strided", "unfold", "split_with_sizes",
})  # fmt: skip
INPLACE_VIEW = "tileplan_inplace_view"  # node meta: an in-place change of a view, kept as is


def _op_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        inactive = isinstance(module, nn.modules.dropout._DropoutNd) and (
            not module.training or module.p == 0
        )
        return "contiguous" if isinstance(module, nn.Identity) or inactive else ""
    target = node.target
    return str(target) if node.op == "call_method" else getattr(target, "__name__", "")


def _out_of_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    """How to compute ``node`` without changing its first argument: a target or kwargs for
    the copied node, ``"clone"`` for a module that works in place (its input is copied), or
    None when ``node`` changes nothing."""
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and name not in _NOT_MUTATING and hasattr(torch.Tensor, name[:-1]):
            return name[:-1]
    elif node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return _INPLACE_OPERATORS[node.target]
        if node.kwargs.get("inplace") is True:
            return {**node.kwargs, "inplace": False}
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):  # torch.relu_, F.relu_
            for home in (torch, torch.nn.functional):
                if getattr(home, name, None) is node.target and hasattr(home, name[:-1]):
                    return getattr(home, name[:-1])
    elif node.op == "call_module" and getattr(gm.get_submodule(str(node.target)), "inplace",
                                              False) is True:  # fmt: skip
        return "clone"
    return None


def functionalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with in-place changes of computed values made out-of-place (a copy; ``gm``
    itself when it has none).

    ``x.mul_(gain)`` as a statement changes ``x`` for every later use, but the traced graph
    still reads the node of ``x``: run whole, the graph mutates the same tensor; cut into parts
    that keep maps whole and crop them, it would not. So the change becomes ``y = x.mul(gain)``
    and every later use of ``x``, and of what is ``x`` whole under another name
    (``x.contiguous()``, an ``nn.Identity``), reads ``y``: what the code computes. Modules
    that work in place (``nn.ReLU(inplace=True)``) get a copy of their input when something
    else reads it. An in-place change of a view of part of a map is left as it is and marked
    (``INPLACE_VIEW``): it changes the map it views, which only the whole graph computes.
    In-place changes of buffers and parameters (a batch counter) are effects, left as they
    are.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    root: dict[torch.fx.Node, torch.fx.Node] = {}  # original node -> the tensor it is whole
    views: set[torch.fx.Node] = set()  # original nodes that may view part of a tensor
    changed = False
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        name = _op_name(gm, node)
        if source is not None and name in _ALIASES:
            root[node] = root.get(source, source)
            if source in views:
                views.add(node)
        elif source is not None and name in _VIEWS:
            views.add(node)
        fix = _out_of_place(gm, node) if source is not None else None
        if fix is None or source.op == "get_attr":
            continue
        changed = True
        if source in views:  # a change of part of a tensor: kept, and refused if cut
            new.meta[INPLACE_VIEW] = True
            continue
        if fix == "clone":
            if len(source.users) > 1:
                copied = graph.call_method("clone", (env[source],))
                new.args = (copied, *new.args[1:])
                new.prepend(copied)
        elif isinstance(fix, dict):
            new.kwargs = fix
        else:
            new.target = fix
        base = root.get(source, source)
        for original in [base, *(n for n, r in root.items() if r is base)]:
            env[original] = new  # later uses of the changed tensor read the change
    if not changed:
        return gm
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def trace(module: nn.Module) -> torch.fx.GraphModule:
    """Trace ``module`` into a GraphModule sharing its parameters (see ``trace_leaves``)."""
    return trace_leaves(module).gm


def _opaque_calls(gm: torch.fx.GraphModule) -> dict[str, str]:
    """The module calls of a graph whose forward cannot be traced: name -> why."""
    opaque: dict[str, str] = {}
    tracer = _Tracer(frozenset())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        sub = gm.get_submodule(str(node.target))
        if tracer.is_leaf_module(sub, str(node.target)):
            continue
        try:
            _Tracer(frozenset()).trace(sub)
        except Exception as err:
            text = str(err).strip()
            opaque[str(node.target)] = text.splitlines()[0] if text else type(err).__name__
    return opaque
