"""ResNet-50 (torchvision), two classes; trunk found automatically (before avgpool)."""

import torchvision


def build_model():
    return torchvision.models.resnet50(num_classes=2)
