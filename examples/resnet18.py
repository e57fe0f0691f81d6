"""ResNet-18 (torchvision), two classes; trunk found automatically (before avgpool)."""

import torchvision


def build_model():
    return torchvision.models.resnet18(num_classes=2)
