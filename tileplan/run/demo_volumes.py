"""Synthetic CT-like volumes whose label needs full resolution (``tileplan demo-data --volumes``).

Each volume is an int16 NIfTI in Hounsfield units: air (-1000) around an ellipsoidal body of
soft tissue (about 40 HU, noisy), stored with anisotropic voxels (2.5 mm slices of 0.8 mm
pixels, as a clinical CT). A positive volume holds small hollow shells (a 1-voxel wall of
+400 HU); a negative one solid balls of the same mass. Averaged down by 2 or more per axis the
two look alike, so the label is only visible at the stored resolution.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from executor import atomic_write
from tileplan.run.csv_out import write_csv

__all__ = ["DEMO_SPACING", "write_demo_volumes"]

log = logging.getLogger(__name__)

DEMO_SPACING = (2.5, 0.8, 0.8)  # mm per voxel, (D, H, W)
_SHELLS = 6  # objects per volume
_RADIUS = 3  # voxels, outer radius of a shell


def _volume(depth: int, side: int, label: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(D, H, W)`` int16 volume in HU."""
    d, y, x = np.ogrid[:depth, :side, :side]
    body = ((d - depth / 2) / (0.45 * depth)) ** 2 + ((y - side / 2) / (0.4 * side)) ** 2 + (
        (x - side / 2) / (0.45 * side)) ** 2 <= 1  # fmt: skip
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0.0, 20.0, (depth, side, side))
    r = _RADIUS
    k = np.arange(-r, r + 1)
    dist = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shell = (dist <= r) & (dist > r - 1)
    ball = dist <= r * (shell.sum() / (dist <= r).sum()) ** (1 / 3)  # about the same mass
    mark = shell if label else ball
    inside = np.argwhere(body[r:-r, r:-r, r:-r]) + r
    for centre in inside[rng.choice(len(inside), size=_SHELLS, replace=False)]:
        cd, cy, cx = centre
        view = hu[cd - r : cd + r + 1, cy - r : cy + r + 1, cx - r : cx + r + 1]
        view[mark] = 400.0
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _nifti_bytes(volume: np.ndarray) -> bytes:
    """``(D, H, W)`` as a NIfTI-1 file with array axes ``(i, j, k) = (W, H, D)``."""
    import nibabel

    dz, dy, dx = DEMO_SPACING
    img = nibabel.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)),
                              np.diag([dx, dy, dz, 1.0]))  # fmt: skip
    img.header.set_xyzt_units("mm")
    return img.to_bytes()


def write_demo_volumes(out_dir: Path, n: int = 16, depth: int = 32, side: int = 128,
                       seed: int = 0) -> Path:  # fmt: skip
    """Write ``n`` volumes (``vol_XXX.nii.gz``, half positive) with ``train.csv`` and
    ``val.csv`` (about 3:1, both classes on both sides) to ``out_dir``; returns it.

    Raises:
        ValueError: fewer than 4 volumes, or volumes too small for the objects.
    """
    if n < 4:
        raise ValueError(f"n must be at least 4 (two per class and split), got {n}")
    if min(depth, side) < 4 * _RADIUS + 4:
        raise ValueError(f"volumes must be at least {4 * _RADIUS + 4} voxels per axis")
    import gzip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.permutation([1] * (n // 2) + [0] * (n - n // 2))]
    names = [f"vol_{i:03d}.nii.gz" for i in range(n)]
    for name, label in zip(names, labels, strict=True):
        data = gzip.compress(_nifti_bytes(_volume(depth, side, label, rng)), mtime=0)
        atomic_write(out_dir / name, lambda f, data=data: f.write(data))
    val = [i for c in (0, 1) for i in [j for j, v in enumerate(labels) if v == c][: max(1, n // 8)]]
    for csv_name, rows in (("train.csv", [i for i in range(n) if i not in val]), ("val.csv", val)):
        write_csv(
            out_dir / csv_name, ["image", "label"], [(names[i], labels[i]) for i in sorted(rows)]
        )
    log.info("demo volumes: %d of %dx%dx%d voxels in %s", n, depth, side, side, out_dir)
    return out_dir
