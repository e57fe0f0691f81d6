"""``Augmentation``: a parsed ``--augment`` spec that draws each image's parameters from
(seed, epoch, image index) and wraps the image's source so that every crop is augmented as it
is read.

Parameters come from one NumPy generator per (seed, epoch, image, operation)
(``numpy.random.default_rng`` of that sequence): the same on every rank and after ``--resume``,
independent of the other operations named and of the tiling. Nothing is drawn per tile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from executor import ImageSource
from tileplan.augment.colour import ColourParams, hed_tables, mix_matrix, tone_table
from tileplan.augment.geometry import Geometry, field_nodes
from tileplan.augment.source import AugmentedSource, ImageParams
from tileplan.augment.spec import OPS, AugmentError, canonical, parse_spec

__all__ = ["Augmentation", "symmetric_views"]

_OP_NUMBER = {name: k for k, name in enumerate(OPS)}  # each op's own random stream
_RGB_ONLY = ("hed", "saturation", "hue")
_EIGHT_BIT = ("hed", "brightness", "contrast", "gamma", "saturation", "hue")
# The 4 rotations by 90 degrees counter-clockwise as (transpose, flip_y, flip_x) (``np.rot90``).
_ROT90 = ((False, False, False), (True, True, False), (False, True, True), (True, False, True))


@dataclass(frozen=True)
class Augmentation:
    """What ``--augment SPEC`` asks for.

    Attributes:
        spec: the canonical spec (``canonical``): names in application order, strengths written.
        max_shape: ``(H, W)`` the run streams at most; a transposition that would not fit is
            left out (the image keeps its orientation, flips still drawn).
        fill: the cutout's value per channel (default mid-grey: 128 for 8-bit, 0.5 for float).
    """

    spec: str = ""
    max_shape: tuple[int, int] | None = None
    fill: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, text: str, *, max_shape: Sequence[int] | None = None,
              fill: Sequence[float] | None = None) -> Augmentation:  # fmt: skip
        """From ``--augment`` text (``default``, ``none``, ``flip,hed:0.05``, ...).

        Raises:
            AugmentError: an unknown name or a strength out of range (one line).
        """
        return cls(canonical(text), None if max_shape is None else tuple(max_shape),  # type: ignore[arg-type]
                   None if fill is None else tuple(float(v) for v in fill))  # fmt: skip

    @property
    def ops(self) -> dict[str, float | None]:
        return parse_spec(self.spec)

    def __bool__(self) -> bool:
        return bool(self.spec)

    def describe(self) -> str:
        return self.spec or "none"

    def check(self, *, channels: int, dtype: torch.dtype, where: str = "the images") -> None:
        """Refuse, before any image is read, what these images cannot take.

        Raises:
            AugmentError: a colour op on float images or an RGB op on other than 3 channels.
        """
        for name in self.ops:
            if name in _EIGHT_BIT and dtype != torch.uint8:
                raise AugmentError(f"--augment {name}: {where} are {str(dtype).split('.')[-1]}, "
                                   "and colour augmentations work on 8-bit images; leave "
                                   f"{name} out of --augment")  # fmt: skip
            if name in _RGB_ONLY and channels != 3:
                raise AugmentError(f"--augment {name}: {where} have {channels} channel(s), and "
                                   f"{name} works on RGB; leave it out of --augment")  # fmt: skip

    def shapes(self, shape: tuple[int, int]) -> set[tuple[int, int]]:
        """Every ``(H, W)`` an image of ``shape`` may stream at, scale jitter aside (it shrinks
        or crops to at most ``shape``): the crop's size and its transposition if drawn."""
        ops = self.ops
        h, w = shape
        if "crop" in ops:
            h, w = _crop_size(h, ops["crop"]), _crop_size(w, ops["crop"])  # type: ignore[arg-type]
        out = {(h, w)}
        if ({"rot90", "transpose", "dihedral"} & ops.keys()) and self._fits((w, h)):
            out.add((w, h))
        return out

    def _fits(self, shape: tuple[int, int]) -> bool:
        return self.max_shape is None or (shape[0] <= self.max_shape[0]
                                          and shape[1] <= self.max_shape[1])  # fmt: skip

    def _rng(self, seed: int, epoch: int, index: int, name: str) -> np.random.Generator:
        return np.random.default_rng([seed % 2**63, epoch, index, _OP_NUMBER[name]])

    def scale_factor(self, *, seed: int, epoch: int, index: int) -> float:
        """The factor on the read resolution's µm/px for this image (1: none)."""
        s = self.ops.get("scale")
        if s is None:
            return 1.0
        return float(self._rng(seed, epoch, index, "scale").uniform(1 - s, 1 + s))

    def draw(self, *, seed: int, epoch: int, index: int, shape: tuple[int, int],
             channels: int, dtype: torch.dtype) -> ImageParams:  # fmt: skip
        """Image ``index``'s parameters in ``epoch`` for a source image of ``shape``."""
        ops = self.ops

        def rng(name: str) -> np.random.Generator:
            return self._rng(seed, epoch, index, name)

        self.check(channels=channels, dtype=dtype)
        drawn: list[str] = []
        geometry = self._geometry(ops, rng, shape, drawn)
        params = ImageParams(
            geometry=geometry,
            colour=self._colour(ops, rng, drawn),
            noise=self._noise(ops, rng, dtype),
            cutout=self._cutout(ops, rng, geometry.shape),
            fill=self._fill(channels, dtype),
        )
        if params.noise is not None:
            drawn.append(f"noise_key={params.noise[0]}")
        drawn += [f"cutout={y0},{x0},{y1 - y0}x{x1 - x0}" for y0, x0, y1, x1 in params.cutout]
        return dataclasses.replace(params, drawn=" ".join(drawn))

    def _geometry(self, ops: dict[str, float | None], rng,  # noqa: ANN001
                  shape: tuple[int, int], drawn: list[str]) -> Geometry:  # fmt: skip
        h, w = shape
        crop = (0, 0, h, w)
        if "crop" in ops:
            ch, cw = _crop_size(h, ops["crop"]), _crop_size(w, ops["crop"])  # type: ignore[arg-type]
            r = rng("crop")
            crop = (int(r.integers(0, h - ch + 1)), int(r.integers(0, w - cw + 1)), ch, cw)
            drawn.append(f"crop={crop[0]},{crop[1]},{ch}x{cw}")
        t, fy, fx = self._symmetry(ops, rng)
        if t and not self._fits((crop[3], crop[2])):
            t = False  # would not fit the run's largest shape: keep the orientation
        if {"flip", "rot90", "transpose", "dihedral"} & ops.keys():
            name = ("T" if t else "") + ("V" if fy else "") + ("H" if fx else "")
            drawn.append(f"symmetry={name or 'identity'}")
        angle = 0.0
        if "rotate" in ops:
            angle = math.radians(float(rng("rotate").uniform(-1.0, 1.0)) * ops["rotate"])  # type: ignore[operator]
            drawn.append(f"rotate={math.degrees(angle):.3f}")
        field = None
        if "elastic" in ops:
            nodes = field_nodes(Geometry((h, w), crop, t).shape)
            field = rng("elastic").normal(0.0, ops["elastic"], size=(2, *nodes))
            drawn.append(f"elastic_max={float(np.abs(field).max()):.2f}px")
        return Geometry((h, w), crop, t, fy, fx, angle, field)

    @staticmethod
    def _symmetry(ops: dict[str, float | None], rng) -> tuple[bool, bool, bool]:  # noqa: ANN001
        """(transpose, flip_y, flip_x) of the symmetry ops named, composed."""
        t = fy = fx = False
        if "transpose" in ops:
            t = bool(rng("transpose").random() < 0.5)
        if "rot90" in ops:
            rt, ry, rx = _ROT90[int(rng("rot90").integers(4))]
            t, fy, fx = t ^ rt, ry, rx
        if "flip" in ops:
            r = rng("flip")
            fy, fx = fy ^ bool(r.random() < 0.5), fx ^ bool(r.random() < 0.5)
        if "dihedral" in ops:
            k = int(rng("dihedral").integers(8))
            t, fy, fx = t ^ bool(k & 4), fy ^ bool(k & 2), fx ^ bool(k & 1)
        return t, fy, fx

    def _colour(self, ops: dict[str, float | None], rng,  # noqa: ANN001
                drawn: list[str]) -> ColourParams:  # fmt: skip
        def factor(name: str) -> float:
            s = ops.get(name)
            if s is None:
                return 1.0
            value = float(rng(name).uniform(1 - s, 1 + s))
            drawn.append(f"{name}={value:.4f}")
            return value

        hed = None
        if "hed" in ops:
            s, r = ops["hed"], rng("hed")
            scale, shift = r.uniform(1 - s, 1 + s, 3), r.uniform(-s, s, 3)  # type: ignore[operator]
            hed = hed_tables(scale, shift)
            drawn.append("hed_scale=" + ",".join(f"{v:.4f}" for v in scale))
            drawn.append("hed_shift=" + ",".join(f"{v:.4f}" for v in shift))
        tone = None
        if {"brightness", "contrast", "gamma"} & ops.keys():
            tone = tone_table(factor("brightness"), factor("contrast"), factor("gamma"))
        mix = None
        if {"saturation", "hue"} & ops.keys():
            hue = 0.0 if "hue" not in ops else float(rng("hue").uniform(-1, 1)) * ops["hue"]  # type: ignore[operator]
            if "hue" in ops:
                drawn.append(f"hue={hue:.4f}")
            mix = mix_matrix(factor("saturation"), hue)
        return ColourParams(hed=hed, tone=tone, mix=mix)

    def _noise(self, ops: dict[str, float | None], rng, dtype: torch.dtype  # noqa: ANN001
               ) -> tuple[int, float] | None:  # fmt: skip
        if "noise" not in ops:
            return None
        std = ops["noise"] * (255.0 if dtype == torch.uint8 else 1.0)  # type: ignore[operator]
        return int(rng("noise").integers(0, 2**63)), std

    def _cutout(self, ops: dict[str, float | None], rng, shape: tuple[int, int]  # noqa: ANN001
                ) -> tuple[tuple[int, int, int, int], ...]:  # fmt: skip
        if "cutout" not in ops:
            return ()
        h, w = shape
        bh, bw = _crop_size(h, ops["cutout"]), _crop_size(w, ops["cutout"])  # type: ignore[arg-type]
        r = rng("cutout")
        y0, x0 = int(r.integers(0, h - bh + 1)), int(r.integers(0, w - bw + 1))
        return ((y0, x0, y0 + bh, x0 + bw),)

    def _fill(self, channels: int, dtype: torch.dtype) -> tuple[float, ...]:
        if self.fill is not None:
            if len(self.fill) != channels:
                raise AugmentError(f"the cutout fill has {len(self.fill)} values for "
                                   f"{channels} channels")  # fmt: skip
            return self.fill
        return (128.0 if dtype == torch.uint8 else 0.5,) * channels

    def apply(self, source: ImageSource | torch.Tensor, *, seed: int, epoch: int,
              index: int | Sequence[int]) -> ImageSource:  # fmt: skip
        """``source`` (``(N, C, H, W)``; a tensor is wrapped) augmented as it is read, image
        ``k`` of the batch as image ``index[k]`` (an int: ``index, index + 1, ...``).

        Scale jitter reads a slide region at another resolution (``SlideSource.rescaled``);
        other sources cannot take it.

        Raises:
            AugmentError: scale jitter of a source that cannot be read at another resolution,
                or an op these pixels cannot take (``check``).
        """
        from executor import TensorSource

        if isinstance(source, torch.Tensor):
            source = TensorSource(source)
        n = source.shape[0]
        indices = list(range(index, index + n)) if isinstance(index, int) else list(index)
        if len(source.shape) != 4:
            raise AugmentError("--augment works on 2D images; volumes are not augmented yet")
        if "scale" in self.ops:
            if n != 1 or not hasattr(source, "rescaled"):
                raise AugmentError(
                    f"--augment scale reads a slide at another resolution; "
                    f"{type(source).__name__} cannot be, so leave scale out"
                )
            factor = self.scale_factor(seed=seed, epoch=epoch, index=indices[0])
            source = source.rescaled(factor)
        shape = tuple(source.shape[2:])
        scaled = f"scale={factor:.4f} " if "scale" in self.ops else ""
        params = [self.draw(seed=seed, epoch=epoch, index=i, shape=shape,  # type: ignore[arg-type]
                            channels=source.shape[1], dtype=source.dtype)
                  for i in indices]  # fmt: skip
        if scaled:
            params = [dataclasses.replace(p, drawn=scaled + p.drawn) for p in params]
        return AugmentedSource(source, params)


def symmetric_views(source: ImageSource, max_shape: Sequence[int] | None = None
                    ) -> list[AugmentedSource]:  # fmt: skip
    """``source`` under each of the 8 symmetries of the square (test-time augmentation), the
    identity first; the transposed 4 only where the transposed image fits ``max_shape``."""
    n, _, h, w = source.shape
    views = []
    for k in range(8):
        t, fy, fx = bool(k & 4), bool(k & 2), bool(k & 1)
        if t and max_shape is not None and (w > max_shape[0] or h > max_shape[1]):
            continue
        geometry = Geometry((h, w), (0, 0, h, w), t, fy, fx)
        views.append(AugmentedSource(source, [ImageParams(geometry)] * n))
    return views


def _crop_size(n: int, fraction: float) -> int:
    """``fraction`` of ``n`` px, rounded half up, at least 1."""
    return max(1, math.floor(n * fraction + 0.5))
