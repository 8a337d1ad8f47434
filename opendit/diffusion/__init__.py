"""Diffusion schedulers."""

from opendit.diffusion.iddpm import IDDPM

__all__ = ["IDDPM"]
