"""Augmentation on region reads (``tileplan.augment``).

Oracles:
- for streaming: the whole image augmented first (``read_all`` of the augmented source) and
  streamed from a tensor. Streaming the augmented source, read crop by crop from a slide on
  disk, must give the same output and gradients bit for bit (float64), whatever the tiles;
- for each augmentation: an independent computation on the whole image (``torch.flip``,
  ``torch.rot90``, slicing, scikit-image's colour deconvolution in float64, the formulas).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from executor import SegmentedStreamingCNN, SegmentSpec, StreamingCNN, TensorSource
from tileplan.augment import OPS, Augmentation, AugmentedSource, AugmentError, ImageParams
from tileplan.augment.colour import ColourParams, apply_colour, hed_tables, mix_matrix, tone_table
from tileplan.augment.geometry import Geometry
from tileplan.augment.noise import gaussian_noise
from tileplan.augment.spec import canonical, parse_spec
from tileplan.run.demo_slides import write_pyramidal_tiff
from tileplan.run.slides import SlideSource, choose_region, open_pyramid

EVERY_OP = ",".join(n if OPS[n].default is None else f"{n}:{OPS[n].default:g}" for n in OPS
                    if n not in ("scale", "rotate", "crop")) + ",rotate:25,crop:0.8"  # fmt: skip


def _image(shape: tuple[int, ...] = (1, 3, 67, 91), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)  # fmt: skip


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("aug")
    return Path(write_pyramidal_tiff(root / "s.tif", 300, 420, mpp=0.5, seed=5, label=1,
                                     compression="zlib", downsamples=(1, 2)))  # fmt: skip


# -- every crop equals the same part of the whole augmented image ------------------------------


@pytest.mark.parametrize("spec", [*OPS.keys() - {"scale"}, "default", EVERY_OP])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_a_region_read_equals_the_same_part_of_the_whole(spec: str, data: st.DataObject) -> None:
    image = _image()
    epoch, index = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 50))
    source = Augmentation.parse(spec).apply(image, seed=3, epoch=epoch, index=index)
    whole = source.read_all()
    h, w = source.shape[2:]
    y0, x0 = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    y1, x1 = data.draw(st.integers(y0 + 1, h)), data.draw(st.integers(x0 + 1, w))
    part = source.read((slice(y0, y1), slice(x0, x1)))
    assert torch.equal(part, whole[..., y0:y1, x0:x1])


def _trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        c1=nn.Conv2d(3, 5, 5, stride=2, padding=2), a1=nn.ReLU(),
        c2=nn.Conv2d(5, 6, 3, padding=1), a2=nn.ReLU(), p=nn.MaxPool2d(2),
        c3=nn.Conv2d(6, 6, 3, stride=2, padding=1),
    )).double()  # fmt: skip


def _normalise(crop: torch.Tensor) -> torch.Tensor:
    return crop.to(torch.float64) / 255.0 - 0.5


def _stream(make, image):  # noqa: ANN001, ANN202
    """Output, every parameter gradient and the input gradient of one streamed step."""
    trunk = _trunk()
    scnn = make(trunk)
    out = scnn.forward(image).requires_grad_()
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    (out.tanh() * weights).sum().backward()
    image_grad = scnn.backward(image, out.grad)
    return out.detach(), [p.grad.clone() for p in trunk.parameters()], image_grad


@pytest.mark.parametrize(
    ("spec", "segmented"),
    [("default", False), (EVERY_OP, False), ("dihedral,elastic:6,noise,cutout", True),
     ("scale:0.3,crop:0.9,hed", False)],
)  # fmt: skip
def test_streaming_an_augmented_slide_equals_streaming_the_augmented_image(
    slide: Path, spec: str, segmented: bool
) -> None:
    """Read from disk crop by crop (tiles of 72 px: they divide neither side), the augmented
    slide streams to exactly what the whole augmented image streams to."""
    pyramid = open_pyramid(slide)
    base = SlideSource(pyramid, choose_region(pyramid, mpp=0.9))
    for epoch in (0, 1):
        source = Augmentation.parse(spec).apply(base, seed=11, epoch=epoch, index=4)
        whole = source.read_all()
        if segmented:

            def make(t: nn.Module) -> SegmentedStreamingCNN:
                return SegmentedStreamingCNN(t, [SegmentSpec("a2", 72), SegmentSpec(None, 24)],
                                             input_grad=True, preprocess=_normalise)  # fmt: skip
        else:

            def make(t: nn.Module) -> StreamingCNN:
                return StreamingCNN(t, 72, input_grad=True, preprocess=_normalise)

        got, expected = _stream(make, source), _stream(make, whole)
        assert torch.equal(got[0], expected[0])
        assert torch.equal(got[2], expected[2])
        for g, e in zip(got[1], expected[1], strict=True):
            assert torch.equal(g, e)
        assert make(_trunk()).tile_grids(whole.shape[2:])[0].n_tiles > 4


def test_a_batch_streams_each_image_with_its_own_parameters() -> None:
    images = _image((3, 3, 64, 64))
    augmentation = Augmentation.parse("dihedral,hed,noise")
    batch = augmentation.apply(images, seed=1, epoch=0, index=[7, 2, 9])
    whole = batch.read_all()
    for k, index in enumerate([7, 2, 9]):
        alone = augmentation.apply(images[k : k + 1], seed=1, epoch=0, index=index).read_all()
        assert torch.equal(whole[k : k + 1], alone)
    got = _stream(lambda t: StreamingCNN(t, 40, input_grad=True, preprocess=_normalise), batch)
    expected = _stream(lambda t: StreamingCNN(t, 40, input_grad=True, preprocess=_normalise), whole)
    assert torch.equal(got[0], expected[0])
    for g, e in zip(got[1], expected[1], strict=True):
        assert torch.equal(g, e)


# -- each augmentation against an independent computation -------------------------------------


def _whole(spec: str, image: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, ImageParams]:
    source = Augmentation.parse(spec).apply(image, seed=0, epoch=0, index=index)
    assert isinstance(source, AugmentedSource)
    return source.read_all(), source.params[0]


def _symmetry(image: torch.Tensor, g: Geometry) -> torch.Tensor:
    out = image.transpose(-1, -2) if g.perm == (1, 0) else image
    dims = [d for d, f in zip((-2, -1), g.flips, strict=True) if f]
    return out.flip(dims) if dims else out


def test_the_symmetries_are_the_eight_of_the_square() -> None:
    image = _image((1, 3, 40, 40))
    seen = set()
    for index in range(64):
        got, p = _whole("dihedral", image, index)
        g = p.geometry
        assert torch.equal(got, _symmetry(image, g))
        seen.add((g.perm, g.flips))
    assert len(seen) == 8
    rotations = set()
    for index in range(32):
        got, _ = _whole("rot90", image, index)
        k = next(k for k in range(4) if torch.equal(got, torch.rot90(image, k, (-2, -1))))
        rotations.add(k)
    assert rotations == {0, 1, 2, 3}


def test_transposition_is_left_out_where_it_would_not_fit_the_plan() -> None:
    image = _image((1, 3, 30, 50))
    augmentation = Augmentation.parse("dihedral", max_shape=(30, 50))
    assert augmentation.shapes((30, 50)) == {(30, 50)}
    for index in range(16):
        assert augmentation.apply(image, seed=0, epoch=0, index=index).shape == (1, 3, 30, 50)
    assert Augmentation.parse("dihedral").shapes((30, 50)) == {(30, 50), (50, 30)}


def test_a_crop_is_a_slice_of_the_image_at_a_drawn_offset() -> None:
    image = _image((1, 3, 50, 70))
    offsets = set()
    for index in range(10):
        got, p = _whole("crop:0.6", image, index)
        (y0, x0), (h, w) = p.geometry.start, p.geometry.size
        assert (h, w) == (30, 42)
        assert torch.equal(got, image[..., y0 : y0 + h, x0 : x0 + w])
        offsets.add((y0, x0))
    assert len(offsets) > 5


def test_rotation_by_a_quarter_turn_is_rot90_and_a_zero_field_is_the_identity() -> None:
    image = _image((1, 3, 33, 33)).numpy()[0]
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])  # a quarter turn
    quarter = Geometry((33, 33), (0, 0), (33, 33), (0, 1), (False, False), rotation=turn)
    params = ImageParams(quarter)
    got = AugmentedSource(TensorSource(torch.from_numpy(image)[None]), [params]).read_all()[0]
    assert torch.equal(got, torch.from_numpy(np.rot90(image, -1, (1, 2)).copy())) or torch.equal(
        got, torch.from_numpy(np.rot90(image, 1, (1, 2)).copy())
    )
    still = Geometry((33, 33), (0, 0), (33, 33), (0, 1), (False, False),
                     field=np.zeros((2, 3, 3)))  # fmt: skip
    got = AugmentedSource(TensorSource(torch.from_numpy(image)[None]), [ImageParams(still)])
    assert torch.equal(got.read_all()[0], torch.from_numpy(image))


def test_rotation_reads_each_crop_with_the_margin_its_inverse_map_needs() -> None:
    """A crop of a rotated image reads the bounding box of its pixels' source coordinates: at
    45 degrees a centred 20 px crop needs about 20 sqrt(2) px of the source."""
    image = _image((1, 3, 101, 101))
    boxes = []

    class Recording(TensorSource):
        def read(self, region):  # noqa: ANN001, ANN202
            boxes.append(tuple(s.stop - s.start for s in region))
            return super().read(region)

    c = math.cos(math.pi / 4)
    g = Geometry((101, 101), (0, 0), (101, 101), (0, 1), (False, False),
                 rotation=np.array([[c, -c], [c, c]]))  # fmt: skip
    AugmentedSource(Recording(image), [ImageParams(g)]).read((slice(40, 60), slice(40, 60)))
    ((h, w),) = boxes
    assert 28 <= h <= 31
    assert 28 <= w <= 31


def _hed_reference(rgb: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Stain jitter the way scikit-image's rgb2hed and hed2rgb compute it, in float64 on the
    whole ``(H, W, 3)`` image (without rgb2hed's clip of negative stains, see colour.py)."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    x = np.maximum(rgb / 255.0, 1e-6)
    stains = (np.log(x) / np.log(1e-6)) @ hed_from_rgb
    stains = stains * scale + shift
    out = np.exp((stains * np.log(1e-6)) @ rgb_from_hed)
    return np.clip(np.rint(np.clip(out, 0, 1) * 255), 0, 255)


def test_hed_jitter_matches_scikit_image_and_is_the_identity_without_jitter() -> None:
    image = _image((3, 40, 50)).numpy()
    same = apply_colour(image, ColourParams(hed=hed_tables(np.ones(3), np.zeros(3))))
    assert np.array_equal(same, image)
    scale, shift = np.array([1.05, 0.93, 1.02]), np.array([0.03, -0.04, 0.01])
    got = apply_colour(image, ColourParams(hed=hed_tables(scale, shift)))
    ref = _hed_reference(image.transpose(1, 2, 0).astype(np.float64), scale, shift)
    diff = np.abs(got.astype(int) - ref.transpose(2, 0, 1))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01
    assert (got != image).mean() > 0.5


def test_tone_and_colour_matrix_follow_their_formulas() -> None:
    image = _image((3, 30, 30)).numpy()
    table = tone_table(1.1, 0.9, 1.2)
    v = image / 255.0
    ref = np.rint(np.clip((v * 1.1 - 0.5) * 0.9 + 0.5, 0, 1) ** 1.2 * 255)
    assert np.array_equal(apply_colour(image, ColourParams(tone=table)), ref.astype(np.uint8))
    grey = apply_colour(image, ColourParams(mix=mix_matrix(0.0, 0.0)))
    luma = np.rint(np.tensordot([0.299, 0.587, 0.114], image.astype(np.float64), 1))
    assert np.abs(grey.astype(int) - luma[None]).max() <= 1
    assert (grey == grey[0:1]).all()  # no saturation: every channel the same
    turned = apply_colour(image, ColourParams(mix=mix_matrix(1.0, 1.0)))  # a full turn
    assert np.abs(turned.astype(int) - image).max() <= 1


def test_noise_is_a_function_of_the_global_coordinate() -> None:
    z = gaussian_noise(123, 3, (400, 500), (slice(0, 400), slice(0, 500)))
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1) < 0.01
    part = gaussian_noise(123, 3, (400, 500), (slice(17, 40), slice(100, 133)))
    assert np.array_equal(part, z[:, 17:40, 100:133])
    assert not np.array_equal(gaussian_noise(124, 3, (400, 500), (slice(0, 4), slice(0, 5))),
                              z[:, :4, :5])  # fmt: skip
    image = torch.full((1, 1, 200, 200), 128, dtype=torch.uint8)
    got, _ = _whole("noise:0.1", image)
    assert abs(got.double().std().item() - 25.5) < 1.0


def test_cutout_fills_one_box_with_the_fill_value() -> None:
    image = torch.full((1, 3, 50, 60), 7, dtype=torch.uint8)
    source = Augmentation.parse("cutout:0.2", fill=(1, 2, 3)).apply(image, seed=0, epoch=0, index=0)
    (((y0, x0), (y1, x1)),) = source.params[0].cutout
    assert (y1 - y0, x1 - x0) == (10, 12)
    got = source.read_all()[0]
    assert (got[:, y0:y1, x0:x1] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all()
    assert int((got != 7).any(0).sum()) == 120


def test_scale_jitter_reads_the_slide_at_another_resolution(slide: Path) -> None:
    pyramid = open_pyramid(slide)
    base = SlideSource(pyramid, choose_region(pyramid, mpp=1.0))  # 150 x 210
    for factor in (1.25, 0.8):
        other = base.rescaled(factor)
        direct = SlideSource(pyramid, choose_region(pyramid, mpp=1.0 * factor))
        if factor > 1:  # coarser: the whole slide at the other resolution
            assert torch.equal(other.read_all(), direct.read_all())
        else:  # finer: the centre of it, at most this region's size
            y0, x0, h, w = other.region.box
            assert (h, w) == (150, 210)
            assert torch.equal(other.read_all(), direct.read_all()[..., y0 : y0 + h, x0 : x0 + w])


# -- parameters are a function of (seed, epoch, image) -----------------------------------------


def test_parameters_depend_on_seed_epoch_and_image_only() -> None:
    image = _image()
    a = Augmentation.parse("default,noise,cutout")
    first = a.apply(image, seed=1, epoch=2, index=3).read_all()
    assert torch.equal(first, a.apply(image, seed=1, epoch=2, index=3).read_all())
    others = [a.apply(image, seed=s, epoch=e, index=i).read_all()
              for s, e, i in ((2, 2, 3), (1, 3, 3), (1, 2, 4))]  # fmt: skip
    assert all(not torch.equal(first, o) for o in others)
    # Naming another op leaves the others' draws alone (each op has its own stream).
    g1 = a.apply(image, seed=1, epoch=2, index=3).params[0].geometry
    g2 = Augmentation.parse("default,rotate").apply(image, seed=1, epoch=2, index=3).params[0]
    assert (g1.perm, g1.flips) == (g2.geometry.perm, g2.geometry.flips)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [("flip,blur", "unknown augmentation 'blur'; use a comma-separated list of scale, crop"),
     ("hed:0.9", "'hed:0.9': hed takes a strength 0 < S <= 0.5"),
     ("flip:2", "'flip:2': flip takes no strength"),
     ("noise:abc", "the strength 'abc' is not a number"),
     ("hue,hue:0.1", "'hue' is named twice")],
)  # fmt: skip
def test_bad_specs_are_one_line_naming_the_token(text: str, message: str) -> None:
    with pytest.raises(AugmentError, match=None) as caught:
        parse_spec(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_canonical_spec_names_every_strength_in_order() -> None:
    assert canonical("hed, FLIP") == "flip,hed:0.05"
    assert canonical("none") == canonical("") == ""
    assert canonical("default") == canonical(canonical("default"))


def test_ops_the_pixels_cannot_take_are_refused() -> None:
    with pytest.raises(AugmentError, match="8-bit"):
        Augmentation.parse("hed").apply(torch.rand(1, 3, 20, 20), seed=0, epoch=0, index=0)
    with pytest.raises(AugmentError, match="RGB"):
        Augmentation.parse("hue").apply(_image((1, 1, 20, 20)), seed=0, epoch=0, index=0)
    with pytest.raises(AugmentError, match="scale"):
        Augmentation.parse("scale").apply(_image(), seed=0, epoch=0, index=0)
    # Remaps, noise and cutout work on float images.
    floats = torch.rand(1, 2, 20, 30, dtype=torch.float32)
    got = Augmentation.parse("dihedral,noise,cutout").apply(floats, seed=0, epoch=0, index=0)
    assert got.read_all().dtype == torch.float32


# -- host memory ---------------------------------------------------------------------------------

_CHILD = """
import json, sys, torch
from torch import nn
from executor import StreamingCNN
from tileplan import use_host_allocator
from tileplan.augment import Augmentation
from tileplan.planning.measure_child import peak_rss, reset_peak_rss
from tileplan.run.slides import SlideSource, choose_region, open_pyramid

use_host_allocator()
torch.manual_seed(0)
trunk = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Conv2d(4, 4, 4, stride=4))
scnn = StreamingCNN(trunk, 512, preprocess=lambda c: c.float() / 255)
augmentation = Augmentation.parse(sys.argv[1])
results = []
for path in ["warm-up", *sys.argv[2:]]:
    if path == "warm-up":  # kernels, allocator, the augmentation's tables
        source = augmentation.apply(torch.zeros(1, 3, 1100, 1100, dtype=torch.uint8),
                                    seed=0, epoch=0, index=0)
    else:
        pyramid = open_pyramid(path)
        base = SlideSource(pyramid, choose_region(pyramid))
        source = augmentation.apply(base, seed=0, epoch=0, index=0)
    setup = reset_peak_rss()
    out = scnn.forward(source).requires_grad_()
    out.sum().backward()
    grad = out.grad
    del out
    scnn.backward(source, grad)
    del grad, source
    results.append(peak_rss() - setup)
print(json.dumps(results[1:]))
"""


def test_an_augmented_slide_step_holds_crops_not_the_image(tmp_path: Path) -> None:
    """In a fresh process, a forward and backward pass over a slide augmented with rotation,
    elastic deformation, noise, cutout and the default set: the RSS high-water mark above the
    set-up does not grow with the slide (2048² and 4096², 12 and 48 MiB decoded); it is a few
    crops (512 px tiles) and their float64 interpolation temporaries."""
    import json
    import subprocess
    import sys

    sides = (2048, 4096)
    paths = [write_pyramidal_tiff(tmp_path / f"s{side}.tif", side, side, mpp=0.5, seed=1,
                                  label=1, compression="jpeg", downsamples=(1, 8))
             for side in sides]  # fmt: skip
    spec = "default,rotate:20,elastic:6,noise,cutout"
    done = subprocess.run([sys.executable, "-c", _CHILD, spec, *map(str, paths)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    small, large = json.loads(done.stdout.strip().splitlines()[-1])
    grown = large - small
    decoded_growth = 3 * (sides[1] ** 2 - sides[0] ** 2)  # 36 MiB
    assert grown < decoded_growth / 4, (small >> 20, large >> 20)


def test_a_repeated_draw_is_augmented_anew_and_the_source_is_never_written() -> None:
    from tileplan.run.augment_log import draw_counts

    assert draw_counts([3, 1, 3, 3, 0, 1]) == [0, 0, 1, 2, 0, 1]
    image = _image()
    a = Augmentation.parse("default,noise")
    first = a.apply(image, seed=0, epoch=0, index=5).read_all()
    again = a.apply(image, seed=0, epoch=0, index=5, repeat=1).read_all()
    assert not torch.equal(first, again)
    # Cutout of an identity geometry must not fill the source's own pixels (a view).
    pixels = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)

    class Views(TensorSource):
        def read(self, region):  # noqa: ANN001, ANN202
            return self.tensor[(..., *region)]  # no copy

    got = Augmentation.parse("cutout:0.5", fill=(9, 9, 9)).apply(
        Views(pixels), seed=0, epoch=0, index=0).read_all()  # fmt: skip
    assert int((got == 9).sum()) == 3 * 20 * 20
    assert int(pixels.sum()) == 0
