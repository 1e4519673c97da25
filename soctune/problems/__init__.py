"""Stochastic-optimal-control benchmark problems with known optimal controls.

Each problem is a user-style SDE process (an :class:`~soctune.sde.euler_maruyama.EulerMaruyama`
subclass registered by name, so ``get_process("soc-double-well")`` builds it) that also carries
its terminal reward r = −g, any running state cost f, and its optimal control u*(x, t) — what
:func:`soctune.soc.control_l2_error` compares a trained control with.
"""

from .soc_matching import (PROBLEMS, DoubleWell, LinearOU, QuadraticOU, QuadraticOUEasy, QuadraticOUHard,
                           SOCProblemProcess, get_problem)

__all__ = ["PROBLEMS", "DoubleWell", "LinearOU", "QuadraticOU", "QuadraticOUEasy", "QuadraticOUHard",
           "SOCProblemProcess", "get_problem"]
