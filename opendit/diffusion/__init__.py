"""Diffusion schedulers."""

from opendit.diffusion.iddpm import IDDPM, LOSS_WEIGHTINGS

__all__ = ["IDDPM", "LOSS_WEIGHTINGS"]
