"""Real model code: timm CNN families (random init, nothing downloaded).

Each family either streams to its global pool (the automatic split ends where the classifier's
pooling begins; global-context layers inside the blocks stream with their statistics) or is
refused for a true reason, checked by name; and whatever streams is exact against conventional
backprop in float64 (output, every parameter gradient, the input gradient) over several tiles
in both axes. To stay fast, exactness is checked on the deepest prefix of the streamed trunk
whose smallest tile is at most ``MAX_TILE`` px (a trunk of local layers) or that holds at most
``MAX_PARAMS`` weights (a trunk with statistics, whose parts each have a small halo): the
prefix holds the family's own layer code (its blocks, norms, padding and channel ops).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from executor import GeometryError, analyze_trunk, build_program, load_plan, trace
from tests.oracle import compare_with_conventional
from tileplan.cli import cli
from tileplan.planning.model_file import Split, split_model

timm = pytest.importorskip("timm")

MAX_TILE = 96  # px: the deepest prefix whose smallest tile is at most this is checked
MAX_PARAMS = 12_000_000  # of a trunk with statistics: float64 time grows with its weights

# family: (timm model, output stride of the automatic trunk, words of why it ends there)
GLOBAL_POOL = "adaptive/global pooling"
STREAMED = {
    "ResNet": ("resnet18", 32, GLOBAL_POOL),
    "ResNet-D (avg-pool shortcut)": ("resnet50d", 32, GLOBAL_POOL),
    "ResNeXt (grouped conv, ByobNet)": ("resnext26ts", 32, GLOBAL_POOL),
    "Res2Net (channel split)": ("res2net50_26w_4s", 32, GLOBAL_POOL),
    "GENet": ("gernet_s", 32, GLOBAL_POOL),
    "RegNetX": ("regnetx_002", 32, GLOBAL_POOL),
    "EfficientNet-lite (BatchNormAct2d)": ("efficientnet_lite0", 32, GLOBAL_POOL),
    "TF EfficientNet-lite (dynamic same padding)": ("tf_efficientnet_lite0", 32, GLOBAL_POOL),
    "MobileNetV2": ("mobilenetv2_100", 32, GLOBAL_POOL),
    "MnasNet": ("mnasnet_100", 32, GLOBAL_POOL),
    "SPNASNet": ("spnasnet_100", 32, GLOBAL_POOL),
    "FBNet": ("fbnetc_100", 32, GLOBAL_POOL),
    "CSPDarkNet (channel split)": ("cspdarknet53", 32, GLOBAL_POOL),
    "CSPResNet": ("cspresnet50", 32, GLOBAL_POOL),
    "DarkNet": ("darknet53", 32, GLOBAL_POOL),
    "DPN (dual path: split + concat)": ("dpn68", 32, GLOBAL_POOL),
    "VoVNet (one-shot concat)": ("vovnet39a", 32, GLOBAL_POOL),
    "Xception": ("xception41", 32, GLOBAL_POOL),
    "Inception-v3": ("inception_v3", 32, GLOBAL_POOL),
    "DLA (tree aggregation)": ("dla34", 32, GLOBAL_POOL),
    "DenseNet": ("densenet121", 32, GLOBAL_POOL),
    "VGG (untraceable ConvMlp head)": ("vgg11", 32, "cannot be traced"),
    "RepVGG": ("repvgg_a0", 32, GLOBAL_POOL),
    "MobileOne": ("mobileone_s0", 32, GLOBAL_POOL),
    "NF-ResNet (ScaledStdConv2d)": ("nf_resnet26", 32, GLOBAL_POOL),
    "ConvNeXt (channels-last LayerNorm)": ("convnext_atto", 32, GLOBAL_POOL),
    "HGNetV2": ("hgnetv2_b0", 32, GLOBAL_POOL),
    "CS3DarkNet": ("cs3darknet_s", 32, GLOBAL_POOL),
    "SelecSLS": ("selecsls42b", 64, GLOBAL_POOL),
    # Global context inside the blocks: statistics of whole maps between streamed parts.
    "MixNet (mixed kernels, squeeze-excitation)": ("mixnet_s", 32, GLOBAL_POOL),
    "TF MixNet (same padding, squeeze-excitation)": ("tf_mixnet_s", 32, GLOBAL_POOL),
    "GhostNet (cheap ops, squeeze-excitation)": ("ghostnet_100", 32, GLOBAL_POOL),
    "TResNet (space-to-depth, squeeze-excitation)": ("tresnet_m", 32, GLOBAL_POOL),
    "SE-ResNet (squeeze-excitation)": ("seresnet18", 32, GLOBAL_POOL),
    "RegNetY (squeeze-excitation)": ("regnety_002", 32, GLOBAL_POOL),
    "EfficientNet (squeeze-excitation)": ("efficientnet_b0", 32, GLOBAL_POOL),
    "MobileNetV3 (hard-sigmoid squeeze-excitation)": ("mobilenetv3_small_100", 32, GLOBAL_POOL),
    "ECA-ResNet (efficient channel attention)": ("ecaresnet26t", 32, GLOBAL_POOL),
    "SK-ResNet (selective kernel)": ("skresnet18", 32, GLOBAL_POOL),
    "ResNeSt (split attention, strided shortcut)": ("resnest14d", 32, GLOBAL_POOL),
    "NFNet (squeeze-excitation, in-place skip gain)": ("dm_nfnet_f0", 32, GLOBAL_POOL),
    "BiT ResNetV2 (GroupNorm)": ("resnetv2_50x1_bit", 32, GLOBAL_POOL),
    "PoolFormer (GroupNorm)": ("poolformer_s12", 32, GLOBAL_POOL),
    "ConvNeXt-V2 (global response norm)": ("convnextv2_atto", 32, GLOBAL_POOL),
    "GC-ResNet (global context attention pooling)": ("gcresnet33ts", 32, GLOBAL_POOL),
}

# family: (timm model, where the automatic trunk stops, words of the true reason)
REFUSED = {
    "HRNet (upsampling fusion)": ("hrnet_w18_small", "fuse_layers", "upsampling"),
    "GhostNetV2 (DFC attention)": ("ghostnetv2_100", "ghost1", "upsampling"),
    "BoTNet (self-attention)": ("botnet26t_256", "self_attn", "spatial dims"),
    "EdgeNeXt (transposed attention)": (
        "edgenext_xx_small",
        "stages.1.blocks.1",
        "written back onto them",
    ),
    "EfficientViT (linear attention)": ("efficientvit_b0", "context_module", "cannot be traced"),
    "MobileViT (transformer blocks)": ("mobilevit_xxs", "stages.2.1", "cannot be traced"),
}


def timm_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial frozen statistics (fresh ones are the identity)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def small_prefix(split: Split) -> nn.Module:
    """The deepest prefix of the streamed trunk whose smallest tile is at most MAX_TILE px."""
    trunk = split.trunk  # a graph module: cutting it again does not trace the model again
    skip = ("placeholder", "output", "get_attr")
    names = [n.name for n in trace(trunk).graph.nodes if n.op not in skip]

    def min_tile(index: int) -> int | None:
        try:
            return analyze_trunk(split_model(trunk, names[index]).trunk).min_tile(0)
        except Exception:  # not a single-map cut (inside a block): not a prefix
            return None

    best, lo, hi = None, 0, len(names) - 1
    if (min_tile(hi) or math.inf) <= MAX_TILE:
        return split.trunk
    while lo <= hi:  # receptive fields grow with depth: bisect, stepping over non-cuts
        mid = (lo + hi) // 2
        probe = mid
        while probe >= lo and (tile := min_tile(probe)) is None:
            probe -= 1
        if probe < lo:
            lo = mid + 1
            continue
        if tile <= MAX_TILE:  # type: ignore[operator]
            best, lo = probe, mid + 1
        else:
            hi = probe - 1
    assert best is not None, "no prefix streams with a small tile"
    return split_model(trunk, names[best]).trunk


def with_statistics(split: Split) -> nn.Module:
    """The deepest prefix of a trunk with statistics holding at most ``MAX_PARAMS``
    parameters (every part of it has its own small halo, so a small tile streams it all)."""
    trunk = split.trunk
    names = [n.name for n in trace(trunk).graph.nodes if n.op not in ("placeholder", "output")]
    if sum(p.numel() for p in trunk.parameters()) <= MAX_PARAMS:
        return trunk
    for name in reversed(names):
        try:
            part = split_model(trunk, name).trunk
        except Exception:  # not a single-map cut
            continue
        if sum(p.numel() for p in part.parameters()) <= MAX_PARAMS:
            return part
    raise AssertionError("no prefix is small enough")


def check_exact(split: Split) -> float:
    """Stream ``split``'s trunk (or a prefix of it) against conventional backprop (float64);
    returns the worst relative error."""
    if build_program(split.trunk).reductions:
        trunk = with_statistics(split)
        first = build_program(trunk).streams[0].geometry
        align = first.align[0]
        tile = -(-max(48, first.min_tile(0), first.min_tile(1)) // align) * align
        shape: tuple[int, ...] = (160, 128)
    else:
        trunk = small_prefix(split)
        geometry = analyze_trunk(trunk)
        align, smallest = geometry.align[0], geometry.min_tile(0)
        # Three smallest tiles by two, on the alignment (dynamic 'same' padding streams
        # exactly when the image pads like its tiles), and the smallest tile that cuts it
        # 3 x 2 or finer.
        shape = tuple(-(-max(k * smallest, 2 * k * align) // align) * align for k in (3, 2))
        tile = next(
            t for t in range(smallest, max(shape) + align, align)
            if geometry.tile_grid(shape, (t, t)).n_tiles <= 6
        )  # fmt: skip
    torch.manual_seed(2)
    image = torch.randn(1, 3, *shape)
    result = compare_with_conventional(trunk, image, (tile, tile))
    assert result.n_tiles >= 4, (shape, tile, result.n_tiles)
    return result.worst


@pytest.mark.parametrize("family", sorted(STREAMED))
def test_family_streams_to_its_last_local_layer_exactly(family: str) -> None:
    name, stride, why = STREAMED[family]
    model = timm_model(name)
    split = split_model(model)
    assert analyze_trunk(split.trunk).output_stride == (stride, stride), split.where
    assert split.stopped_by is not None
    assert why in split.stopped_by, split.stopped_by
    check_exact(split)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_is_refused_for_a_true_reason(family: str) -> None:
    name, where, why = REFUSED[family]
    model = timm_model(name)
    split = split_model(model)
    assert split.stopped_by is not None
    stop = split.stopped_by.split(":", 1)[0]
    assert where in stop, split.stopped_by
    assert why in split.stopped_by, split.stopped_by
    check_exact(split)  # what streams before it is exact


def test_dynamic_same_padding_streams_exactly_or_names_the_sizes_that_do() -> None:
    """TF 'same' padding is computed from the input size: exact when the image pads like its
    tiles, a single tile always, and refused (naming the nearest sizes that work) otherwise."""
    model = timm_model("tf_efficientnet_lite0")
    trunk = split_model(split_model(model).trunk, "blocks.1").trunk  # stride 4, same-padded
    tile = analyze_trunk(trunk).min_tile(0)
    torch.manual_seed(3)
    assert compare_with_conventional(trunk, torch.randn(1, 3, 3 * tile, 2 * tile), tile).n_tiles > 1
    odd = (3 * tile + 1, 2 * tile)
    with pytest.raises(GeometryError, match=r"pads 'same' dynamically.* of \d+ or \d+ px"):
        compare_with_conventional(trunk, torch.randn(1, 3, *odd), tile)
    whole = compare_with_conventional(trunk, torch.randn(1, 3, tile + 1, tile - 1), 4 * tile)
    assert whole.n_tiles == 1


def test_a_shallow_trunk_is_said_first(tmp_path: Path) -> None:
    model_file = tmp_path / "hrnet.py"
    model_file.write_text(
        "import timm\n\ndef build_model():\n"
        "    return timm.create_model('hrnet_w18_small', pretrained=False, num_classes=2)\n"
    )
    runner = CliRunner()
    done = runner.invoke(cli, ["profile", str(model_file), "--image", "512", "--no-measure",
                               "--budget", "4GiB", "--out", str(tmp_path / "p.yaml")])  # fmt: skip
    assert done.exit_code == 0, done.output
    first = done.output.splitlines()[0]
    assert first.startswith("warning: only a shallow part of the model streams")
    assert "output stride 4x4" in first
    assert "fuse_layers" in first
    assert "the most streaming can save" in first
    plan = load_plan(tmp_path / "p.yaml")
    assert plan.model.stopped_by is not None
    assert plan.trunk_share is not None
    assert plan.trunk_share < 0.5
    done = runner.invoke(cli, ["profile", str(model_file), "--image", "512", "--no-measure",
                               "--budget", "40MiB", "--out", str(tmp_path / "q.yaml")])  # fmt: skip
    assert done.exit_code == 1
    error = done.output.strip().splitlines()[-1]
    assert error.startswith("Error: only a shallow part of the model streams")
    assert "no tile fits" in error
