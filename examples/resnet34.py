"""ResNet-34 (torchvision), two classes. The trunk is found automatically: everything before
the global average pooling. Weights are random: no download at run time."""

import torchvision


def build_model():
    return torchvision.models.resnet34(num_classes=2)
