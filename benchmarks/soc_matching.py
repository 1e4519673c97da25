"""Adjoint Matching on SOC-matching's control benchmarks (issue #17): relative control L2 error, SOC
cost J against the K-step lower bound, wall time.

Problems (soctune.problems; settings of github.com/facebookresearch/SOC-matching, see that module):
Quadratic OU easy / hard (d = 20, K = 50, running state cost), Linear OU (d = 10, K = 100), Double Well
(d = 10, K = 200). Solver: ``adjoint-matching`` with the library's defaults; only budget knobs vary
(iterations, batch, net width). Model: :class:`~soctune.models.informed_control.InformedControl`
(default) or a plain :class:`~soctune.models.base.CorrectedDenoiser` MLP on (x, t) (``--model mlp``).

Metrics on fresh rollouts of the trained control (:mod:`soctune.soc`):

- ``rel``: E[Σ_k ‖u_k/√Δt − u*(x_k, t_k)‖²Δt] / E[Σ_k ‖u*(x_k, t_k)‖²Δt] (1 = the zero control);
  ``rel_by_tenth`` / ``rel_by_coord``: its shares per tenth of the steps and per coordinate (each sums to rel);
- ``J``: E[Σ_k ½‖u_k‖² + Σ_k Δt f(x_k) + g(x_K)] with its s.e., beside J of u* itself and the lower
  bound J*_K = −log E_base[exp(−Σ Δt f − g)] (its Monte Carlo estimate is unreliable when its s.e. is large).

    OMP_NUM_THREADS=1 python benchmarks/soc_matching.py                      # all four, default budget
    OMP_NUM_THREADS=1 python benchmarks/soc_matching.py --problems soc-double-well --iters 1000
    OMP_NUM_THREADS=1 python benchmarks/soc_matching.py --problems soc-double-well --lr 1e-3 --option bootstrap=0.5
    OMP_NUM_THREADS=1 python benchmarks/soc_matching.py --problems soc-double-well --option estimator=score --out /tmp/s.jsonl
    OMP_NUM_THREADS=1 python benchmarks/soc_matching.py --problems soc-double-well --kstep-optimum   # the metric's floor

Rows are appended to ``--out`` (default ``benchmarks/results/soc_matching.jsonl``, which RESULTS.md is made
from); ``--table`` prints the Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from common import add_option_argument, parse_options  # noqa: E402
from soctune import finetune  # noqa: E402
from soctune.models.base import CorrectedDenoiser, Denoiser, ZeroDenoiser  # noqa: E402
from soctune.metrics import mean_and_stderr  # noqa: E402
from soctune.models.informed_control import InformedControl  # noqa: E402
from soctune.problems import PROBLEMS, DoubleWell, SOCProblemProcess, get_problem  # noqa: E402
from soctune.registry import SoctuneError  # noqa: E402
from soctune.soc import ControlFunctionModel, control_l2_error, soc_cost, soc_costs, soc_lower_bound  # noqa: E402

RESULTS = ROOT / "results" / "soc_matching.jsonl"

#: per-problem budget (iterations, batch) when not given on the command line: under a minute each for the OU
#: problems on one thread, about 25 minutes for the Double Well (K = 200; the budget at which its rows in
#: RESULTS.md show the defaults reaching a relative error near 0.1, seed by seed; their 4500-iteration rows
#: are not lower — benchmarks/NOTES.md) on a busy 2-core machine
BUDGET = {"soc-quadratic-ou-easy": (300, 128), "soc-quadratic-ou-hard": (300, 128), "soc-linear-ou": (200, 64),
          "soc-double-well": (3000, 128)}


def make_model(kind: str, proc: SOCProblemProcess, hidden: int, depth: int) -> Denoiser:
    if kind == "informed":
        return InformedControl(proc, proc.reward, proc.dim, reward_scale=proc.reward_scale, hidden=hidden, depth=depth)
    return CorrectedDenoiser(ZeroDenoiser(), proc.dim, hidden=hidden, depth=depth)


def run(name: str, iters: int, batch: int, hidden: int, depth: int, kind: str, n_eval: int, seed: int,
        lr: float | None = None, solver_options: dict[str, Any] | None = None,
        lr_schedule: str | None = None) -> dict[str, Any]:
    """Train one problem and evaluate it; returns the result row. ``solver_options``: adjoint-matching
    options beside ``reward_scale`` (none: the library's defaults)."""
    options = dict(solver_options or {})
    train = {k: v for k, v in (("lr", lr), ("lr_schedule", lr_schedule)) if v is not None}
    proc = get_problem(name)
    shape = (proc.dim,)
    torch.manual_seed(seed)
    model = make_model(kind, proc, hidden, depth)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ft = finetune(model=model, process=proc, solver="adjoint-matching",
                      solver_options={"reward_scale": proc.reward_scale, **options}, reward=proc.reward,
                      sample_shape=shape, iters=iters, batch_size=batch, seed=seed, **train)
    train_s = time.perf_counter() - start
    lam = proc.reward_scale
    err = control_l2_error(proc, model, proc.optimal_control, n_eval, torch.Generator().manual_seed(seed + 1),
                           sample_shape=shape)
    j, j_se = soc_cost(proc, model, proc.reward, lam, n_eval, torch.Generator().manual_seed(seed + 2), sample_shape=shape)
    opt = ControlFunctionModel(proc.optimal_control)
    j_opt, j_opt_se = soc_cost(proc, opt, proc.reward, lam, n_eval, torch.Generator().manual_seed(seed + 2),
                               sample_shape=shape)
    lb, lb_se = soc_lower_bound(proc, opt, proc.reward, lam, 4 * n_eval, torch.Generator().manual_seed(seed + 3),
                                sample_shape=shape)
    # as resolved: given, else the model's train_defaults, else the library's; lr_given: the lr or its schedule
    # came from the caller (the table's "(model default)" is for neither)
    config = ft.trainer.config
    return {"problem": name, "model": kind, "hidden": hidden, "depth": depth, "iters": iters, "batch": batch,
            "lr": config.lr, "lr_schedule": config.lr_schedule, "lr_given": bool(train), "solver_options": options,
            "seed": seed, "rel": err.relative, "rel_rms": err.relative_rms,
            # where the error sits: shares of the zero control's error per tenth of the steps, per coordinate
            "rel_by_tenth": _tenths(err.by_step), "rel_by_coord": list(err.by_coord),
            "l2": err.error, "l2_se": err.error_se,
            "zero_l2": err.zero_error, "J": j, "J_se": j_se, "J_opt": j_opt, "J_opt_se": j_opt_se, "J_lb": lb,
            "J_lb_se": lb_se, "train_s": train_s}


def kstep_optimal_control(proc: DoubleWell, dx: float = 0.002, xb: float = 4.0) -> Callable[[Tensor, float], Tensor]:
    """The Double Well CHAIN's own optimal control, per coordinate by dynamic programming on a grid: the
    reference u* is the continuous-time optimum, the solver trains the K-step Euler–Maruyama chain
    x_{k+1} = m_k(x_k) + Δt·u_k + √Δt ξ_k, m_k(x) = x + Δt·b(x). The chain's tilted transition from x_k has
    mean m + Δt ∂_m log H_k(m) at m = m_k(x_k) (Tweedie), with

        h_K = e^{−g},   H_k(m) = E[h_{k+1}(m + √Δt ξ)],   h_k(x) = H_k(m_k(x)),

    so u_k(x) = ∂_m log H_k(m_k(x)) is the mean shift of the K-step optimum in the SDE's units (the problem
    separates over coordinates: one 1-D table per (κ, ν)). Its relative L2 error against u* is what the
    metric charges a solver that found the chain's optimum exactly (``--kstep-optimum``).
    Grid: nodes ±``xb`` spaced ``dx``; log H by a log-sum-exp convolution with the step's Gaussian (±7 s.d.),
    its slope by central differences. Returns u(x [B, D], t) -> [B, D] float64, t a step's left end."""
    num_steps = proc.num_steps
    dt = 1.0 / num_steps
    grid = torch.arange(-xb, xb + dx / 2, dx, dtype=torch.float64)
    half = int(math.ceil(7 * math.sqrt(dt) / dx))
    log_kernel = -0.5 * (torch.arange(-half, half + 1, dtype=torch.float64) * dx) ** 2 / dt
    log_kernel = log_kernel - torch.logsumexp(log_kernel, 0)
    window = (torch.arange(grid.numel())[:, None] + torch.arange(-half, half + 1)[None, :]).clamp(0, grid.numel() - 1)

    def at(values: Tensor, pos: Tensor) -> Tensor:  # linear interpolation of grid values at fractional indices
        pos = pos.clamp(0, grid.numel() - 1)
        i0 = pos.floor().long().clamp(max=grid.numel() - 2)
        w = pos - i0
        return (1 - w) * values[..., i0] + w * values[..., i0 + 1]

    # the process's own drift on the grid, one column per coordinate (time-homogeneous: t = 0)
    drift = proc.base_drift(grid[:, None].expand(-1, proc.dim), 0.0)
    tables: dict[tuple[float, float], Tensor] = {}
    for kappa, nu in {(float(k), float(n)) for k, n in zip(proc.kappa.tolist(), proc.nu.tolist())}:
        col = [float(k) for k in proc.kappa].index(kappa)
        mean_pos = (grid + dt * drift[:, col] + xb) / dx  # m(x) on the grid, as a fractional index
        log_h = -nu * (grid * grid - 1.0) ** 2  # this coordinate's share of −g
        rows: list[Tensor] = [grid] * num_steps  # overwritten back to front
        for k in range(num_steps - 1, -1, -1):
            log_big_h = torch.logsumexp(log_h[window] + log_kernel, 1)  # log H_k at the nodes (edges held flat)
            rows[k] = at(torch.gradient(log_big_h, spacing=dx)[0], mean_pos)
            log_h = at(log_big_h, mean_pos)
            log_h = log_h - log_h.max()  # log h matters up to a constant
        tables[(kappa, nu)] = torch.stack(rows)  # [K, nodes]

    def control(x: Tensor, t: float) -> Tensor:
        k = min(int(round(t * num_steps)), num_steps - 1)
        out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        for (kappa, nu), table in tables.items():
            cols = [i for i in range(proc.dim) if (float(proc.kappa[i]), float(proc.nu[i])) == (kappa, nu)]
            out[:, cols] = at(table[k], (x[:, cols].double().cpu() + xb) / dx).to(x.device)
        return out

    return control


def kstep_optimum_row(name: str, n_eval: int, seed: int) -> dict[str, Any]:
    """The K-step optimum (:func:`kstep_optimal_control`) measured like a trained run: its relative L2 error
    to u* (the metric's floor at this K) and its J beside u*'s on the same rollout noise."""
    proc = get_problem(name)
    if not isinstance(proc, DoubleWell):
        raise SoctuneError(f"the K-step optimum has a dynamic programme for soc-double-well only, not {name}")
    shape, lam = (proc.dim,), proc.reward_scale
    start = time.perf_counter()
    dp = ControlFunctionModel(kstep_optimal_control(proc))
    solve_s = time.perf_counter() - start
    err = control_l2_error(proc, dp, proc.optimal_control, n_eval, torch.Generator().manual_seed(seed + 1),
                           sample_shape=shape)
    costs = soc_costs(proc, dp, proc.reward, lam, n_eval, torch.Generator().manual_seed(seed + 2), sample_shape=shape)
    costs_opt = soc_costs(proc, ControlFunctionModel(proc.optimal_control), proc.reward, lam, n_eval,
                          torch.Generator().manual_seed(seed + 2), sample_shape=shape)
    (j, j_se), (dj, dj_se) = mean_and_stderr(costs), mean_and_stderr(costs - costs_opt)  # the latter paired
    return {"problem": name, "model": "kstep-optimum", "seed": seed, "rel": err.relative, "rel_rms": err.relative_rms,
            "rel_by_tenth": _tenths(err.by_step), "rel_by_coord": list(err.by_coord), "J": j, "J_se": j_se,
            "J_opt": float(costs_opt.mean()), "J_minus_J_opt": dj, "J_minus_J_opt_se": dj_se, "solve_s": solve_s}


def _tenths(by_step: tuple[float, ...]) -> list[float]:
    """Per-step shares [K] summed over ten consecutive blocks of steps (the first tenth … the last)."""
    k = len(by_step)
    return [sum(by_step[i * k // 10:(i + 1) * k // 10]) for i in range(10)]


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| problem | d | K | model | iters × batch | rel. L2 error | of it: last tenth of steps | √rel | J (s.e.) "
            "| J of u* | J*_K bound (s.e.) | train time |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        proc = PROBLEMS[r["problem"]]()
        options = "".join(f", {k} {v}" for k, v in sorted((r.get("solver_options") or {}).items()))
        # rows before lr_given record the lr as given (None: the library's) and a schedule only when given
        schedule = f" {r['lr_schedule']}" if r.get("lr_schedule") else ""
        schedule += " (model default)" if r.get("lr_given") is False else ""
        late = f"{r['rel_by_tenth'][-1]:.4g}" if "rel_by_tenth" in r else "–"  # older rows lack it
        options += f", seed {r['seed']}" if r.get("seed") else ""
        lines.append(f"| {r['problem']} | {proc.dim} | {proc.num_steps} | {r['model']} {r['depth']}×{r['hidden']} "
                     f"| {r['iters']} × {r['batch']}, lr {r['lr'] or 'default'}{schedule}{options} | {r['rel']:.4g} | {late} | {r['rel_rms']:.3g} | {r['J']:.3f} ({r['J_se']:.3f}) "
                     f"| {r['J_opt']:.3f} | {r['J_lb']:.3f} ({r['J_lb_se']:.3f}) | {r['train_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--iters", type=int, default=None, help="iterations (default: per problem, BUDGET)")
    ap.add_argument("--batch", type=int, default=None, help="trajectories per iteration (default: per problem)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--model", choices=("informed", "mlp"), default="informed")
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate (default: the model's train_defaults, else the library's TrainConfig.lr)")
    ap.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                    help="learning-rate schedule (default: the model's train_defaults, else the library's)")
    add_option_argument(ap, "bootstrap=0.5")
    ap.add_argument("--n-eval", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="print the Markdown rows for RESULTS.md")
    ap.add_argument("--kstep-optimum", action="store_true",
                    help="measure the K-step chain's own optimal control (dynamic programming; Double Well only) "
                         "instead of training: the metric's floor at this K; prints its row, appends nothing")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="JSONL file the rows are appended to (default: results/soc_matching.jsonl; a study "
                         "writes elsewhere)")
    args = ap.parse_args()
    options = parse_options(ap, args.option)
    if args.kstep_optimum:
        if any(not issubclass(PROBLEMS[name], DoubleWell) for name in args.problems):
            ap.error("--kstep-optimum has a dynamic programme for the Double Well only: add --problems soc-double-well")
        for name in args.problems:
            row = kstep_optimum_row(name, args.n_eval, args.seed)
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        return
    rows = []
    for name in args.problems:
        iters, batch = BUDGET[name]
        row = run(name, args.iters or iters, args.batch or batch, args.hidden, args.depth, args.model, args.n_eval,
                  args.seed, args.lr, options, args.lr_schedule)
        rows.append(row)
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    if args.table:
        print(table(rows))


if __name__ == "__main__":
    main()
