"""Loading users' model files and finding where the streamable trunk ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from executor import UnsupportedLayerError
from tileplan.planning.model_file import ModelFileError, load_model_file, split_model


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.py"
    path.write_text(text)
    return path


def test_auto_split_of_a_custom_model(tiny_model: Path) -> None:
    loaded = load_model_file(tiny_model)
    assert loaded.entry == "build_model()"
    assert "features.7" in loaded.split  # the last ReLU before global pooling
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(loaded.head(loaded.trunk(x)), loaded.model(x))
    # Trunk and head share the model's parameters (gradients reach the user's model).
    model_params = {id(p) for p in loaded.model.parameters()}
    assert {id(p) for p in loaded.trunk.parameters()} <= model_params
    assert not loaded.model.training  # BatchNorm frozen for streaming


@pytest.mark.parametrize(("name", "expected"), [
    ("resnet18", "layer4.1.relu"), ("vgg11", "features.20"), ("densenet121", "'relu'"),
    ("convnext_tiny", "features.7.2"), ("mobilenet_v2", "features.18.2"),
])  # fmt: skip
def test_auto_split_of_torchvision_models(name: str, expected: str) -> None:
    tv = pytest.importorskip("torchvision")
    model = getattr(tv.models, name)().eval()
    parts = split_model(model)
    trunk, head, where = parts.trunk, parts.head, parts.where
    assert expected in where
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(head(trunk(x)), model(x))


def test_split_by_name(tiny_model: Path) -> None:
    loaded = load_model_file(tiny_model, split="features.4")
    assert "features.4" in loaded.split
    assert loaded.trunk(torch.randn(1, 3, 32, 32)).shape == (1, 8, 16, 16)


def test_user_split_function(tmp_path: Path) -> None:
    path = _write(tmp_path, (
        "from torch import nn\n"
        "def build_model():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))\n"
        "def split(model):\n"
        "    return model[:1], model[1:]\n"
    ))  # fmt: skip
    loaded = load_model_file(path)
    assert loaded.split == "split(model) in the model file"
    assert isinstance(loaded.trunk, nn.Sequential)
    assert len(loaded.trunk) == 1


def test_module_level_model(tmp_path: Path) -> None:
    path = _write(tmp_path, "from torch import nn\nmodel = nn.Sequential(nn.Conv2d(3, 4, 3))\n")
    assert load_model_file(path).entry == "model"


BAD_FILES = {
    "syntax_error": ("def build_model(:\n", "SyntaxError"),
    "import_error": ("import not_a_module_xyz\n", "ModuleNotFoundError"),
    "no_model": ("x = 1\n", "neither build_model() nor a module-level `model`"),
    "not_a_module": ("def build_model():\n    return 42\n", "not a torch.nn.Module"),
    "raises": ("def build_model():\n    raise ValueError('bad config')\n", "bad config"),
    "bad_split": (
        "from torch import nn\ndef build_model():\n    return nn.Conv2d(3, 3, 3)\n"
        "def split(model):\n    return model\n",
        "must return (trunk, head)",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_model_files_give_one_line_errors(tmp_path: Path, name: str) -> None:
    text, words = BAD_FILES[name]
    with pytest.raises(ModelFileError) as info:
        load_model_file(_write(tmp_path, text))
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_split_name(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model_file(tmp_path / "nope.py")
    with pytest.raises(ModelFileError, match="no module or node of that name"):
        load_model_file(tiny_model, split="layer9")
    with pytest.raises(UnsupportedLayerError, match="pool"):
        load_model_file(tiny_model, split="pool")  # the trunk would hold global pooling


def test_model_with_nothing_streamable_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "from torch import nn\nmodel = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))\n"
    )
    with pytest.raises(ModelFileError, match="no part of Sequential can be streamed"):
        load_model_file(path)


class _Gate(nn.Module):
    """A block whose forward branches on data: it cannot be traced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class _WithOpaqueBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.gate = _Gate()
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(self.gate(self.stem(x)))).flatten(1)


class _TimmLike(nn.Module):
    """forward() branches on data (untraceable); forward_features/forward_head do not."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, stride=2, padding=1))  # fmt: skip
        self.fc = nn.Linear(4, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_head(self.forward_features(x))
        return y if y.sum() > 0 else y * 1.0


def test_an_untraceable_block_ends_the_trunk_by_name() -> None:
    model = _WithOpaqueBlock().eval()
    parts = split_model(model)
    assert "'stem.1'" in parts.where
    assert parts.stopped_by is not None
    assert "'gate'" in parts.stopped_by
    assert "cannot be traced" in parts.stopped_by
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(parts.head(parts.trunk(x)), model(x))


def test_a_model_that_does_not_trace_is_split_in_its_forward_features() -> None:
    model = _TimmLike().eval()
    parts = split_model(model)
    assert "features.2" in parts.where
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(
            parts.head(parts.trunk(x)), model.forward_head(model.forward_features(x))
        )
    assert {id(p) for p in parts.trunk.parameters()} <= {id(p) for p in model.parameters()}


def test_split_after_a_whole_block_with_a_skip_connection() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18().eval()
    parts = split_model(model, "layer2")  # its last node is the block's residual add + relu
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert parts.trunk(x).shape == (1, 128, 8, 8)
        assert torch.allclose(parts.head(parts.trunk(x)), model(x))
