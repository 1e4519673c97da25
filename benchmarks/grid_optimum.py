"""The exact optimum of the K-step MEAN-SHIFT control problem on a 2-D state, by dynamic programming on a grid.

Every tilt solver fine-tunes a chain that keeps the base's Gaussian steps and shifts their means,
x_{k+1} = m_k(x_k) + s_k (u_k(x_k) + ξ_k), at the cost ½‖u_k‖² per stochastic step. The best such
policy solves the Bellman recursion (V_K = −λ r)

    V_k(x) = min_u ½‖u‖² + E_ξ V_{k+1}(m_k(x) + s_k(u + ξ))       (s_k > 0),
    V_k(x) = V_{k+1}(m_k(x))                                       (s_k = 0).

With y = m_k(x) + s_k u and W_k = V_{k+1} ∗ N(0, s_k² I) (the Gaussian blur of the next value), the
stochastic step is a Moreau envelope evaluated at the base mean,

    V_k(x) = M_k(m_k(x)),   M_k(z) = min_y ‖y − z‖²/(2s_k²) + W_k(y),   u*_k(x) = (y*_k(m_k(x)) − m_k(x))/s_k,

and the quadratic penalty is separable, so M_k on an n × n grid is two 1-D minimisations (n³ work,
global over the grid), each grid argmin then refined off the grid by the proximal fixed point
y = z − s_k²∇W_k(y). Unlike tests/discrete_optimum.py (one coordinate at a time, for DESIGN §6's
separable problem) this needs no separability of the base: it solves the random 2-D mixtures of
benchmarks/ground_truth.py, whose runs end at weights off the closed-form tilt with a J BELOW the
exact-tilt control's — is that the K-step chain's best, or a solver's shortfall? :class:`GridPolicy` runs
the DP policy as a :class:`~soctune.models.base.Denoiser`, so its J and samples are measured exactly as
a fine-tuned run's are.

Accuracy: bilinear interpolation of V and y* on a grid of spacing h (default 14/560 = 0.025 over
[−7, 7]², which holds every component of the fixed problem list ± 5 standard deviations and the
N(0, I) start); values outside the box are those of its edge (replicate padding), where the chains
carry no mass. The test (tests/test_grid_optimum.py) checks it against the 1-D DP on DESIGN §6's problem.

    python benchmarks/ground_truth.py --dp                        # the optimum per 2-D problem and process
    python benchmarks/grid_optimum.py --problem 6 --lrs 3e-4 3e-3 # the net fitted to it, supervised (benchmarks/NOTES.md)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from soctune.models.base import CorrectedDenoiser, Denoiser
from soctune.trajectory import model_step, step_prediction_coefficient


def _bilinear(field: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
    """Bilinear interpolation of field [n, n, C] on the grid [lo, hi]² (C channels, index [i, j] =
    (grid[i], grid[j])) at points x [B, 2] -> [B, C]; outside the box the edge value."""
    g = (2 * (x - lo) / (hi - lo) - 1).to(field.dtype)
    # grid_sample's grid is (x=width index, y=height index): width is our axis 1
    out = F.grid_sample(field.permute(2, 0, 1)[None], g[None, :, None, [1, 0]], mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out[0, :, :, 0].T


def _mesh(grid: Tensor) -> Tensor:
    """The grid's points [n, n, 2], index [i, j] = (grid[i], grid[j])."""
    return torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1)


@dataclass
class GridOptimum:
    """lo, hi, n: the square grid [lo, hi]² of n × n points; stds [K]: the steps' noise s_k; targets
    [K, n, n, 2]: y*_k(z), the optimal step mean as a function of the base step mean z on the grid (z itself
    on deterministic steps); value0 [n, n]: V_0 on the grid."""

    lo: float
    hi: float
    n: int
    stds: list[float]
    targets: Tensor
    value0: Tensor

    def control(self, k: int, m: Tensor) -> Tensor:
        """u*_k at states whose base step mean is m [B, 2] -> [B, 2] (0 on deterministic steps)."""
        s = self.stds[k]
        if s == 0:
            return torch.zeros_like(m)
        return (_bilinear(self.targets[k], m.double(), self.lo, self.hi) - m.double()) / s

    def expected_cost(self, x0: Tensor) -> float:
        """E[V_0(x_0)] over start samples x0 [B, 2]: the optimum's J by the DP's own value."""
        return float(_bilinear(self.value0[..., None], x0.double(), self.lo, self.hi).mean())


def _blur(v: Tensor, sigma_cells: float) -> Tensor:
    """v [n, n] convolved with an isotropic Gaussian of ``sigma_cells`` grid cells (separable, edge-replicated)."""
    r = max(1, int(math.ceil(5 * sigma_cells)))
    t = torch.arange(-r, r + 1, dtype=v.dtype)
    ker = torch.exp(-0.5 * (t / sigma_cells) ** 2)
    ker = (ker / ker.sum()).view(1, 1, -1)
    x = v[None, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), ker.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ker.view(1, 1, -1, 1))
    return x[0, 0]


def _envelope_1d(w: Tensor, grid: Tensor, s2: float, dim: int, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """min over y on the grid of (y − z)²/(2 s2) + w(…, y, …) along axis ``dim`` of w [n, n], for every grid z:
    (values [n, n], argmin indices [n, n])."""
    w = w if dim == 1 else w.T
    pen = (grid[:, None] - grid[None, :]) ** 2 / (2 * s2)  # [z, y]
    vals, idx = [], []
    for a in range(0, w.shape[0], chunk):
        q = w[a:a + chunk, None, :] + pen[None]  # [rows, z, y]
        v, i = q.min(-1)
        vals.append(v)
        idx.append(i)
    v, i = torch.cat(vals), torch.cat(idx)
    return (v, i) if dim == 1 else (v.T, i.T)


def _moreau(w: Tensor, grid: Tensor, s: float, refine: int = 30) -> tuple[Tensor, Tensor]:
    """M(z) = min_y ‖y − z‖²/(2s²) + w(y) on the grid z and its minimiser y* [n, n, 2]: the exact grid
    minimum (two separable sweeps), refined off the grid by the damped proximal iteration
    y ← ½y + ½(z − s²∇w(y)) (∇w by central differences, bilinear); the refined point is kept where it is
    no worse."""
    n = grid.numel()
    h = float(grid[1] - grid[0])
    s2 = s * s
    m1, i1 = _envelope_1d(w, grid, s2, dim=0)  # m1[z0, y1] = min_y0 …, i1[z0, y1] = argmin y0
    m, i2 = _envelope_1d(m1, grid, s2, dim=1)  # m[z0, z1], i2[z0, z1] = argmin y1
    i0 = torch.gather(i1, 1, i2)
    y = torch.stack([grid[i0], grid[i2]], -1)
    z = _mesh(grid)
    lo, hi = float(grid[0]), float(grid[-1])
    gw = torch.stack(torch.gradient(w, spacing=h), -1)  # [n, n, 2]

    def total(yy: Tensor) -> Tensor:
        at_y = _bilinear(w[..., None], yy.reshape(-1, 2), lo, hi)[:, 0].reshape(n, n)
        return at_y + (yy - z).pow(2).sum(-1) / (2 * s2)

    y_ref = y.clone()
    for _ in range(refine):
        g = _bilinear(gw, y_ref.reshape(-1, 2), lo, hi).reshape(n, n, 2)
        y_ref = 0.5 * y_ref + 0.5 * (z - s2 * g)
    better = total(y_ref) < total(y)
    y = torch.where(better[..., None], y_ref, y)
    return total(y), y


@torch.no_grad()
def solve_grid(process: Any, base: Denoiser, terminal_cost: Callable[[Tensor], Tensor], lo: float = -7.0,
               hi: float = 7.0, n: int = 561) -> GridOptimum:
    """The mean-shift optimum of ``process`` over ``base`` (a 2-D model) for terminal cost
    −λr = ``terminal_cost``(x [B, 2]) -> [B], by the recursion of the module docstring."""
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)
    h = (hi - lo) / (n - 1)
    pts = _mesh(grid).reshape(-1, 2)
    means, stds = [], []
    state = process.init_state()
    for k in range(process.num_steps):
        out = model_step(process, base, pts.to(torch.float64), k, None, state)
        means.append(out.mean.double())
        stds.append(float(out.std))
    value = terminal_cost(pts).double().reshape(n, n)
    targets = []
    for k in range(process.num_steps - 1, -1, -1):
        m, s = means[k], stds[k]
        if s == 0:
            target = _mesh(grid)
            env = value
        else:
            w = _blur(value, s / h) if s >= 2 * h else _gauss_hermite(value, grid, s)
            env, target = _moreau(w, grid, s)
        targets.append(target)
        value = _bilinear(env[..., None], m, lo, hi)[:, 0].reshape(n, n)
    return GridOptimum(lo, hi, n, stds, torch.stack(targets[::-1]), value)


def _gauss_hermite(v: Tensor, grid: Tensor, s: float, n_quad: int = 8) -> Tensor:
    """E_ξ v(y + sξ) on the grid y by Gauss–Hermite quadrature (for s below two grid cells, where the
    convolution kernel would be narrower than the grid)."""
    z, w = np.polynomial.hermite_e.hermegauss(n_quad)
    w = w / w.sum()
    n = grid.numel()
    y = _mesh(grid).reshape(-1, 2)
    out = torch.zeros(n * n, dtype=torch.float64)
    for a in range(n_quad):
        for b in range(n_quad):
            shift = torch.tensor([float(z[a]), float(z[b])], dtype=torch.float64) * s
            out += float(w[a] * w[b]) * _bilinear(v[..., None], y + shift, float(grid[0]), float(grid[-1]))[:, 0]
    return out.reshape(n, n)


class GridPolicy(CorrectedDenoiser):
    """The base driven by a :class:`GridOptimum`'s policy: m_θ = m_base + s_k u*_k, written in prediction
    units (pred + s_k u*_k / c_k, c_k = ∂m_k/∂pred); ``base()`` gives the base."""

    def __init__(self, base: Denoiser, process: Any, optimum: GridOptimum) -> None:
        super().__init__(base, dim=2)
        self.optimum = optimum
        self.process = process
        self.times = process.ts[:-1].double()
        x = torch.zeros(1, 2, dtype=torch.float64)
        self.coefs = [float(step_prediction_coefficient(process, k, x, process.init_state(), base.prediction_type))
                      for k in range(process.num_steps)]

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = self.base_model(x, t, cond)
        if not self._adapt:
            return out
        k = int(torch.argmin((self.times - float(t.reshape(-1)[0])).abs()))
        s = self.optimum.stds[k]
        if s == 0 or self.coefs[k] == 0:
            return out
        # the base step mean from the base prediction already in hand (no second forward)
        m = self.process.step_kernel(x, k, out, self.process.init_state(), self.prediction_type).mean
        return out + (s / self.coefs[k] * self.optimum.control(k, m)).to(out.dtype)


def supervised_fit(problem_index: int, process_name: str, lr: float, iters: int = 300, every: int = 100,
                   batch_size: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    """How fast the benchmark's correction net (ControlGainDenoiser 3×256, AdamW) can learn the K-step
    optimum's control when it is GIVEN it: on-policy rollouts of batch ``batch_size``, the loss
    (1/K)Σ_k ‖u_θ,k − u*_k‖² with u* the grid DP's exact control — no solver noise, so what it shows is the
    optimiser's own speed. Every ``every`` steps: J (2¹⁴ rollouts, one fixed seed) and the weight error to
    the closed-form tilt (4096 samples); the first row (step −1) is the DP policy itself. Constant lr."""
    import ground_truth as gt  # the benchmark's problems and model (it imports this module)
    from soctune.models.gmm_problems import random_tilt_problem
    from soctune.soc import soc_cost
    from soctune.trajectory import rollout

    p = random_tilt_problem(problem_index)
    process = gt.make_process(process_name)
    base, reward = gt.base_model(p, process_name, process), p.reward()
    optimum = solve_grid(process, base, lambda x: -p.lam * reward(x, None).double(), n=gt.GRID_N)

    def measure(model: Denoiser, step: int) -> dict[str, Any]:
        j, j_se = soc_cost(process, model, reward, p.lam, 1 << 14, torch.Generator().manual_seed(5), sample_shape=(2,))
        with torch.no_grad():
            x = rollout(process, model, batch_size=gt.N_EVAL, sample_shape=(2,),
                        generator=torch.Generator().manual_seed(100)).x_final
        return {"step": step, "j": j, "j_se": j_se, "weight_err": gt.fidelity(x, p.tilt)["weight_err"]}

    out = [dict(measure(GridPolicy(base, process, optimum), -1), lr=lr)]
    torch.manual_seed(seed)
    model = gt.correction_model(p, process_name, process, gt.BUDGET[2]["hidden"], gt.BUDGET[2]["depth"])
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for it in range(iters):
        with torch.no_grad():
            traj = rollout(process, model, batch_size=batch_size, sample_shape=(2,), generator=gen)
        steps = traj.stochastic_steps()
        loss = torch.zeros(())
        for k in steps:
            with torch.no_grad(), model.base():
                m_base = model_step(process, model, traj.xs[k], k, None, traj.states[k]).mean
            u = (model_step(process, model, traj.xs[k], k, None, traj.states[k]).mean - m_base) / traj.stds[k]
            loss = loss + (u - optimum.control(k, m_base.double()).to(u.dtype)).pow(2).sum(1).mean() / len(steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % every == 0:
            out.append(dict(measure(model, it + 1), lr=lr))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="the K-step optimum's control fitted by the benchmark's net "
                                             "(supervised_fit): how fast can the optimiser go")
    ap.add_argument("--problem", type=int, default=6)
    ap.add_argument("--process", default="ddpm")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 3e-3])
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for lr in args.lrs:
        for row in supervised_fit(args.problem, args.process, lr, args.iters):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
