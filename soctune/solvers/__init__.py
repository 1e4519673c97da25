"""Fine-tuning methods (one file per family, registered by name)."""

from .base import SOLVERS, FinetuneContext, LossOutput, Solver, get_solver, list_solvers, register_solver

__all__ = ["SOLVERS", "FinetuneContext", "LossOutput", "Solver", "get_solver", "list_solvers", "register_solver"]
