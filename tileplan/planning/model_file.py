"""Load a user's ``model.py`` and split the model into a streamable trunk and a head.

The convention, kept small:

* ``build_model()`` returns a ``torch.nn.Module`` (or a module-level ``model`` is one);
* optionally ``split(model)`` returns ``(trunk, head)`` with ``head(trunk(x)) == model(x)``.

Without ``split``, the trunk ends at the last point of the model's traced graph where a single
feature map is all that flows on, and everything before it can be streamed: that is before the
global pooling that starts the classifier (global-context layers inside the trunk, such as
squeeze-excitation or GroupNorm, stream with their statistics) or before the first layer that
cannot stream at all. ``--split NAME`` ends the trunk after the module (or graph node) called
NAME instead.

The loaded model is put in eval mode (frozen BatchNorm statistics, its affine weights still
train); ``tileplan train --bn train`` trains BatchNorm with batch statistics instead.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
from torch import nn

from executor import (
    StreamingError,
    UnsupportedLayerError,
    build_program,
    cut_points,
    find_node,
    prefix,
    spatial_axes,
    suffix,
    trace,
)

__all__ = [
    "LoadedModel", "ModelFileError", "Split", "load_model_file", "load_module", "set_batch_norm",
    "split_model",
]  # fmt: skip

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
        stopped_by: why an automatic split ends there (see ``Split.stopped_by``).
        n_axes: spatial axes of the maps the model takes (2 images, 3 volumes), from its
            layers (``executor.spatial_axes``).
    """

    path: Path
    entry: str
    model: nn.Module
    trunk: nn.Module
    head: nn.Module
    split: str
    stopped_by: str | None = None
    batch_norm: str = "frozen"  # the BatchNorm mode the model was split (traced) in
    n_axes: int = 2
    _user_split: object = None
    _split_option: str = "auto"

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def resplit(self, batch_norm: str) -> LoadedModel:
        """The same model (the same parameters and buffers) split again with its BatchNorm
        layers in ``batch_norm`` mode, e.g. a frozen trunk for validation next to a trunk
        trained with batch statistics. The model's layers are left in that mode."""
        if batch_norm == self.batch_norm:
            set_batch_norm(self.model, batch_norm)
            return self
        return _split(self.path, self.entry, self.model, self._user_split, self._split_option,
                      batch_norm, self.n_axes)  # fmt: skip


def set_batch_norm(model: nn.Module, mode: str) -> None:
    """Put the model's BatchNorm layers in train mode (``"train"``: batch statistics, running
    ones updated) or eval mode (``"frozen"``), and nothing else (dropout stays off)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(mode == "train")


def load_model_file(path: str | Path, split: str = "auto", *, batch_norm: str = "frozen",
                    n_axes: int | None = None) -> LoadedModel:  # fmt: skip
    """Import ``path``, build the model and split it.

    Args:
        path: a Python file defining ``build_model()`` or ``model`` (and maybe ``split``).
        split: ``"auto"`` (default: the file's ``split`` if it has one, else the largest
            streamable prefix) or the name of the module after which the trunk ends.
        batch_norm: ``"frozen"`` (eval mode) or ``"train"``: BatchNorm layers normalise with
            batch statistics. The model is traced in that mode (code such as timm's
            ``BatchNormAct2d`` reads ``self.training`` while it is traced), so a trunk for the
            other mode is another split of the same model (``LoadedModel.resplit``).
        n_axes: spatial axes of the model's input when its layers do not say (they do
            through ``executor.spatial_axes``: ``Conv3d`` means volumes); default 2.

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
    return _split(
        path,
        entry,
        model,
        getattr(namespace, "split", None),
        split,
        batch_norm,
        spatial_axes(model, n_axes or 2),
    )


SplitFn = Callable[[nn.Module], tuple[nn.Module, nn.Module]]


def load_module(model: nn.Module, split: str | SplitFn = "auto", *, batch_norm: str = "frozen",
                label: str = "<module>", n_axes: int | None = None) -> LoadedModel:  # fmt: skip
    """Split a module given in Python as ``load_model_file`` splits a file's (in eval mode,
    BatchNorm in ``batch_norm`` mode). ``split``: ``"auto"``, a module name, or a function
    ``split(model) -> (trunk, head)``; ``label`` stands for the file in messages."""
    model.eval()
    user_split = split if callable(split) else None
    return _split(Path(label), "module", model, user_split, "auto" if callable(split) else split,
                  batch_norm, spatial_axes(model, n_axes or 2))  # fmt: skip


def _split(path: Path, entry: str, model: nn.Module, user_split: object, split: str,
           batch_norm: str, n_axes: int) -> LoadedModel:  # fmt: skip
    set_batch_norm(model, batch_norm)
    if split == "auto" and callable(user_split):
        parts = _call(path, lambda: user_split(model), "split(model)")
        if not (isinstance(parts, tuple) and len(parts) == 2 and all(
            isinstance(p, nn.Module) for p in parts
        )):  # fmt: skip
            raise ModelFileError(f"split(model) in '{path}' must return (trunk, head) modules")
        trunk, head = parts
        build_program(trunk, n_axes)  # refuse an unstreamable trunk now, naming the layer
        return LoadedModel(path, entry, model, trunk, head, "split(model) in the model file",
                           batch_norm=batch_norm, n_axes=n_axes, _user_split=user_split,
                           _split_option=split)  # fmt: skip
    parts = split_model(model, None if split == "auto" else split, n_axes)
    return LoadedModel(path, entry, model, parts.trunk, parts.head, parts.where, parts.stopped_by,
                       batch_norm=batch_norm, n_axes=n_axes, _user_split=user_split,
                       _split_option=split)  # fmt: skip


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


@dataclass(frozen=True)
class Split:
    """Where a model was cut into a streamed trunk and a head.

    Attributes:
        trunk, head: the two parts, sharing the model's parameters; ``head(trunk(x))`` is
            ``model(x)``.
        where: where the trunk ends, in words.
        stopped_by: why the trunk ends there when it was chosen automatically: the refusal of
            the first layer after it that cannot stream (None when all of the model streams up
            to its last single-map point, or the user chose the end).
    """

    trunk: nn.Module
    head: nn.Module
    where: str
    stopped_by: str | None = None


class _ThenHead(nn.Module):
    """The rest of the feature part, then the model's own ``forward_head`` (timm)."""

    def __init__(self, rest: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.rest = rest
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.rest(features))


class _FeaturePart(nn.Module):
    """A model's ``forward_features`` (timm) as a module of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _traced(model: nn.Module) -> tuple[torch.fx.GraphModule, Callable[[nn.Module], nn.Module]]:
    """The model's graph, and how to finish a head made of its suffix.

    When the model's own forward cannot be traced but it has timm's ``forward_features`` and
    ``forward_head``, the graph is the feature part's and the head ends with ``forward_head``.
    """
    try:
        return trace(model), lambda suffix: suffix
    except UnsupportedLayerError as whole:
        if not (callable(getattr(model, "forward_features", None))
                and callable(getattr(model, "forward_head", None))):  # fmt: skip
            raise ModelFileError(
                f"cannot trace {type(model).__name__} with torch.fx to find the trunk "
                f"({whole.reason}); define split(model) -> (trunk, head) in the model file"
            ) from whole
        try:
            gm = trace(_FeaturePart(model))
        except UnsupportedLayerError as err:
            raise ModelFileError(
                f"cannot trace {type(model).__name__} or its forward_features with torch.fx "
                f"({err.reason}); define split(model) -> (trunk, head) in the model file"
            ) from err
        log.info("%s does not trace as a whole: splitting its forward_features", type(model))
        return gm, lambda suffix: _ThenHead(suffix, model)


def split_model(model: nn.Module, name: str | None = None, n_axes: int | None = None) -> Split:
    """Split ``model`` into a trunk and a head at a point where one feature map flows on.

    Args:
        model: the whole model.
        name: end the trunk after this module (qualified name) or graph node; ``None`` picks
            the largest streamable prefix.
        n_axes: spatial axes of the model's input when its layers do not say (default 2).

    Raises:
        ModelFileError: the model cannot be traced, ``name`` is not a cut point, or no prefix
            of the model can be streamed.
    """
    n_axes = spatial_axes(model, n_axes or 2)
    gm, finish = _traced(model)
    nodes = list(gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    cuts = [position[c] for c in cut_points(gm)]
    if name is not None:
        return _split_at_name(gm, nodes, cuts, name, finish, n_axes)
    last_error: UnsupportedLayerError | None = None
    limit = len(nodes)  # cuts at or after a refused node cannot stream
    for index in reversed(cuts):
        if index >= limit:
            continue
        trunk = prefix(gm, nodes[index].name)
        try:
            build_program(trunk, n_axes)
        except UnsupportedLayerError as err:
            last_error = err
            limit = min(limit, position.get(err.node or "", limit))
            continue
        where = _describe(nodes[index])
        log.info("trunk ends after %s", where)
        stopped = None if last_error is None else str(last_error)
        head = finish(suffix(gm, nodes[index].name))
        return Split(trunk, head, f"auto: trunk ends after {where}", stopped)
    raise ModelFileError(
        f"no part of {type(model).__name__} can be streamed ({last_error}); "
        "define split(model) in the model file"
    )


def _split_at_name(
    gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], cuts: list[int], name: str,
    finish: Callable[[nn.Module], nn.Module], n_axes: int,
) -> Split:  # fmt: skip
    node = find_node(gm, name)
    if node is None:
        modules = [str(n.target) for n in nodes if n.op == "call_module"]
        raise ModelFileError(
            f"--split {name}: no module or node of that name; modules are e.g. "
            f"{', '.join(modules[-6:])}"
        )
    index = nodes.index(node)
    if index not in cuts:
        raise ModelFileError(
            f"--split {name}: more than one value flows past it (e.g. a skip connection); "
            "choose the end of a whole block"
        )
    trunk = prefix(gm, nodes[index].name)
    build_program(trunk, n_axes)
    head = finish(suffix(gm, nodes[index].name))
    return Split(trunk, head, f"trunk ends after {_describe(nodes[index])}")


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}'"
    stack = node.meta.get("nn_module_stack")
    if stack:
        return f"'{list(stack.values())[-1][0]}' ({node.name})"
    return f"'{node.name}'"
