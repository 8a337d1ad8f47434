"""Diffusion schedulers."""

from opendit.diffusion.iddpm import IDDPM, LOSS_WEIGHTINGS, PREDICTION_TYPES
from opendit.diffusion.solvers import SCHEDULERS, DiffusersSolver, make_solver, solver_name
from opendit.diffusion.step_info import StepInfo

__all__ = ["IDDPM", "LOSS_WEIGHTINGS", "PREDICTION_TYPES", "SCHEDULERS", "DiffusersSolver", "StepInfo", "make_solver",
           "solver_name"]
