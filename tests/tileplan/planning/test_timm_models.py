"""Real model code: timm CNN families (random init, nothing downloaded).

Each family either streams to its last local layer (the automatic split ends only where a
global layer begins) or is refused for a true reason, checked by name; and whatever streams is
exact against conventional backprop in float64 (output, every parameter gradient, the input
gradient) over several tiles in both axes. To stay fast, exactness is checked on the deepest
prefix of the streamed trunk whose smallest tile is at most ``MAX_TILE`` px: the prefix holds
the family's own layer code (its blocks, norms, padding and channel ops).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from executor import GeometryError, analyze_trunk, load_plan, trace
from tests.oracle import compare_with_conventional
from tileplan.cli import cli
from tileplan.planning.model_file import Split, split_model

timm = pytest.importorskip("timm")

MAX_TILE = 96  # px: the deepest prefix whose smallest tile is at most this is checked

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
    "MixNet (mixed-kernel channel split)": ("mixnet_s", 8, "squeeze-excitation"),
    "TF MixNet (same padding + split)": ("tf_mixnet_s", 8, "squeeze-excitation"),
    "GhostNet (cheap ops, narrow)": ("ghostnet_100", 4, "squeeze-excitation"),
    "TResNet (space-to-depth, blur pool)": ("tresnet_m", 4, "squeeze-excitation"),
}

# family: (timm model, where the automatic trunk stops, words of the true reason)
REFUSED = {
    "SE-ResNet (squeeze-excitation)": ("seresnet18", "se", "squeeze-excitation"),
    "RegNetY (squeeze-excitation)": ("regnety_002", "se", "squeeze-excitation"),
    "EfficientNet (squeeze-excitation)": ("efficientnet_b0", "se", "squeeze-excitation"),
    "MobileNetV3 (squeeze-excitation)": ("mobilenetv3_small_100", "se", "squeeze-excitation"),
    "ECA-ResNet (efficient channel attention)": ("ecaresnet26t", ".se", "global context"),
    "SK-ResNet (selective kernel)": ("skresnet18", ".attn", "global context"),
    "ResNeSt (split attention)": ("resnest14d", "layer1.0.conv2", "global context"),
    "NFNet (squeeze-excitation)": ("dm_nfnet_f0", "attn_last", "squeeze-excitation"),
    "BiT ResNetV2 (GroupNorm)": ("resnetv2_50x1_bit", "norm", "group norm"),
    "PoolFormer (GroupNorm)": ("poolformer_s12", "norm1", "group norm"),
    "ConvNeXt-V2 (global response norm)": ("convnextv2_atto", "grn", "global context"),
    "HRNet (upsampling fusion)": ("hrnet_w18_small", "fuse_layers", "upsampling"),
    "GhostNetV2 (DFC attention)": ("ghostnetv2_100", "ghost1", "upsampling"),
    "GC-ResNet (global context)": ("gcresnet33ts", "attn", "spatial dims"),
    "BoTNet (self-attention)": ("botnet26t_256", "self_attn", "spatial dims"),
    "EdgeNeXt (transposed attention)": ("edgenext_xx_small", "stages.1.blocks.1", "spatial dims"),
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


def check_exact(split: Split) -> float:
    """Stream a small prefix of ``split``'s trunk against conventional backprop (float64);
    returns the worst relative error."""
    trunk = small_prefix(split)
    geometry = analyze_trunk(trunk)
    align, smallest = geometry.align[0], geometry.min_tile(0)
    # Three smallest tiles by two, on the alignment (dynamic 'same' padding streams exactly
    # when the image pads like its tiles), and the smallest tile that cuts it 3 x 2 or finer.
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
    model_file = tmp_path / "se.py"
    model_file.write_text(
        "import timm\n\ndef build_model():\n"
        "    return timm.create_model('seresnet18', pretrained=False, num_classes=2)\n"
    )
    runner = CliRunner()
    done = runner.invoke(cli, ["profile", str(model_file), "--image", "512", "--no-measure",
                               "--budget", "4GiB", "--out", str(tmp_path / "p.yaml")])  # fmt: skip
    assert done.exit_code == 0, done.output
    first = done.output.splitlines()[0]
    assert first.startswith("warning: only a shallow part of the model streams")
    assert "output stride 4x4" in first
    assert "layer1.0.se (mean)" in first
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
