"""How heavy-tailed is Adjoint Matching's regression target on the 2-mode mixture? (issue #4)

Rolls out the chain driven by the EXACT tilted mixture model (the discretised optimal control), runs
the lean adjoint backwards through the base and prints, per stochastic step k, the quantities that
explain why training from the base plateaus short of the tilt:

- ``u`` / ``target``: batch means (along the reward direction) of the tilted chain's control
  u_k = (m_tilt − m_base)/s_k and of AM's target −s_k ã_{k+1}; at the optimum E[target | x_k] = u_k.
- ``top1%``: share of Σ‖target‖² carried by the largest 1% of samples.
- ``hill``: Hill estimate of the tail index α of ‖target‖ (top 1% order statistics); α < 2 means
  infinite variance, where a sample mean over n draws typically misses the mass carried by events
  rarer than 1/n, so SGD regression sees a too-small target — independent of batch size to first order.

    python benchmarks/adjoint_tails.py --process fm-memoryless --reward linear
    python benchmarks/adjoint_tails.py --process ddpm --reward quadratic --n 65536

Rows are appended to ``benchmarks/results/adjoint_tails.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GMM_C, GMM_SCALE, LAM, RESULTS, append_jsonl, quiet  # noqa: E402

from soctune.models.base import CorrectedDenoiser, Denoiser  # noqa: E402
from soctune.models.gmm import GaussianMixtureDenoiser, mixture_weights_by_nearest_mean, two_mode_mixture  # noqa: E402
from soctune.rewards.base import LinearReward, QuadraticReward  # noqa: E402
from soctune.sde import get_process  # noqa: E402
from soctune.solvers import get_solver  # noqa: E402
from soctune.solvers.base import FinetuneContext  # noqa: E402
from soctune.trajectory import rollout  # noqa: E402

LINEAR_A = (0.5, 0.0)
PREDICTION = {"ddpm": "epsilon", "fm-memoryless": "velocity"}


class ExactTilt(CorrectedDenoiser):
    """The exact tilted mixture model, whose ``base()`` is the exact base mixture model (the
    correction network of the parent is unused)."""

    def __init__(self, base: Denoiser, tilted: Denoiser) -> None:
        super().__init__(base, dim=2)
        self.tilted = tilted

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return (self.tilted if self._adapt else self.base_model)(x, t, cond)


def hill_index(values: Tensor, fraction: float = 0.01) -> float:
    """Hill estimator α̂ = k / Σ_{i≤k} log(X_(i)/X_(k+1)) over the top ``fraction`` of values [n]."""
    v = values.double().sort(descending=True).values
    k = max(2, int(fraction * v.numel()))
    return float(k / torch.log(v[:k] / v[k]).sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--process", choices=sorted(PREDICTION), default="fm-memoryless")
    ap.add_argument("--reward", choices=("linear", "quadratic"), default="linear")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--n", type=int, default=16384, help="trajectories")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    quiet()

    process = get_process(args.process, num_steps=args.steps)
    gmm = two_mode_mixture()
    if args.reward == "linear":
        a = torch.tensor(LINEAR_A)
        reward, tilt, direction = LinearReward(a), gmm.tilt_linear(a, LAM), a / a.norm()
    else:
        c = torch.tensor(GMM_C)
        reward = QuadraticReward(c=c, scale=GMM_SCALE)
        tilt, direction = gmm.tilt_quadratic(GMM_SCALE * torch.eye(2), c, LAM), torch.tensor([1.0, 0.0])
    kind = PREDICTION[args.process]
    model = ExactTilt(GaussianMixtureDenoiser(gmm, process, kind), GaussianMixtureDenoiser(tilt, process, kind))
    ctx = FinetuneContext(process, model, reward, (2,), args.n, torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        traj = rollout(process, model, batch_size=args.n, sample_shape=(2,),
                       generator=torch.Generator().manual_seed(args.seed + 1))
    sweep = get_solver("adjoint-matching", reward_scale=LAM).adjoint_pass(ctx, traj)
    weights = mixture_weights_by_nearest_mean(traj.x_final.double(), tilt)
    print(f"{args.process}, {args.reward} reward, K={args.steps}, n={args.n}: exact-tilt chain weights "
          f"{weights[0]:.3f}/{weights[1]:.3f} (closed form {float(tilt.weights[0]):.3f}/{float(tilt.weights[1]):.3f})")
    print(f"{'k':>3} {'t':>6} {'s_k':>7} {'u':>7} {'target':>7} {'top1%':>6} {'max‖tgt‖²':>10} {'hill α':>7}")
    for k in traj.stochastic_steps():
        s = traj.stds[k]
        u = ((traj.means[k] - sweep.base_means[k]) / s).double()
        target = (-s * sweep.adjoints[k + 1]).double()
        sq = target.pow(2).sum(1)
        top = sq.sort(descending=True).values
        row = {"process": args.process, "reward": args.reward, "steps": args.steps, "n": args.n, "seed": args.seed,
               "k": k, "t": float(process.ts[k]), "s": float(s), "u_mean": float((u @ direction.double()).mean()),
               "target_mean": float((target @ direction.double()).mean()),
               "top1_share": float(top[: max(1, args.n // 100)].sum() / top.sum().clamp(min=1e-300)),
               "max_sq": float(top[0]), "hill": hill_index(sq.sqrt().clamp(min=1e-300))}
        append_jsonl(RESULTS / "adjoint_tails.jsonl", row)
        hill = row["hill"] if math.isfinite(row["hill"]) else float("nan")
        print(f"{k:>3} {row['t']:>6.3f} {row['s']:>7.4f} {row['u_mean']:>7.3f} {row['target_mean']:>7.3f} "
              f"{row['top1_share']:>6.2f} {row['max_sq']:>10.1f} {hill:>7.2f}")


if __name__ == "__main__":
    main()
