"""A small synthetic dataset that can only be solved at full resolution.

Each image is a large RGB tiled TIFF of a stained-tissue-like texture (smooth colour variation
plus pixel noise). Positive images (label 1) contain a few tiny bright **rings**; negative
images (label 0) contain the same number of tiny **discs** of the same colour and the same
area (hence the same mass), so that:

- global statistics (mean, histogram) do not separate the classes: the same number of pixels
  of the same colour is drawn in both;
- after heavy downsampling (16x average pooling) a ring (outer diameter 7-12 px) and its disc
  collapse into the same few grey pixels;
- at full resolution the hole in the middle of a ring is obvious.

So a model must look at (nearly) full resolution: exactly the situation streaming training is
for. ``tileplan demo-data`` writes it; :func:`write_demo_dataset` is the function behind it.

The layout is ``img_000.tif, img_001.tif, ...`` plus ``train.csv`` and ``val.csv`` (columns
``image,label``, about 75/25, labels balanced in each). Output is byte-for-byte deterministic
for a seed. Every file is written to a temporary name and renamed into place, and the CSVs are
written last, so an interrupted run never leaves a half-written file or a CSV that lists a
missing image.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from executor import atomic_write
from tileplan.run.csv_out import write_csv

__all__ = [
    "MIN_SIZE", "RING_WIDTH", "DemoObject", "demo_image", "render_object", "write_demo_dataset",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Smallest image side accepted (objects need room).
MIN_SIZE = 32
_TILE = 256
#: Outer minus inner radius of a ring, px.
RING_WIDTH = 2.0
_OUTER_RADIUS = (3.5, 6.0)  # px, ring outer radius range (diameter 7-12 px)
_N_OBJECTS = (3, 6)  # objects per image, inclusive
_OBJECT_RGB = np.array([246.0, 238.0, 246.0], dtype=np.float32)
# Stain-like colours at the two ends of the texture (pink eosin to purple haematoxylin).
_LIGHT_RGB = np.array([205.0, 140.0, 175.0], dtype=np.float32)
_DARK_RGB = np.array([120.0, 70.0, 140.0], dtype=np.float32)
_NOISE_STD = 10.0


@dataclass(frozen=True)
class DemoObject:
    """One drawn structure.

    Attributes:
        y: center row (px, may be fractional).
        x: center column.
        radius: outer radius of the ring, or the radius of the disc.
        ring: True for a ring (positive class), False for a filled disc (distractor).
    """

    y: float
    x: float
    radius: float
    ring: bool


def _coverage(dist: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased fraction of each pixel inside a circle of ``radius``."""
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def render_object(
    obj: DemoObject, shape: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Anti-aliased alpha mask of a ring or disc, cropped to the region it touches.

    Args:
        obj: the structure.
        shape: ``(H, W)`` of the image it is drawn into.

    Returns:
        ``(region, alpha)``: the ``(rows, cols)`` slices of the image and a float32 alpha in
        [0, 1] of that region's shape.
    """
    r = obj.radius
    y0, y1 = max(0, int(obj.y - r - 2)), min(shape[0], int(obj.y + r + 3))
    x0, x1 = max(0, int(obj.x - r - 2)), min(shape[1], int(obj.x + r + 3))
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - obj.y
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - obj.x
    dist = np.sqrt(yy * yy + xx * xx)
    alpha = _coverage(dist, r)
    if obj.ring:
        alpha = alpha - _coverage(dist, r - RING_WIDTH)
    return (slice(y0, y1), slice(x0, x1)), alpha.astype(np.float32)


def _disc_radius(outer: float) -> float:
    """Radius of the disc with the same area as a ring of this outer radius."""
    inner = outer - RING_WIDTH
    return float(np.sqrt(outer * outer - inner * inner))


def _periodic_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth periodic texture in [0, 1] (low-pass filtered noise), float32 ``(size, size)``."""
    noise = rng.standard_normal((size, size), dtype=np.float32)
    spectrum = np.fft.rfft2(noise)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    # Blobs of roughly 30-200 px, like cell clusters and stroma at ~0.5 um/px.
    cutoff = 1.0 / 48.0
    spectrum *= np.exp(-((f / cutoff) ** 2)) * (f > 1.0 / 400.0)
    field = np.fft.irfft2(spectrum, s=(size, size)).astype(np.float32)
    field -= field.min()
    field /= max(float(field.max()), 1e-6)
    return field


def _random_view(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random circular shift plus flip/transpose of a periodic field (a fresh-looking copy)."""
    shift = rng.integers(0, field.shape[0], size=2)
    view = np.roll(field, (int(shift[0]), int(shift[1])), axis=(0, 1))
    k = int(rng.integers(0, 8))
    if k & 1:
        view = view[::-1]
    if k & 2:
        view = view[:, ::-1]
    if k & 4:
        view = view.T
    return view


def _place_objects(size: int, ring: bool, rng: np.random.Generator) -> list[DemoObject]:
    count = int(rng.integers(_N_OBJECTS[0], _N_OBJECTS[1] + 1))
    margin = _OUTER_RADIUS[1] + 3
    min_dist = 4 * _OUTER_RADIUS[1]
    objects: list[DemoObject] = []
    for _ in range(100 * count):
        if len(objects) == count:
            break
        y, x = rng.uniform(margin, size - margin, size=2)
        if any((o.y - y) ** 2 + (o.x - x) ** 2 < min_dist**2 for o in objects):
            continue
        outer = float(rng.uniform(*_OUTER_RADIUS))
        radius = outer if ring else _disc_radius(outer)
        objects.append(DemoObject(float(y), float(x), radius, ring))
    return objects


def _make_image(
    size: int,
    label: int,
    texture: np.ndarray,
    noise: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[DemoObject]]:
    """One ``(size, size, 3)`` uint8 image and the objects drawn in it."""
    t = _random_view(texture, rng)
    jitter = rng.uniform(-12.0, 12.0, size=3).astype(np.float32)
    light, dark = _LIGHT_RGB + jitter, _DARK_RGB + jitter
    planes = np.empty((3, size, size), dtype=np.float32)  # channel-first: contiguous planes
    for c in range(3):
        np.multiply(t, dark[c] - light[c], out=planes[c])
        planes[c] += light[c]
    objects = _place_objects(size, ring=label == 1, rng=rng)
    for obj in objects:
        region, alpha = render_object(obj, (size, size))
        for c in range(3):
            patch = planes[c][region]
            patch += alpha * (_OBJECT_RGB[c] - patch)
    for c in range(3):
        planes[c] += _random_view(noise, rng)
    np.clip(planes, 0.0, 255.0, out=planes)
    planes += 0.5  # round half up on the cast below
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[...] = planes.transpose(1, 2, 0)
    return image, objects


def demo_image(size: int, label: int, *, seed: int) -> tuple[np.ndarray, list[DemoObject]]:
    """One demo image of ``size`` px and its objects, from ``seed`` alone.

    The same seed with the other label gives the same background, noise and object positions
    with rings swapped for same-area discs (how the dataset's classes differ).

    Returns:
        ``(image, objects)``: a ``(size, size, 3)`` uint8 array and the drawn objects.
    """
    texture_seq, noise_seq, object_seq = np.random.SeedSequence(seed).spawn(3)
    texture = _periodic_texture(size, np.random.default_rng(texture_seq))
    noise = np.random.default_rng(noise_seq).standard_normal((size, size), dtype=np.float32)
    noise *= np.float32(_NOISE_STD)
    return _make_image(size, label, texture, noise, np.random.default_rng(object_seq))


def _tiff_bytes(image: np.ndarray, compress: bool) -> bytes:
    tile = min(_TILE, -(-image.shape[0] // 16) * 16)
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        image,
        photometric="rgb",
        tile=(tile, tile),
        compression="zlib" if compress else None,
        compressionargs={"level": 1} if compress else None,
        metadata=None,
        software=False,
        maxworkers=1,
    )
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def stratified_split(labels: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Stratified ~75/25 split of indices, at least one of each class on each side (for at
    least two of each class)."""
    train: list[int] = []
    val: list[int] = []
    for cls in (0, 1):
        idx = [i for i, lab in enumerate(labels) if lab == cls]
        n_val = min(len(idx) - 1, max(1, round(len(idx) / 4)))
        chosen = set(rng.choice(idx, size=n_val, replace=False).tolist())
        val += [i for i in idx if i in chosen]
        train += [i for i in idx if i not in chosen]
    return sorted(train), sorted(val)


def write_demo_dataset(
    out_dir: Path, n: int = 64, size: int = 2048, seed: int = 0, *, compress: bool = False
) -> Path:
    """Write a synthetic dataset whose label is only visible at full resolution.

    Args:
        out_dir: folder to write into (created if needed; existing files of the same names
            are replaced).
        n: number of images (at least 4), half of them positive.
        size: side of the square images in pixels (at least 32).
        seed: random seed; the same seed gives the same bytes.
        compress: zlib-compress the TIFF tiles (about 15% smaller, since the images are
            noisy, and about twice as slow to write). Uncompressed by default:
            ``n * size * size * 3`` bytes, e.g. 0.8 GB for the defaults.

    Returns:
        ``out_dir``, holding ``img_XXX.tif``, ``train.csv`` and ``val.csv``.

    Raises:
        ValueError: if ``n`` or ``size`` is too small.
    """
    if n < 4:
        raise ValueError(f"n must be at least 4 (two per class and split), got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    root = np.random.SeedSequence(seed)
    texture_seq, split_seq, *image_seqs = root.spawn(n + 2)
    texture_rng = np.random.default_rng(texture_seq)
    texture = _periodic_texture(size, texture_rng)
    noise = texture_rng.standard_normal((size, size), dtype=np.float32) * np.float32(_NOISE_STD)
    split_rng = np.random.default_rng(split_seq)
    labels = [1] * (n // 2) + [0] * (n - n // 2)
    labels = [int(v) for v in split_rng.permutation(labels)]
    width = max(3, len(str(n - 1)))
    names = [f"img_{i:0{width}d}.tif" for i in range(n)]
    for i, (name, label) in enumerate(zip(names, labels, strict=True)):
        image, _ = _make_image(size, label, texture, noise, np.random.default_rng(image_seqs[i]))
        _write_bytes(out_dir / name, _tiff_bytes(image, compress))
        log.debug("wrote %s (label %d)", name, label)
    train, val = stratified_split(labels, split_rng)
    for csv_name, idx in (("train.csv", train), ("val.csv", val)):
        write_csv(out_dir / csv_name, ["image", "label"], [(names[i], labels[i]) for i in idx])
    log.info(
        "demo dataset: %d images of %dx%d (%d train, %d val) in %s, %.1f s",
        n,
        size,
        size,
        len(train),
        len(val),
        out_dir,
        time.perf_counter() - start,
    )
    return out_dir
