"""Diffusion math (plain torch, no networks)."""
