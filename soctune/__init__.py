"""soctune: fine-tune diffusion and flow-matching models on a reward, as stochastic optimal control.

Processes (``soctune.sde``) are SDE objects with a Gaussian step kernel; solvers
(``soctune.solvers``) turn :class:`~soctune.trajectory.Trajectory` records into losses.

The exports below are loaded on first use (PEP 562), so ``import soctune`` — and with it the
``soctune`` command's ``--help`` and ``list`` — does not import torch.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

# exported name -> the submodule that defines it; a new export is one entry here
_EXPORTS: dict[str, str] = {
    "SoctuneError": "soctune.registry",
    "get_process": "soctune.sde",
    "list_processes": "soctune.sde",
    "GradSpec": "soctune.trajectory",
    "Trajectory": "soctune.trajectory",
    "model_step": "soctune.trajectory",
    "rollout": "soctune.trajectory",
    "finetune": "soctune.run",
    "FinetuneRun": "soctune.run",
    "Trainer": "soctune.trainer",
    "TrainConfig": "soctune.config",
}

__all__ = list(_EXPORTS)

if _typing.TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from .config import TrainConfig
    from .registry import SoctuneError
    from .run import FinetuneRun, finetune
    from .sde import get_process, list_processes
    from .trainer import Trainer
    from .trajectory import GradSpec, Trajectory, model_step, rollout


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'soctune' has no attribute '{name}'")
    try:
        mod = _importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # a dependency is missing: say so
            raise
        raise AttributeError(f"module 'soctune' has no attribute '{name}' ({module} does not exist)") from None
    try:
        value = getattr(mod, name)
    except AttributeError:
        if name in globals():  # not defined there (yet), but the import bound a submodule so named
            return globals()[name]
        raise AttributeError(f"module 'soctune' has no attribute '{name}' ({module} does not define it)") from None
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
