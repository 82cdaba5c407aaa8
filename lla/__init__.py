"""lla: supervised local learning with PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
