"""Diffusion-based sequential recommendation in PyTorch Lightning."""

__version__ = "0.1.0"
