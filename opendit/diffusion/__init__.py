"""Diffusion schedulers."""

from opendit.diffusion.iddpm import IDDPM, LOSS_WEIGHTINGS, PREDICTION_TYPES

__all__ = ["IDDPM", "LOSS_WEIGHTINGS", "PREDICTION_TYPES"]
