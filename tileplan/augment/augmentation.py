"""``Augmentation``: a parsed ``--augment`` spec that draws each image's parameters from
(seed, epoch, image index) and wraps the image's source so that every crop is augmented as it
is read.

Parameters come from one NumPy generator per (seed, epoch, image, repeat, operation)
(``numpy.random.default_rng`` of that sequence; ``repeat`` counts the image's earlier draws in
the epoch when it is sampled with replacement): the same on every rank and after ``--resume``,
independent of the other operations named and of the tiling. Nothing is drawn per tile.
"""

from __future__ import annotations

import dataclasses
import itertools
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
Symmetry = tuple[tuple[int, ...], tuple[bool, ...]]  # (perm, flips): see geometry.Geometry


@dataclass(frozen=True)
class Augmentation:
    """What ``--augment SPEC`` asks for.

    Attributes:
        spec: the canonical spec (``canonical``): names in application order, strengths written.
        max_shape: spatial shape the run streams at most; a permutation of axes that would
            not fit is left out (the image keeps its orientation, flips still drawn).
        fill: the cutout's value per channel (default mid-grey: 128 for 8-bit, 0.5 for float).
        spacing: of volumes, per axis (mm): axes are permuted and rotated into each other only
            among axes of equal spacing (None: a 2D image's axes are interchangeable, a
            volume's are not).
    """

    spec: str = ""
    max_shape: tuple[int, ...] | None = None
    fill: tuple[float, ...] | None = None
    spacing: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, text: str, *, max_shape: Sequence[int] | None = None,
              fill: Sequence[float] | None = None,
              spacing: Sequence[float] | None = None) -> Augmentation:  # fmt: skip
        """From ``--augment`` text (``default``, ``none``, ``flip,hed:0.05``, ...).

        Raises:
            AugmentError: an unknown name or a strength out of range (one line).
        """
        return cls(canonical(text), None if max_shape is None else tuple(max_shape),
                   None if fill is None else tuple(float(v) for v in fill),
                   None if spacing is None else tuple(float(v) for v in spacing))  # fmt: skip

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

    @property
    def changes_shape(self) -> bool:
        """Whether an augmented image may have another shape than its source."""
        return bool({"scale", "crop", "rot90", "transpose", "dihedral"} & self.ops.keys())

    def shapes(self, shape: tuple[int, ...]) -> set[tuple[int, ...]]:
        """The spatial shapes an image of ``shape`` may stream at: its own, and with scale
        jitter the smallest (a factor ``1 + S`` on the µm/px; finer reads are cropped to
        ``shape``), each cropped as ``crop`` says and permuted where drawn."""
        ops = self.ops
        sizes = {tuple(shape)}
        if "scale" in ops:
            sizes.add(tuple(max(1, round(m / (1 + ops["scale"]))) for m in shape))  # type: ignore[operator]
        if "crop" in ops:
            sizes = {tuple(_crop_size(m, ops["crop"]) for m in s) for s in sizes}  # type: ignore[arg-type]
        if not {"rot90", "transpose", "dihedral"} & ops.keys():
            return sizes
        return sizes | {p for s in sizes for p in (tuple(s[a] for a in perm)
                                                   for perm in self._perms(len(s)))
                        if self._fits(p)}  # fmt: skip

    def _fits(self, shape: Sequence[int]) -> bool:
        return self.max_shape is None or all(
            m <= limit for m, limit in zip(shape, self.max_shape[-len(shape) :], strict=True)
        )

    def _groups(self, n: int) -> list[tuple[int, ...]]:
        """Axes that may be permuted and rotated into each other: all of an image's; a
        volume's of equal spacing (each alone without ``spacing``)."""
        if self.spacing is None:
            return [tuple(range(n))] if n == 2 else [(a,) for a in range(n)]
        groups: dict[float, list[int]] = {}
        for axis, step in enumerate(self.spacing[-n:]):
            groups.setdefault(step, []).append(axis)
        return [tuple(g) for g in groups.values()]

    def _perms(self, n: int) -> list[tuple[int, ...]]:
        """Every permutation of axes within ``_groups``."""
        perms = []
        for choice in itertools.product(*(itertools.permutations(g) for g in self._groups(n))):
            perm = list(range(n))
            for group, order in zip(self._groups(n), choice, strict=True):
                for a, b in zip(group, order, strict=True):
                    perm[a] = b
            perms.append(tuple(perm))
        return perms

    def _rng(self, seed: int, epoch: int, index: int, repeat: int, name: str
             ) -> np.random.Generator:  # fmt: skip
        return np.random.default_rng([seed % 2**63, epoch, index, repeat, _OP_NUMBER[name]])

    def scale_factor(self, *, seed: int, epoch: int, index: int, repeat: int = 0) -> float:
        """The factor on the read resolution's µm/px for this image (1: none)."""
        s = self.ops.get("scale")
        if s is None:
            return 1.0
        return float(self._rng(seed, epoch, index, repeat, "scale").uniform(1 - s, 1 + s))

    def draw(self, *, seed: int, epoch: int, index: int, shape: tuple[int, ...],
             channels: int, dtype: torch.dtype, repeat: int = 0) -> ImageParams:  # fmt: skip
        """Image ``index``'s parameters in ``epoch`` (its ``repeat``-th draw in the epoch) for
        a source image of spatial ``shape``."""
        ops = self.ops

        def rng(name: str) -> np.random.Generator:
            return self._rng(seed, epoch, index, repeat, name)

        self.check(channels=channels, dtype=dtype)
        drawn: list[str] = []
        geometry = self._geometry(ops, rng, shape, drawn)
        params = ImageParams(
            geometry=geometry,
            colour=self._colour(ops, rng, drawn),
            intensity=self._intensity(ops, rng, dtype, drawn),
            noise=self._noise(ops, rng, dtype),
            cutout=self._cutout(ops, rng, geometry.shape),
            fill=self._fill(channels, dtype),
        )
        if params.noise is not None:
            drawn.append(f"noise_key={params.noise[0]}")
        for a, b in params.cutout:
            size = "x".join(str(y - x) for x, y in zip(a, b, strict=True))
            drawn.append(f"cutout={','.join(map(str, a))}:{size}")
        return dataclasses.replace(params, drawn=" ".join(drawn))

    def _geometry(self, ops: dict[str, float | None], rng,  # noqa: ANN001
                  shape: tuple[int, ...], drawn: list[str]) -> Geometry:  # fmt: skip
        n = len(shape)
        start, size = (0,) * n, tuple(shape)
        if "crop" in ops:
            size = tuple(_crop_size(m, ops["crop"]) for m in shape)  # type: ignore[arg-type]
            r = rng("crop")
            start = tuple(int(r.integers(0, m - c + 1)) for m, c in zip(shape, size, strict=True))
            drawn.append(f"crop={','.join(map(str, start))}:{'x'.join(map(str, size))}")
        perm, flips = self._symmetry(ops, rng, n)
        if not self._fits([size[a] for a in perm]):  # keep the orientation, not the flips
            perm = tuple(range(n))
        if {"flip", "rot90", "transpose", "dihedral"} & ops.keys():
            flipped = "".join("1" if f else "0" for f in flips)
            drawn.append(f"symmetry=axes{','.join(map(str, perm))}/flips{flipped}")
        rotation = None
        if "rotate" in ops:
            rotation = self._rotation(rng("rotate"), ops["rotate"], n, drawn)  # type: ignore[arg-type]
        field = None
        if "elastic" in ops:
            out_shape = tuple(size[a] for a in perm)
            field = rng("elastic").normal(0.0, ops["elastic"], size=(n, *field_nodes(out_shape)))
            drawn.append(f"elastic_max={float(np.abs(field).max()):.2f}px")
        return Geometry(tuple(shape), start, size, perm, flips, rotation, field)

    def _symmetry(self, ops: dict[str, float | None], rng, n: int) -> Symmetry:  # noqa: ANN001
        """(perm, flips) of the symmetry ops named, composed in spec order."""
        sym: Symmetry = (tuple(range(n)), (False,) * n)
        groups = [g for g in self._groups(n) if len(g) > 1]
        if "transpose" in ops and groups:  # a permutation within the groups, p = 1/2 moved
            r = rng("transpose")
            if r.random() < 0.5:
                perms = [p for p in self._perms(n) if p != sym[0]]
                sym = _then(sym, (perms[int(r.integers(len(perms)))], (False,) * n))
        if "rot90" in ops and groups:  # a quarter turn k times in a plane of a group
            r = rng("rot90")
            planes = [(a, b) for g in groups for a, b in itertools.combinations(g, 2)]
            a, b = planes[int(r.integers(len(planes)))]
            for _ in range(int(r.integers(4))):
                sym = _then(sym, _quarter_turn(n, a, b))
        if "flip" in ops:
            r = rng("flip")
            sym = _then(sym, (tuple(range(n)), tuple(bool(r.random() < 0.5) for _ in range(n))))
        if "dihedral" in ops:  # every permutation within the groups, every flip
            r = rng("dihedral")
            perms = self._perms(n)
            perm = perms[int(r.integers(len(perms)))]
            sym = _then(sym, (perm, tuple(bool(r.random() < 0.5) for _ in range(n))))
        return sym

    def rotation_plane(self, n: int) -> tuple[int, ...]:
        """The axes rotation turns: the largest group of interchangeable axes.

        Raises:
            AugmentError: no two axes are interchangeable (volumes of unequal spacing).
        """
        group = max(self._groups(n), key=len)
        if len(group) < 2:
            raise AugmentError(
                "--augment rotate: no two axes of these volumes have the same spacing; "
                "resample them with --spacing, or leave rotate out"
            )
        return group

    def _rotation(self, r: np.random.Generator, degrees: float, n: int,
                  drawn: list[str]) -> np.ndarray:  # fmt: skip
        """A rotation by an angle in ``[-degrees, degrees]`` within the largest group of
        interchangeable axes: in its plane (2 axes) or about a random direction (3)."""
        group = self.rotation_plane(n)
        angle = math.radians(float(r.uniform(-1.0, 1.0)) * degrees)
        if len(group) == 2:
            c, s = math.cos(angle), math.sin(angle)
            small = np.array([[c, -s], [s, c]])
        else:  # Rodrigues: about a unit axis drawn uniformly on the sphere
            axis = r.normal(size=3)
            axis /= np.linalg.norm(axis)
            k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]],
                          [-axis[1], axis[0], 0]])  # fmt: skip
            small = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
        rotation = np.eye(n)
        rotation[np.ix_(group, group)] = small
        drawn.append(f"rotate={math.degrees(angle):.3f}")
        return rotation

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

    def _cutout(self, ops: dict[str, float | None], rng, shape: tuple[int, ...]  # noqa: ANN001
                ) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:  # fmt: skip
        if "cutout" not in ops:
            return ()
        size = [_crop_size(m, ops["cutout"]) for m in shape]  # type: ignore[arg-type]
        r = rng("cutout")
        start = tuple(int(r.integers(0, m - c + 1)) for m, c in zip(shape, size, strict=True))
        return ((start, tuple(a + c for a, c in zip(start, size, strict=True))),)

    def _intensity(self, ops: dict[str, float | None], rng, dtype: torch.dtype,  # noqa: ANN001
                   drawn: list[str]) -> tuple[float, float] | None:  # fmt: skip
        if "intensity" not in ops:
            return None
        s, r = ops["intensity"], rng("intensity")
        scale = float(r.uniform(1 - s, 1 + s))  # type: ignore[operator]
        shift = float(r.uniform(-s, s)) * (255.0 if dtype == torch.uint8 else 1.0)  # type: ignore[operator]
        drawn.append(f"intensity={scale:.4f},{shift:+.4f}")
        return scale, shift

    def _fill(self, channels: int, dtype: torch.dtype) -> tuple[float, ...]:
        if self.fill is not None:
            if len(self.fill) != channels:
                raise AugmentError(f"the cutout fill has {len(self.fill)} values for "
                                   f"{channels} channels")  # fmt: skip
            return self.fill
        return (128.0 if dtype == torch.uint8 else 0.5,) * channels

    def apply(self, source: ImageSource | torch.Tensor, *, seed: int, epoch: int,
              index: int | Sequence[int], repeat: int = 0) -> ImageSource:  # fmt: skip
        """``source`` (``(N, C, *spatial)``; a tensor is wrapped) augmented as it is read,
        image ``k`` of the batch as image ``index[k]`` (an int: ``index, index + 1, ...``);
        ``repeat`` counts earlier draws of the same images in the epoch (sampling with
        replacement), each of which is augmented differently.

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
        if "scale" in self.ops:
            if n != 1 or not hasattr(source, "rescaled"):
                raise AugmentError(
                    f"--augment scale reads a slide at another resolution; "
                    f"{type(source).__name__} cannot be, so leave scale out"
                )
            factor = self.scale_factor(seed=seed, epoch=epoch, index=indices[0], repeat=repeat)
            source = source.rescaled(factor)
        shape = tuple(source.shape[2:])
        scaled = f"scale={factor:.4f} " if "scale" in self.ops else ""
        params = [self.draw(seed=seed, epoch=epoch, index=i, shape=shape,  # type: ignore[arg-type]
                            channels=source.shape[1], dtype=source.dtype, repeat=repeat)
                  for i in indices]  # fmt: skip
        if scaled:
            params = [dataclasses.replace(p, drawn=scaled + p.drawn) for p in params]
        return AugmentedSource(source, params)


def symmetric_views(source: ImageSource, max_shape: Sequence[int] | None = None
                    ) -> list[AugmentedSource]:  # fmt: skip
    """``source`` (an image) under each of the 8 symmetries of the square (test-time
    augmentation), the identity first; the transposed 4 only where the transposed image fits
    ``max_shape``."""
    n, _, h, w = source.shape
    views = []
    for k in range(8):
        perm = (1, 0) if k & 4 else (0, 1)
        if perm == (1, 0) and max_shape is not None and (w > max_shape[0] or h > max_shape[1]):
            continue
        geometry = Geometry((h, w), (0, 0), (h, w), perm, (bool(k & 2), bool(k & 1)))
        views.append(AugmentedSource(source, [ImageParams(geometry)] * n))
    return views


def _then(first: Symmetry, second: Symmetry) -> Symmetry:
    """The symmetry ``second`` applied after ``first``: output axis ``i`` of the result is
    ``second``'s axis ``i``, which reads ``first``'s axis ``second.perm[i]``."""
    (p1, f1), (p2, f2) = first, second
    return tuple(p1[a] for a in p2), tuple(f2[i] ^ f1[a] for i, a in enumerate(p2))


def _quarter_turn(n: int, a: int, b: int) -> Symmetry:
    """A rotation by 90 degrees in the plane of axes ``a < b`` (as ``numpy.rot90`` with
    ``axes=(a, b)``): axes ``a`` and ``b`` swapped, the new axis ``a`` reversed."""
    perm = list(range(n))
    perm[a], perm[b] = b, a
    return tuple(perm), tuple(i == a for i in range(n))


def _crop_size(n: int, fraction: float) -> int:
    """``fraction`` of ``n`` px, rounded half up, at least 1."""
    return max(1, math.floor(n * fraction + 0.5))
