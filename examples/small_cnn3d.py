"""A small custom 3-D CNN for single-channel volumes (CT, MRI), with the model-file convention."""

import torch
from torch import nn


class SmallCNN3d(nn.Module):
    def __init__(self, classes: int = 2, channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            # Anisotropic stem: scans have thick slices, so only in-plane is strided.
            nn.Conv3d(channels, 16, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)),
            nn.BatchNorm3d(16), nn.ReLU(inplace=True),
            nn.Conv3d(16, 32, 3, padding=1), nn.BatchNorm3d(32), nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            nn.Conv3d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
        )  # fmt: skip
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_model() -> nn.Module:
    return SmallCNN3d()


def split(model: SmallCNN3d) -> tuple[nn.Module, nn.Module]:
    """(trunk, head): stream the features, pool and classify conventionally."""
    return model.features, nn.Sequential(model.pool, nn.Flatten(), model.fc)
