"""Global-context layers stream exactly: statistics of whole maps between streamed parts.

Squeeze-excitation, ECA, selective-kernel attention, GroupNorm, InstanceNorm, global response
norm and BatchNorm with batch statistics each compute a statistic over every position and
then act on each position with it ([Statistics] in ``executor.statistics``). The engine keeps
the maps they reduce whole, computes the statistic once, streams what follows with it, and
chain-rules its gradient back ([Program] in ``executor.program``). Nothing in that is
approximate, so everything is held to the float64 oracle (output, every parameter gradient,
the input gradient and the running statistics), on odd sizes and tiles that do not divide
the image; float32 and bfloat16 by the oracle's rule.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from executor import (
    GeometryError,
    SegmentSpec,
    StreamingCNN,
    UnsupportedLayerError,
    analyze_trunk,
    build_program,
    map_cut_points,
)
from tests.executor.random_nets import (
    EfficientChannelAttention,
    ResponseNorm,
    SEBlock,
    Spec,
    SqueezeExcite,
    build,
    global_specs,
)
from tests.oracle import assert_exact, compare_with_conventional

# -- hand-built trunks ---------------------------------------------------------------------------


class TorchvisionSE(nn.Module):
    """torchvision's SqueezeExcitation: adaptive average pooling to one position."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class SelectiveKernel(nn.Module):
    """timm's selective kernel: two paths stacked, their sum's means pick a softmax mix."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.paths = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 5, padding=2)])
        self.reduce = nn.Conv2d(c, 4, 1)
        self.select = nn.Conv2d(4, 2 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([p(x) for p in self.paths], dim=1)  # (N, 2, C, H, W)
        s = paths.sum(1).mean((2, 3), keepdim=True)
        a = self.select(F.relu(self.reduce(s)))
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, 2, c // 2, h, w), dim=1)
        return (paths * a).sum(1)


class SharedStatistic(nn.Module):
    """One statistic used by two ops, one of them inside a residual branch."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.mix = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        s = y.pow(2).mean((2, 3), keepdim=True).sqrt()
        return self.mix(y / (s + 1.0)) + x * torch.tanh(s)


class TwoMaps(nn.Module):
    """A statistic of two maps at once (their covariance over positions)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        cov = (a * b).mean((2, 3), keepdim=True) - a.mean((2, 3), True) * b.mean((2, 3), True)
        return a * torch.sigmoid(cov) + b


def _seeded(trunk: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine weights and running statistics (fresh ones are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return trunk


def _stem(c: int = 4) -> list[nn.Module]:
    return [nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, stride=2, padding=1)]


CASES = {
    # name: (trunk builder, train mode for its norms)
    "squeeze-excitation (timm)": lambda: nn.Sequential(*_stem(), SqueezeExcite(4)),
    "squeeze-excitation (torchvision, adaptive pool)": lambda: nn.Sequential(
        *_stem(), TorchvisionSE(4), nn.Conv2d(4, 4, 3, padding=1)),
    "ECA (expand_as)": lambda: nn.Sequential(*_stem(), EfficientChannelAttention(), nn.ReLU()),
    "selective kernel": lambda: nn.Sequential(*_stem(), SelectiveKernel(4)),
    "global response norm (channels last)": lambda: nn.Sequential(
        *_stem(), ResponseNorm(4), nn.Conv2d(4, 4, 3, padding=1)),
    "GroupNorm": lambda: nn.Sequential(*_stem(), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3)),
    "F.group_norm": lambda: nn.Sequential(*_stem(), _Functional(lambda x: F.group_norm(x, 4))),
    "InstanceNorm, affine": lambda: nn.Sequential(
        *_stem(), nn.InstanceNorm2d(4, affine=True), nn.Conv2d(4, 4, 3)),
    "InstanceNorm, running statistics": lambda: nn.Sequential(
        *_stem(), nn.InstanceNorm2d(4, track_running_stats=True).train(), nn.ReLU()),
    "BatchNorm in train mode": lambda: nn.Sequential(
        *_stem(), nn.BatchNorm2d(4).train(), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=None).train()),
    "BatchNorm without running statistics": lambda: nn.Sequential(
        *_stem(), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()),
    "SE in residual blocks (strided shortcut)": lambda: nn.Sequential(
        *_stem(), SEBlock(4, 2, False), SEBlock(4, 1, True), SEBlock(4, 2, True)),
    "a statistic shared by two ops": lambda: nn.Sequential(*_stem(), SharedStatistic(4)),
    "a statistic of two maps": lambda: nn.Sequential(*_stem(), TwoMaps(4)),
}  # fmt: skip


class _Functional(nn.Module):
    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)  # type: ignore[operator]


def _case(name: str) -> nn.Module:
    torch.manual_seed(0)
    trunk = CASES[name]().eval()
    for m in trunk.modules():  # batch statistics: the norm layers of these cases train
        if isinstance(m, nn.modules.batchnorm._NormBase) and (
            not m.track_running_stats or "train" in name or "running" in name
        ):
            m.train()
    return _seeded(trunk)


@pytest.mark.parametrize("name", sorted(CASES))
def test_global_context_layer_streams_exactly(name: str) -> None:
    """Odd, non-square images; tiles that do not divide them; a batch of two (BatchNorm's
    statistics span the batch)."""
    trunk = _case(name)
    torch.manual_seed(1)
    image = torch.randn(2, 3, 41, 30)
    assert build_program(trunk).reductions, "the case has no statistic"
    for tile in (16, 24):
        result = compare_with_conventional(copy.deepcopy(trunk), image, tile)
        assert result.n_tiles >= 2


def test_float32_and_bfloat16_are_as_accurate_as_conventional() -> None:
    trunk = nn.Sequential(*_stem(), SEBlock(4, 2, True), nn.BatchNorm2d(4).train(),
                          SelectiveKernel(4))  # fmt: skip
    _seeded(trunk)
    torch.manual_seed(2)
    image = torch.randn(2, 3, 40, 36)
    compare_with_conventional(copy.deepcopy(trunk), image, 16, dtype=torch.float32)
    compare_with_conventional(copy.deepcopy(trunk), image, 16, dtype=torch.float32,
                              amp_dtype=torch.bfloat16)  # fmt: skip


# -- random trunks -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=global_specs(), height=st.integers(9, 60), width=st.integers(8, 60),
       tile=st.integers(6, 48), batch=st.integers(1, 2), seed=st.integers(0, 2**16))  # fmt: skip
def test_random_trunks_with_statistics_stream_exactly(
    spec: Spec, height: int, width: int, tile: int, batch: int, seed: int
) -> None:
    """Random local layers with squeeze-excitation, GroupNorm, InstanceNorm, GRN, ECA and
    train-mode BatchNorm at random places, inside and outside residual blocks."""
    torch.manual_seed(seed)
    # Four channels: a LayerNorm over two channels feeding a norm over whole maps makes
    # gradients so ill-conditioned that float64 rounding alone moves them by 1e-9.
    trunk = _seeded(build(spec, channels=4).double(), seed)
    image = torch.randn(batch, 4, height, width, dtype=torch.float64)
    try:
        out = copy.deepcopy(trunk)(image)
        assume(min(out.shape[2:]) >= 1)
    except (RuntimeError, ValueError):
        assume(False)  # too small for the trunk itself (e.g. a norm over one value)
    refused = None
    try:
        compare_with_conventional(trunk, image, tile)
    except GeometryError as err:
        refused = str(err)
    if refused is not None:
        # Refused, never wrong: a tile below a part's receptive field, sizes that pad or
        # split unlike their tiles, parts whose maps differ in size for this image.
        known = ("use a tile of at least", "pads 'same'", "space-to-depth", "reflect",
                 "multiple of", "merged maps")  # fmt: skip
        assert any(w in refused for w in known), refused
        assume(False)


# -- behaviour -----------------------------------------------------------------------------------


def _grads(trunk: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trunk.named_parameters() if p.grad is not None}


def test_running_statistics_update_once_per_forward_call() -> None:
    """Conventional training updates BatchNorm's running statistics once per forward call; so
    does streaming, also when the backward pass has to redo the forward pass (another image
    object) and when forward runs without grad (validation in train mode)."""
    trunk = _seeded(nn.Sequential(*_stem(), nn.BatchNorm2d(4).train(), nn.ReLU()).double())
    reference = copy.deepcopy(trunk)
    torch.manual_seed(3)
    images = [torch.randn(2, 3, 30, 26, dtype=torch.float64) for _ in range(3)]
    scnn = StreamingCNN(trunk, 12)
    out = scnn.forward(images[0])
    scnn.backward(images[0].clone(), torch.ones_like(out))  # recomputes: no second update
    with torch.no_grad():
        scnn.forward(images[1])
    scnn.forward(images[2])
    for image in images:
        reference(image)
    for (name, a), (_, b) in zip(trunk.named_buffers(), reference.named_buffers(), strict=True):
        if a.is_floating_point():
            assert_exact(a, b, name)
        else:
            assert torch.equal(a, b), name


def test_train_and_eval_switch_between_passes() -> None:
    """A trunk built in eval mode and switched to train() streams with batch statistics, and
    back: the program is read again whenever the modes change."""
    trunk = _seeded(nn.Sequential(*_stem(), nn.BatchNorm2d(4), SqueezeExcite(4)).double().eval())
    scnn = StreamingCNN(trunk, 12)
    torch.manual_seed(4)
    image = torch.randn(2, 3, 31, 29, dtype=torch.float64)
    for mode in (True, False, True):
        trunk.train(mode)
        conventional = copy.deepcopy(trunk)
        expected = conventional(image)
        assert_exact(scnn.forward(image), expected, f"train={mode}")
        for (name, a), (_, b) in zip(trunk.named_buffers(), conventional.named_buffers(),
                                     strict=True):  # fmt: skip
            if a.is_floating_point():
                assert_exact(a, b, name)


def test_the_last_tile_is_cached_with_its_statistics() -> None:
    """The cached last forward tile of the last part reads statistics: its backward gives
    their gradients too (a wrong cache would lose the excitation's gradient)."""
    trunk = _seeded(nn.Sequential(*_stem(), SqueezeExcite(4), nn.Conv2d(4, 4, 3)).double())
    torch.manual_seed(5)
    image = torch.randn(1, 3, 37, 33, dtype=torch.float64)
    cached = compare_with_conventional(copy.deepcopy(trunk), image, 14, cache_last_tile=True)
    plain = compare_with_conventional(copy.deepcopy(trunk), image, 14, cache_last_tile=False)
    assert cached.n_tiles == plain.n_tiles > 1


def test_segments_of_a_trunk_with_statistics() -> None:
    """Explicit segments name the ends the statistics place and may add single-map cuts;
    a wrong list is refused naming the ends that work."""
    trunk = _seeded(nn.Sequential(
        *_stem(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), SqueezeExcite(4),
        nn.Conv2d(4, 4, 3, padding=1),
    ).double())  # fmt: skip
    ends = StreamingCNN(trunk, 16).ends
    assert len(ends) == 1
    cut = map_cut_points(trunk)[1]
    specs = [SegmentSpec(cut, 20), SegmentSpec(ends[0], 9, 12), SegmentSpec(None, 7)]
    torch.manual_seed(6)
    image = torch.randn(1, 3, 45, 39, dtype=torch.float64)
    result = compare_with_conventional(trunk, image, 0, segments=specs)
    assert result.n_tiles > 3
    with pytest.raises(GeometryError, match=f"ending at {cut}, {ends[0]}"):
        StreamingCNN(trunk, segments=[SegmentSpec(cut, 20), SegmentSpec(None, 7)])


def test_inference_frees_what_no_backward_needs() -> None:
    """Under no_grad nothing is kept for a backward pass; the output is the same."""
    trunk = _seeded(nn.Sequential(*_stem(), SEBlock(4, 2, True), SEBlock(4, 1, False)).double())
    torch.manual_seed(7)
    image = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    scnn = StreamingCNN(trunk, 16)
    with torch.no_grad():
        out = scnn.forward(image)
    assert scnn._forward is None
    assert_exact(out, trunk(image), "output")


def test_statistic_of_the_image_itself() -> None:
    """A statistic taken on the image (its mean subtracted) reads the whole image once, also
    from an image source, and gives the exact input gradient."""
    trunk = nn.Sequential(_Functional(lambda x: x - x.mean((2, 3), keepdim=True)),
                          nn.Conv2d(3, 4, 3, padding=1)).double()  # fmt: skip
    torch.manual_seed(8)
    image = torch.randn(1, 3, 33, 30, dtype=torch.float64)
    assert compare_with_conventional(trunk, image, 12).n_tiles > 1


def test_the_users_module_is_left_as_it_was() -> None:
    """Tracing, decomposing and streaming change nothing of the user's module but what
    conventional training changes (gradients and running statistics)."""
    trunk = _seeded(nn.Sequential(*_stem(), nn.GroupNorm(2, 4), nn.BatchNorm2d(4).train(),
                                  SqueezeExcite(4)).double())  # fmt: skip
    before = {n: m for n, m in trunk.named_modules()}
    types = {n: type(m) for n, m in before.items()}
    params = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    image = torch.randn(2, 3, 30, 30, dtype=torch.float64)
    scnn = StreamingCNN(trunk, 12)
    out = scnn.forward(image)
    scnn.backward(image, torch.ones_like(out))
    assert {n: type(m) for n, m in trunk.named_modules()} == types
    for name, p in trunk.named_parameters():
        assert torch.equal(p, params[name]), name
    assert all(m is before[n] for n, m in trunk.named_modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in trunk.modules())


def test_what_stays_refused() -> None:
    """A trunk that ends in a statistic, and a strided map that cannot be recomputed on one
    grid, are refused naming the layer."""
    with pytest.raises(UnsupportedLayerError, match="adaptive/global pooling"):
        StreamingCNN(nn.Sequential(*_stem(), nn.AdaptiveAvgPool2d(1)), 16)
    geometry = analyze_trunk(nn.Sequential(*_stem(), SqueezeExcite(4)))
    assert geometry.output_stride == (2, 2)


# -- what the traced code does, as the code does it ----------------------------------------------


class _Net(nn.Module):
    """A small trunk around ``body(self, x)`` (a statistic somewhere in it)."""

    def __init__(self, body: object) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.norm = nn.GroupNorm(2, 4)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.body(self, self.a(x)))  # type: ignore[operator]


IN_PLACE = {
    # A statistic of x, then x changed in place: the statistic sees x before the change.
    "inplace module": lambda m, x: _mean_then(m.act, x),
    "torch.relu_": lambda m, x: _mean_then(torch.relu_, x),
    "F.relu_": lambda m, x: _mean_then(F.relu_, x),
    "method": lambda m, x: _mean_then(lambda t: t.mul_(2.0), x),
    "inplace kwarg": lambda m, x: _mean_then(lambda t: F.relu(t, inplace=True), x),
    "alias then change": lambda m, x: _alias_then(x),
    # The classic squeeze-excitation spelling with sizes from x.size().
    "expand to x.size()": lambda m, x: _expand_se(x),
    # An unpadded convolution handed on next to a padded map of the same stride.
    "maps of two lengths": lambda m, x: _two_lengths(m, x),
}  # fmt: skip


def _mean_then(change: object, x: torch.Tensor) -> torch.Tensor:
    s = x.mean((2, 3), keepdim=True)
    y = change(x)  # type: ignore[operator]
    return y * torch.sigmoid(s) + x


def _alias_then(x: torch.Tensor) -> torch.Tensor:
    s = x.mean((2, 3), keepdim=True)
    z = x.contiguous()
    z.mul_(3.0)
    return x * torch.sigmoid(s)


def _expand_se(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.size()
    y = x.mean((2, 3)).sigmoid().view(b, c, 1, 1)
    return x * y.expand(b, c, h, w)


def _two_lengths(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    s = x.mean((2, 3), keepdim=True)
    y = F.conv2d(x, m.b.weight)  # no padding: 2 px shorter per axis
    return F.pad(y * s, (1, 1, 1, 1))


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_in_place_changes_and_shape_reads_stream_as_the_code_computes(name: str) -> None:
    trunk = _Net(IN_PLACE[name])
    torch.manual_seed(9)
    image = torch.randn(2, 3, 30, 26, dtype=torch.float64)
    assert len(build_program(trunk).parts) > 1
    compare_with_conventional(trunk, image, 12)


def test_an_in_place_change_of_part_of_a_map_is_refused_between_statistics() -> None:
    """``x[:, :2].relu_()`` changes x through a view: streamed as one part the user's module
    runs and it is exact; with a statistic the parts would not see it, so it is refused."""

    def body(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x[:, :2].relu_()
        return x

    image = torch.randn(1, 3, 30, 26, dtype=torch.float64)
    compare_with_conventional(_Net(body), image, 12)

    def with_norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = m.norm(x)
        x[:, :2].relu_()
        return x

    with pytest.raises(UnsupportedLayerError, match="changes part of a map in place"):
        StreamingCNN(_Net(with_norm), 12)


def test_active_dropout_on_a_statistic_is_refused() -> None:
    def body(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x * F.dropout(x.mean((2, 3), keepdim=True), 0.5, True)

    with pytest.raises(UnsupportedLayerError, match="random values on a statistic"):
        StreamingCNN(_Net(body), 12)


def test_timm_batch_norm_counts_batches_when_it_runs_not_when_it_is_read() -> None:
    """timm's BatchNormAct2d counts batches in its own code: reading the trunk (building an
    engine, checking a plan) does not count, every streamed forward in train mode counts
    once, as conventional forwards do."""
    timm = pytest.importorskip("timm")
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), timm.layers.BatchNormAct2d(4),
                          nn.Conv2d(4, 4, 3, padding=1)).double().train()  # fmt: skip
    reference = copy.deepcopy(trunk)
    scnn = StreamingCNN(trunk, 12)
    analyze_trunk(trunk)
    map_cut_points(trunk)
    assert int(trunk[1].num_batches_tracked) == 0
    for _ in range(3):
        image = torch.randn(2, 3, 30, 26, dtype=torch.float64)
        assert_exact(scnn.forward(image), reference(image), "output")
    assert int(trunk[1].num_batches_tracked) == 3
    assert_exact(trunk[1].running_mean, reference[1].running_mean, "running mean")


def test_a_trunk_moved_after_construction_is_read_again() -> None:
    """``.double()`` replaces the buffers the engine read: the running statistics it updates
    are the trunk's new ones."""
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 3, padding=1)).train()  # fmt: skip
    scnn = StreamingCNN(trunk, 12)
    trunk.double()
    reference = copy.deepcopy(trunk)
    image = torch.randn(2, 3, 30, 26, dtype=torch.float64)
    assert_exact(scnn.forward(image), reference(image), "output")
    assert_exact(trunk[1].running_var, reference[1].running_var, "running var")


def test_switching_modes_between_forward_and_backward_is_refused() -> None:
    from executor import StreamingError

    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double().eval()
    scnn = StreamingCNN(trunk, 12)
    image = torch.randn(1, 3, 30, 26, dtype=torch.float64)
    out = scnn.forward(image)
    trunk.train()
    with pytest.raises(StreamingError, match="changed between forward and backward"):
        scnn.backward(image, torch.ones_like(out))


def test_statistic_gradients_are_summed_wide_over_many_tiles() -> None:
    """Under bfloat16 autocast a statistic's gradient sums hundreds of tiles' parts: in
    float32, so streaming stays as accurate as conventional backprop."""
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SqueezeExcite(4),
                          nn.Conv2d(4, 4, 3, padding=1))  # fmt: skip
    torch.manual_seed(10)
    image = torch.randn(1, 3, 128, 128)
    result = compare_with_conventional(trunk, image, 8, dtype=torch.float32,
                                       amp_dtype=torch.bfloat16)  # fmt: skip
    assert result.n_tiles >= 256


def test_a_statistic_of_an_image_source_is_read_whole_once() -> None:
    """A statistic of the image reads the whole image in the forward pass; the backward pass
    reads it whole again only when the image's gradient is wanted (``input_grad``): a
    gradient nobody needs is not computed, the cached last tile included."""
    from executor import TensorSource

    class Counted(TensorSource):
        def __init__(self, tensor: torch.Tensor) -> None:
            super().__init__(tensor)
            self.whole = 0

        def read(self, region: Sequence[slice]) -> torch.Tensor:
            full = all(s.stop - s.start == n for s, n in zip(region, self.shape[2:],
                                                             strict=True))  # fmt: skip
            self.whole += full
            return super().read(region)

    trunk = nn.Sequential(nn.InstanceNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1))  # fmt: skip
    image = torch.randn(1, 3, 40, 40)
    for cache in (True, False):
        source = Counted(image)
        scnn = StreamingCNN(trunk, 16, cache_last_tile=cache)
        out = scnn.forward(source)
        scnn.backward(source, torch.ones_like(out))
        assert source.whole == 1, (cache, source.whole)


def test_a_segment_that_changes_its_input_in_place_reads_copies() -> None:
    """Segments read kept maps in place unless their code changes an input in place (a
    ReLU built with ``inplace=True`` right after a cut): then they read copies, and the kept
    map is still there for the backward pass."""
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 3, padding=1), SqueezeExcite(4)).double()  # fmt: skip
    cut = map_cut_points(trunk)[0]
    scnn = StreamingCNN(
        trunk,
        segments=[
            SegmentSpec(cut, 16),
            *(SegmentSpec(end, 16) for end in StreamingCNN(trunk, 16).ends),
            SegmentSpec(None, 16),
        ],
    )
    assert scnn.program.streams[1].changes_inputs
    assert not scnn.program.streams[-1].changes_inputs
    image = torch.randn(1, 3, 40, 36, dtype=torch.float64)
    specs = scnn.specs
    assert compare_with_conventional(trunk, image, 0, segments=list(specs or ())).n_tiles > 3
