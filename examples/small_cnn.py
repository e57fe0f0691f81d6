"""A small custom CNN that shows the whole model-file convention, including split()."""

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_model() -> nn.Module:
    return SmallCNN()


def split(model: SmallCNN) -> tuple[nn.Module, nn.Module]:
    """(trunk, head): stream the features, run pooling and the classifier conventionally."""
    head = nn.Sequential(model.pool, nn.Flatten(), model.fc)
    return model.features, head
