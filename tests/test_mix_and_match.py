"""Mix and match: every registered solver runs on every registered process, and the pairs that
cannot work are refused up front with a one-line reason.

The solvers only see a process through its Gaussian step kernel (mean map, std), so any
solver × process pair must train; the exceptions are structural (no noise to carry a control
or a log-density, no data estimate x̂₁ for ReFL, no noising kernel for DAG-DB) and must be
caught by ``Solver.check`` when the :class:`~soctune.trainer.Trainer` is built, not as a
crash (or a silent NaN) at the first iteration.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

from helpers import conformance_process_names, tiny_model_for
from soctune import TrainConfig, Trainer, finetune
from soctune.registry import SoctuneError
from soctune.rewards.base import QuadraticReward
from soctune.sde import PROCESSES, get_process, list_processes
from soctune.solvers import SOLVERS, get_solver, list_solvers

K = 4  # steps per chain: enough for a stochastic prefix and a deterministic last step
REWARD = QuadraticReward(c=(0.5, 1.0), scale=0.5)

# every registered process (built-ins and the plug-ins of tests/, e.g. user_ou) x every solver
PROCESS_NAMES = conformance_process_names()
SOLVER_NAMES = [name for name, _ in list_solvers()]
PAIRS = [(p, s) for p in PROCESS_NAMES for s in SOLVER_NAMES]


def _finetuner(process_name: str, process_options: dict[str, Any], solver_name: str,
               solver_options: dict[str, Any], iters: int = 2) -> Trainer:
    process = get_process(process_name, **{"num_steps": K, **process_options})
    model = tiny_model_for(process)
    solver = get_solver(solver_name, **solver_options)
    with warnings.catch_warnings():
        # adjoint-matching on a non-memoryless process warns (not the tilt) and still runs
        warnings.simplefilter("ignore", UserWarning)
        return Trainer(process, model, solver, REWARD, (2,), TrainConfig(iters=iters, batch_size=8, seed=0))


@pytest.mark.parametrize("process_name, solver_name", PAIRS, ids=[f"{p}-{s}" for p, s in PAIRS])
def test_every_solver_runs_on_every_process(process_name: str, solver_name: str) -> None:
    """Two iterations with default options on a tiny model: finite losses, parameters updated."""
    ft = _finetuner(process_name, {}, solver_name, {})
    params = ft.parameters()
    before = [p.detach().clone() for p in params]
    history = ft.train()
    assert len(history) == 2
    for m in history:
        assert math.isfinite(m["loss"]), (process_name, solver_name, m)
        assert m["updates"] >= 1 and "skipped_nonfinite" not in m, m
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "no parameter moved"


def test_the_library_entry_point_mixes_by_name() -> None:
    """``soctune.finetune`` builds process and solver from registered names and samples afterwards."""
    process = get_process("ddpm", num_steps=K)
    ft = finetune(model=tiny_model_for(process), process="ddpm", process_options={"num_steps": K},
                  solver="nabla-db", solver_options={"reward_scale": 0.5}, reward=REWARD, sample_shape=(2,),
                  iters=2, batch_size=8)
    assert len(ft.metrics) == 2 and all(math.isfinite(m["loss"]) for m in ft.metrics)
    x = ft.sample(16, seed=1)
    assert x.shape == (16, 2) and torch.isfinite(x).all()


# ---- impossible pairs ---------------------------------------------------------------------------
# Changing any of these lists is a decision: a new built-in process or solver must be added to the
# grid below (and its refused pairs to REJECTED) so that its impossible combinations are pinned.
BUILTIN_PROCESSES = {"ddpm", "dpmpp-sde", "euler-maruyama", "fm-memoryless"}
BUILTIN_SOLVERS = {"adjoint-matching", "db", "ddpo", "draft", "nabla-db"}

GRID_PROCESSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("ddpm", {}),
    "ddpm-deterministic": ("ddpm", {"noise_scale": 0.0}),  # DDIM
    "dpmpp-sde": ("dpmpp-sde", {}),
    "dpmpp-sde-zero": ("dpmpp-sde", {"final_sigmas_type": "zero"}),
    "dpmpp-sde-order2": ("dpmpp-sde", {"order": 2}),  # multistep: the tilt solvers warn, and run
    "fm-memoryless": ("fm-memoryless", {}),
    "fm-half-noise": ("fm-memoryless", {"noise_scale": 0.5}),
    "fm-ode": ("fm-memoryless", {"noise_scale": 0.0}),
    "euler-maruyama": ("euler-maruyama", {}),
    "euler-maruyama-ode": ("euler-maruyama", {"diffusion": 0.0}),
    "user-ou": ("user_ou:OUProcess", {}),
}
GRID_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "am": ("adjoint-matching", {}),
    "am-basic": ("adjoint-matching", {"variant": "basic"}),
    "nabla-db": ("nabla-db", {}),
    "nabla-db-no-flow": ("nabla-db", {"no_flow": True}),
    "draft-1": ("draft", {}),
    "draft-all": ("draft", {"k": "all"}),
    "draft-lv": ("draft", {"lv_samples": 2}),
    "refl": ("draft", {"variant": "refl"}),
    "ddpo": ("ddpo", {}),
    "residual-db": ("db", {}),
    "dag-db": ("db", {"variant": "dag-db"}),
}

DETERMINISTIC = ("ddpm-deterministic", "fm-ode", "euler-maruyama-ode")
NEEDS_NOISE = ("am", "am-basic", "nabla-db", "nabla-db-no-flow", "ddpo", "residual-db", "dag-db")
NO_DATA_ESTIMATE = ("euler-maruyama", "euler-maruyama-ode", "user-ou")  # SDEs without x̂₁ / schedule

#: (process, solver) -> a phrase the one-line error must contain
REJECTED: dict[tuple[str, str], str] = {
    **{(p, s): "needs a stochastic process" for p in DETERMINISTIC for s in NEEDS_NOISE},
    **{(p, "draft-lv"): "DRaFT-LV redraws the noise" for p in DETERMINISTIC},
    **{(p, "refl"): "does not provide" for p in NO_DATA_ESTIMATE},
    **{(p, "dag-db"): "needs a Gaussian-path process" for p in ("euler-maruyama", "user-ou")},
}


def test_the_grid_covers_every_builtin() -> None:
    """A new built-in must be added to the impossible-pair grid (and its refusals to REJECTED)."""
    list_processes()  # loads the built-ins
    # soctune.problems' SOC benchmark SDEs have fixed dimensions (10, 20) and control models: their
    # solver pairs are pinned in tests/test_soc_matching.py (adjoint-matching trains, a running cost
    # is refused by the others)
    generative = {e.name for e in PROCESSES.entries()
                  if e.obj.__module__.startswith("soctune.") and not e.obj.__module__.startswith("soctune.problems")}
    assert generative == BUILTIN_PROCESSES
    assert {e.name for e in SOLVERS.entries() if e.obj.__module__.startswith("soctune.")} == BUILTIN_SOLVERS
    assert {n for n, _ in GRID_PROCESSES.values()} >= BUILTIN_PROCESSES
    assert {n for n, _ in GRID_SOLVERS.values()} == BUILTIN_SOLVERS


def test_impossible_pairs_are_refused_at_construction_with_one_line() -> None:
    """Exactly the pairs in REJECTED raise a one-line SoctuneError naming the reason (and the
    process) when the Trainer is built; every other pair of the grid trains two finite iterations."""
    refused: dict[tuple[str, str], str] = {}
    for pkey, (pname, popts) in GRID_PROCESSES.items():
        for skey, (sname, sopts) in GRID_SOLVERS.items():
            try:
                ft = _finetuner(pname, popts, sname, sopts)
            except SoctuneError as exc:
                refused[(pkey, skey)] = str(exc)
                continue
            # accepted pairs must really run (a check that lets an impossible pair through would
            # show up here as a crash or a non-finite loss)
            assert all(math.isfinite(m["loss"]) for m in ft.train()), (pkey, skey)
    assert set(refused) == set(REJECTED), (
        f"newly refused: {sorted(set(refused) - set(REJECTED))}; no longer refused: {sorted(set(REJECTED) - set(refused))}")
    for pair, message in refused.items():
        assert "\n" not in message, (pair, message)
        assert REJECTED[pair] in message, (pair, message)
        # the reason names the process it refuses (as registered)
        assert f"'{PROCESSES.get(GRID_PROCESSES[pair[0]][0]).registered_name}'" in message, (pair, message)


def test_refusal_also_reaches_the_entry_point() -> None:
    """``soctune.finetune`` refuses the same way, before any training."""
    process = get_process("fm-memoryless", num_steps=K, noise_scale=0.0)
    with pytest.raises(SoctuneError, match="needs a stochastic process.*fm-memoryless"):
        finetune(model=tiny_model_for(process), process=process, solver="adjoint-matching", reward=REWARD,
                 sample_shape=(2,), iters=1, batch_size=4)
