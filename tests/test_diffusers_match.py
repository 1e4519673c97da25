"""Our discrete processes against diffusers' schedulers, step for step, given identical noise.

Both sides are driven by the same "network" f(x, τ) in diffusers units (an exact mixture model
plus a nonlinear perturbation, so predictions are realistic O(1) values but not an exact
score); our side sees it through a Denoiser at generation time t = 1 − (τ + 1)/N (VP) or
t = 1 − σ (flow).

Step for step: diffusers' ``step`` is applied to OUR state x_k with our noise ξ_k and must give
our x_{k+1} within TOL = 1e-5 (every k). Measured max |Δx| per case: ≤ 1.7e-6 for every
DDPM/DPM/flow case except cosine-beta DDPM (6.9e-6: its first step divides by α ≈ 1e-4 on both
sides, so float32 round-off is amplified). Free-running: both chains run on their own from the
same x_0 and noises; their final states must agree within TOL_FREE = 1e-4, looser because the
mixture model's steep posterior mean amplifies float32 round-off along the chain (measured
≤ 8e-6, except order-2 DPM with sample prediction: 3.1e-5; there both float32 chains sit
~1e-5 from a float64 run of ours, diffusers' slightly farther).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import torch
from torch import Tensor

from soctune.models.base import Denoiser
from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
from soctune.sde import get_process
from soctune.trajectory import rollout

TOL = 1e-5
TOL_FREE = 1e-4
B, D = 64, 2
N_TRAIN = 1000


class _TauModel(Denoiser):
    """Our-side adapter of a diffusers-unit network f(x, τ)."""

    def __init__(self, f: Callable[[Tensor, float], Tensor], prediction_type: str, to_tau: Callable[[float], float]):
        super().__init__()
        self.f, self.prediction_type, self.to_tau = f, prediction_type, to_tau

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.f(x, self.to_tau(float(t[0])))


def _vp_network(process: Any, prediction_type: str) -> Callable[[Tensor, float], Tensor]:
    """f(x, τ): the exact two-mode model's prediction at t(τ) plus 0.05·tanh(x)."""
    exact = GaussianMixtureDenoiser(two_mode_mixture(), process, prediction_type)

    def f(x: Tensor, tau: float) -> Tensor:
        t = 1.0 - (float(tau) + 1.0) / N_TRAIN
        return exact(x, torch.full((x.shape[0],), t, dtype=torch.float64)) + 0.05 * torch.tanh(x)

    return f


def _vp_tau(t: float) -> float:
    return round(N_TRAIN * (1.0 - t) - 1.0)


def _inputs(K: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(K, B, D, generator=g)


# ---- DDPM ---------------------------------------------------------------------------------

SD15_DDIM_CONFIG = {  # runwayml/stable-diffusion-v1-5 style DDIM scheduler_config.json
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "trained_betas": None,
}
_BETAS = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}
DDPM_CASES = [(f"{b}-{pt}", {**cfg, "clip_sample": False, "prediction_type": pt}, pt)
              for b, cfg in _BETAS.items() for pt in ("epsilon", "v_prediction", "sample")]
DDPM_CASES += [
    ("sd15-ddim-config", SD15_DDIM_CONFIG, "epsilon"),
    ("diffusers-defaults-clip", {}, "epsilon"),  # clip_sample=True: x̂₁ clipped to [−1, 1]
    ("linspace", {**_BETAS["scaled_linear"], "clip_sample": False, "timestep_spacing": "linspace"}, "epsilon"),
    ("trailing", {**_BETAS["scaled_linear"], "clip_sample": False, "timestep_spacing": "trailing"}, "v_prediction"),
]


@pytest.mark.parametrize("name,config,pt", DDPM_CASES, ids=[c[0] for c in DDPM_CASES])
def test_ddpm_matches_diffusers(name: str, config: dict[str, Any], pt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    from diffusers import DDPMScheduler

    K = 20
    process = get_process("ddpm", num_steps=K, scheduler_config=config)
    f = _vp_network(process, pt)
    x_init, noises = _inputs(K)
    traj = rollout(process, _TauModel(f, pt, _vp_tau), x_init=x_init, noises=noises)

    cfg = {**{k: v for k, v in config.items() if not k.startswith("_")}, "prediction_type": pt}
    sched, sched_free = DDPMScheduler.from_config(cfg), DDPMScheduler.from_config(cfg)
    sched.set_timesteps(K)
    sched_free.set_timesteps(K)
    assert [_vp_tau(float(t)) for t in traj.ts[:-1]] == sched.timesteps.tolist()
    drawn: Iterator[Tensor] = iter(noises)
    step_noise: list[Tensor] = []

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **kw: Any) -> Tensor:
        assert tuple(shape) == (B, D)
        return step_noise[0]

    monkeypatch.setattr(ddpm_mod, "randn_tensor", fake_randn)
    free = x_init.clone()
    for k, tau in enumerate(sched.timesteps):
        step_noise[:] = [next(drawn)]  # diffusers draws only when τ > 0; feed step k's noise either way
        x = traj.xs[k]
        out = sched.step(f(x, float(tau)), tau, x)
        err = float((out.prev_sample - traj.xs[k + 1]).abs().max())
        assert err < TOL, f"step {k} (τ={int(tau)}): max |Δx| = {err:.2e}"
        # x̂₁ = (x − β ε̂)/α amplifies float32 round-off by 1/α (α_{t_0} ≈ 0.006 for linear
        # betas): measured max |Δx̂₁| 2.3e-5 on |x̂₁| ≈ 4 at the first step, ≤ 1e-6 after it
        torch.testing.assert_close(out.pred_original_sample, traj.x1_hats[k], rtol=1e-4, atol=TOL)
        step_noise[:] = [noises[k]]
        free = sched_free.step(f(free, float(tau)), tau, free).prev_sample
    err = float((free - traj.xs[-1]).abs().max())
    assert err < TOL_FREE, f"free-running chains differ at the end by {err:.2e}"


# ---- SDE-DPM-Solver++ --------------------------------------------------------------------

_SL = _BETAS["scaled_linear"]
DPM_CASES: list[tuple[str, int, int, str, str, dict[str, Any]]] = [
    (f"o{order}-{fs}-{pt}-K{K}", order, K, fs, pt, _SL)
    for order in (1, 2) for fs in ("zero", "sigma_min") for pt in ("epsilon", "v_prediction", "sample")
    for K in (10, 20)
    if pt == "epsilon" or K == 10
]
DPM_CASES += [
    ("o2-heun", 2, 20, "sigma_min", "epsilon", {**_SL, "solver_type": "heun"}),
    ("o2-euler-at-final", 2, 20, "sigma_min", "epsilon", {**_SL, "euler_at_final": True}),
    ("o2-no-lower-order-final", 2, 10, "sigma_min", "epsilon", {**_SL, "lower_order_final": False}),
    ("o2-leading-offset", 2, 10, "zero", "epsilon", {**_SL, "timestep_spacing": "leading", "steps_offset": 1}),
    ("o2-trailing", 2, 20, "sigma_min", "v_prediction", {**_SL, "timestep_spacing": "trailing"}),
    ("o2-cosine-clipped", 2, 20, "zero", "epsilon", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}),
    ("o2-sd15-config", 2, 20, "sigma_min", "epsilon", SD15_DDIM_CONFIG),
]


@pytest.mark.parametrize("name,order,K,fs,pt,config", DPM_CASES, ids=[c[0] for c in DPM_CASES])
def test_dpmpp_sde_matches_diffusers(name: str, order: int, K: int, fs: str, pt: str, config: dict[str, Any]) -> None:
    from diffusers import DPMSolverMultistepScheduler

    process = get_process("dpmpp-sde", num_steps=K, order=order, final_sigmas_type=fs, scheduler_config=config)
    f = _vp_network(process, pt)
    x_init, noises = _inputs(K, seed=1)
    traj = rollout(process, _TauModel(f, pt, _vp_tau), x_init=x_init, noises=noises)

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = {**cfg, "algorithm_type": "sde-dpmsolver++", "solver_order": order, "final_sigmas_type": fs,
           "prediction_type": pt}
    sched, sched_free = DPMSolverMultistepScheduler.from_config(cfg), DPMSolverMultistepScheduler.from_config(cfg)
    sched.set_timesteps(K)
    assert [_vp_tau(float(t)) for t in traj.ts[:-1]] == sched.timesteps.tolist()
    sched_free.set_timesteps(K)
    free = x_init.clone()
    for k, tau in enumerate(sched.timesteps):
        x = traj.xs[k]  # same input state: diffusers' multistep memory is then built from our x̂₁'s
        out = sched.step(f(x, float(tau)), tau, x, variance_noise=noises[k]).prev_sample
        err = float((out - traj.xs[k + 1]).abs().max())
        assert err < TOL, f"step {k} (τ={int(tau)}): max |Δx| = {err:.2e}"
        free = sched_free.step(f(free, float(tau)), tau, free, variance_noise=noises[k]).prev_sample
    err = float((free - traj.xs[-1]).abs().max())
    assert err < TOL_FREE, f"free-running chains differ at the end by {err:.2e}"
    # the step std is the kernel's: σ_t√(1 − e^{−2h}) in diffusers' own (VE σ) numbers
    alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sched.sigmas)
    lam = torch.log(alpha_t.double()) - torch.log(sigma_t.double())
    h = lam[1:] - lam[:-1]
    std = sigma_t.double()[1:] * torch.sqrt(1 - torch.exp(-2 * h))
    torch.testing.assert_close(traj.stds.double(), torch.nan_to_num(std, nan=0.0), rtol=1e-5, atol=1e-7)
    if fs == "sigma_min":
        assert bool((traj.stds > 0).all()), "the default final sigma keeps every step stochastic"
    else:
        assert float(traj.stds[-1]) == 0.0 and torch.equal(traj.xs[-1], traj.x1_hats[-1])


def test_dpmpp_sde_rejects_unsupported_options() -> None:
    from soctune.registry import SoctuneError
    from soctune.trajectory import model_step

    for opts in ({"order": 3}, {"final_sigmas_type": "none"}, {"scheduler_config": {"use_karras_sigmas": True}},
                 {"scheduler_config": {"thresholding": True}}):
        with pytest.raises(SoctuneError):
            get_process("dpmpp-sde", **opts)
    process = get_process("dpmpp-sde", num_steps=8, order=2)
    model = GaussianMixtureDenoiser(two_mode_mixture(), process, "epsilon")
    with pytest.raises(SoctuneError, match="previous"):  # an order-2 step needs x̂₁ of step k−1
        model_step(process, model, torch.zeros(2, D), 3, None, {})


def test_dpmpp_sde_order1_is_ddpm_posterior() -> None:
    """Order 1 is the exact posterior q(x_t | x_s, x̂₁) = DDIM(η=1) on the same grid."""
    K = 12
    dpm = get_process("dpmpp-sde", num_steps=K, order=1, scheduler_config=_SL)
    ddim = get_process("ddpm", num_steps=K, scheduler_config={**_SL, "clip_sample": False})
    ddim.ts = dpm.ts.clone()  # same grid; the kernel is what is compared
    model = GaussianMixtureDenoiser(two_mode_mixture(), dpm, "epsilon")
    x_init, noises = _inputs(K, seed=2)
    a = rollout(dpm, model, x_init=x_init, noises=noises)
    b = rollout(ddim, model, x_init=x_init, noises=noises)
    torch.testing.assert_close(a.xs, b.xs, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.stds, b.stds, rtol=1e-5, atol=1e-7)


# ---- flow matching ------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_fm_ddim_eta0_equals_flow_euler(shift: float) -> None:
    """fm-memoryless with noise_scale 0 and the DDIM kernel vs FlowMatchEulerDiscreteScheduler.

    They should agree EXACTLY in exact arithmetic: on the straight path x_t = t x₁ + (1−t) ε
    with v = x̂₁ − ε̂, the DDIM(η=0) step x_u = u x̂₁ + (1−u) ε̂ equals the Euler step
    x_t + (u − t) v, for any network. Only float32 round-off separates them.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    K = 20
    config = {"shift": shift}
    process = get_process("fm-memoryless", num_steps=K, scheduler_config=config, noise_scale=0.0, kernel="ddim")
    exact = GaussianMixtureDenoiser(two_mode_mixture(), process, "velocity")

    def f(x: Tensor, sigma: float) -> Tensor:
        """Diffusers' flow network: predicts ε − x₁ = −velocity at σ = 1 − t."""
        t = torch.full((x.shape[0],), 1.0 - sigma, dtype=torch.float64)
        return -(exact(x, t) + 0.05 * torch.tanh(x))

    class Velocity(Denoiser):
        prediction_type = "velocity"

        def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
            return -f(x, 1.0 - float(t[0]))

    x_init, noises = _inputs(K, seed=3)
    traj = rollout(process, Velocity(), x_init=x_init, noises=noises)
    assert bool((traj.stds == 0).all())

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(K)
    sched_free = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched_free.set_timesteps(K)
    free = x_init.clone()
    for k, tau in enumerate(sched.timesteps):
        x = traj.xs[k]
        out = sched.step(f(x, float(sched.sigmas[k])), tau, x).prev_sample
        err = float((out - traj.xs[k + 1]).abs().max())
        assert err < TOL, f"step {k}: max |Δx| = {err:.2e}"
        free = sched_free.step(f(free, float(sched.sigmas[k])), tau, free).prev_sample
    err = float((free - traj.xs[-1]).abs().max())
    assert err < TOL_FREE, f"free-running chains differ at the end by {err:.2e}"
