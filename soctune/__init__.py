"""soctune: fine-tune diffusion and flow-matching models on a reward, as stochastic optimal control.

Processes (``soctune.sde``) are SDE objects with a Gaussian step kernel; solvers
(``soctune.solvers``) turn :class:`~soctune.trajectory.Trajectory` records into losses.
"""

from .registry import SoctuneError
from .sde import get_process, list_processes
from .trajectory import GradSpec, Trajectory, model_step, rollout

__version__ = "0.1.0"
__all__ = ["SoctuneError", "get_process", "list_processes", "GradSpec", "Trajectory", "model_step", "rollout"]
