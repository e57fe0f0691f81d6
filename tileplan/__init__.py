"""tileplan: plan and run streaming training of CNNs on images larger than device memory."""

__version__ = "0.1.0"
