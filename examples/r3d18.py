"""torchvision's 3-D ResNet-18 (r3d_18, random init) for single-channel volumes.

The stem takes one channel (a CT or MRI volume) instead of three video frames' colours. The
trunk is split automatically: it ends after ``layer4``, before the global pooling.
"""

from torch import nn
from torchvision.models.video import r3d_18


def build_model() -> nn.Module:
    model = r3d_18(num_classes=2)
    model.stem[0] = nn.Conv3d(1, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
    return model
