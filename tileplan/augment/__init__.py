"""Augmentation applied as crops are read: every augmented pixel is a function of (seed,
epoch, image, global coordinate), so a streamed image equals the whole image augmented first
while host memory holds a few crops (see ``augmentation``, ``geometry``, ``colour``,
``noise``)."""

from tileplan.augment.augmentation import Augmentation, symmetric_views
from tileplan.augment.source import AugmentedSource, ImageParams
from tileplan.augment.spec import DEFAULT_SPEC, OPS, AugmentError, canonical, parse_spec

__all__ = [
    "DEFAULT_SPEC",
    "OPS",
    "AugmentError",
    "Augmentation",
    "AugmentedSource",
    "ImageParams",
    "canonical",
    "parse_spec",
    "symmetric_views",
]
