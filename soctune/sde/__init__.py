"""Generative processes as SDE objects (one file per family, registered by name)."""

from .base import PROCESSES, Process, StepOutput, TorchSDE, get_process, list_processes, register_process
from .gaussian import DiscreteVPSchedule, FlowSchedule, GaussianPathProcess, Schedule, sample_ode

__all__ = [
    "PROCESSES", "Process", "StepOutput", "TorchSDE", "get_process", "list_processes", "register_process",
    "DiscreteVPSchedule", "FlowSchedule", "GaussianPathProcess", "Schedule", "sample_ode",
]
