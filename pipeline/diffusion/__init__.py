"""Diffusion math: schedules, the forward process, losses, samplers and likelihoods (plain torch references
of the fused kernels). Import the submodules: `schedule`, `process`, `losses`, `samplers`, `likelihood`."""
from .schedule import SCHEDULES, Schedule, make_schedule

__all__ = ["SCHEDULES", "Schedule", "make_schedule"]
