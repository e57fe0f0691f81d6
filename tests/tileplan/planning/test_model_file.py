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
    trunk, head, where = split_model(model)
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
