"""Shared pieces of the benchmark suite: the two problems, the method table, reward counting and
the per-run metrics. Run everything with ``python benchmarks/run_all.py`` (see README)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))

from soctune.config import parse_set  # noqa: E402
from soctune.evaluation import gmm_tilt_fidelity  # noqa: E402
from soctune.metrics import (diversity, feature_frechet_distance, mean_and_stderr,  # noqa: E402
                             rejection_sample_tilt, target_fidelity)
from soctune.models.gmm import GaussianMixture  # noqa: E402

LAM = 1.0
GMM_C = (0.5, 1.0)  # quadratic reward r = −¼‖x − c‖² (scale ½): tilted weights 0.291 / 0.709
GMM_SCALE = 0.5


@dataclass(frozen=True)
class Method:
    """A solver configuration as it appears in the tables."""

    label: str
    solver: str
    options: dict[str, Any]
    lr: float
    family: str  # "soc" (claims the tilt), "draft" (mode seeking), "free" (gradient-free)
    budget_mult: int = 1


# options and learning rates of the digits presets of the time these rows were measured (AM and ∇-DB: loss in prediction units,
# lr 1e-2; ∇-DB: γ = 1), identical on both problems; nothing is tuned per problem
AM_OPTS = {"step_weighting": "prediction"}
NDB_OPTS = {"transitions": 0.25, "gamma": "one", "step_weighting": "prediction"}
METHODS: list[Method] = [
    Method("AM-lean", "adjoint-matching", {"variant": "lean", **AM_OPTS}, 1e-2, "soc"),
    Method("AM-basic", "adjoint-matching", {"variant": "basic", **AM_OPTS}, 1e-2, "soc"),
    Method("nabla-DB", "nabla-db", NDB_OPTS, 1e-2, "soc"),
    Method("nabla-DB no_flow", "nabla-db", {**NDB_OPTS, "no_flow": True}, 1e-2, "soc"),
    Method("DRaFT-1", "draft", {"k": 1}, 1e-3, "draft"),
    Method("DRaFT-LV", "draft", {"k": 1, "lv_samples": 4}, 1e-3, "draft"),
    Method("ReFL", "draft", {"variant": "refl"}, 1e-3, "draft"),
    Method("DDPO", "ddpo", {"inner_epochs": 2, "minibatches": 2, "clip_range": 0.2, "logprob_reduction": "sum"}, 3e-4, "free"),
    Method("residual-DB", "db", {"variant": "residual-db"}, 1e-3, "free"),
    Method("DAG-DB", "db", {"variant": "dag-db"}, 1e-3, "free"),
]
#: gradient-free baselines again with a multiple of the budget (2-D problem only: cheap there)
EXTRA_BUDGET = [Method("DDPO ×5", "ddpo", {"inner_epochs": 2, "minibatches": 2, "clip_range": 0.2, "logprob_reduction": "sum"}, 3e-4, "free", 5),
                Method("residual-DB ×5", "db", {"variant": "residual-db"}, 1e-3, "free", 5)]
#: the solvers' plain per-step weighting (their defaults, lr 3e-3), 2-D problem only: the presets'
#: prediction-unit weighting was tuned on digits
PLAIN_WEIGHTS = [Method("AM-lean plain weights", "adjoint-matching", {"variant": "lean"}, 3e-3, "soc"),
                 Method("nabla-DB plain weights", "nabla-db", {"transitions": 0.25}, 3e-3, "soc")]
#: variants only timed (cost table), not in the quality runs
COST_ONLY = [Method("nabla-DB 10%", "nabla-db", {**NDB_OPTS, "transitions": 0.1}, 1e-2, "soc"),
             # the paper's setting: a fixed number of loss steps (last ones + random earlier ones)
             Method("AM-lean 10 loss steps", "adjoint-matching", {"variant": "lean", **AM_OPTS, "num_loss_steps": 10,
                                                                  "num_last_steps": 5}, 1e-2, "soc"),
             Method("DRaFT full (ckpt)", "draft", {"k": "all", "checkpoint": True}, 1e-3, "draft")]


def method_by_label(label: str) -> Method:
    for m in [*METHODS, *EXTRA_BUDGET, *PLAIN_WEIGHTS, *COST_ONLY]:
        if m.label == label:
            return m
    raise KeyError(label)


class CountingReward(nn.Module):
    """Wraps a reward and counts the samples it scores (one per row of every call)."""

    def __init__(self, reward: Any) -> None:
        super().__init__()
        self.inner = reward
        self.maximum = getattr(reward, "maximum", None)
        self.calls = 0
        self.rows = 0

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        self.calls += 1
        self.rows += int(x.shape[0])
        return self.inner(x, cond)


def quiet() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


# ------------------------------------------------------------------------------ problems
@dataclass
class Problem:
    """What a benchmark run needs: a fresh (process, model, reward) per seed, a feature map, the
    reference sets and the evaluation routine."""

    name: str
    process: Any
    make_model: Any  # seed -> Denoiser (fresh adaptation)
    reward: Any
    sample_shape: tuple[int, ...]
    features: Any  # states [n, *S] -> [n, D]
    extra: dict[str, Any] = field(default_factory=dict)


def gmm_problem(num_steps: int = 25) -> Problem:
    """DESIGN §6's two-mode 2-D mixture (modes (±2, 0), variance ¼, weights ½/½) on ancestral DDPM
    (trailing spacing),
    exact ε model + a learnable correction MLP (3×64, base features); r = −¼‖x − (0.5, 1)‖², λ = 1."""
    from soctune.models.base import CorrectedDenoiser
    from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
    from soctune.rewards.base import QuadraticReward
    from soctune.sde import get_process

    # "trailing" spacing: the last step starts from a real noise level, so DRaFT-1's single
    # differentiated step has leverage (see tests/test_draft_mode_seeking.py)
    proc = get_process("ddpm", num_steps=num_steps, scheduler_config={"timestep_spacing": "trailing", "clip_sample": False})
    base = two_mode_mixture()
    target = base.tilt_quadratic(GMM_SCALE * torch.eye(2), torch.tensor(GMM_C), LAM)

    def make_model(seed: int) -> Any:
        torch.manual_seed(seed)
        return CorrectedDenoiser(GaussianMixtureDenoiser(base, proc, "epsilon"), 2, hidden=64, depth=3,
                                 base_features=True)

    return Problem("gmm", proc, make_model, QuadraticReward(c=GMM_C, scale=GMM_SCALE), (2,),
                   lambda x: x.reshape(x.shape[0], -1).double(), {"target": target, "base_gmm": base})


def digits_problem(num_steps: int = 25) -> Problem:
    """The shipped 8×8 digits ε model (LoRA r = 8) on ancestral DDPM (the scheduler's own "leading"
    spacing: with "trailing" the first step starts at ᾱ ≈ 0 of the cosine schedule and the samples
    blow up to |x| ~ 8000, see RESULTS.md), reward ``digit:3`` = log p(3 | x)
    (bounded by 0, so rejection sampling of the base gives exact tilt samples), features: the
    shipped classifier's penultimate layer (128-D)."""
    from soctune import config as cfgmod
    from soctune.run import build

    cfg = cfgmod.validate(cfgmod.merge(cfgmod.defaults(), {
        "model": {"path": "digits-ddpm"}, "process": {"name": "ddpm", "num_steps": num_steps},
        "solver": {"name": "draft"}, "reward": "digit:3"}))
    b = build(cfg)
    state = {k: v.detach().clone() for k, v in b.loaded.model.named_parameters() if v.requires_grad}

    def make_model(seed: int) -> Any:
        # a fresh LoRA per run: re-initialise the adapter weights as peft does (A random, B zero)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in b.loaded.model.named_parameters():
                if p.requires_grad:
                    if "lora_B" in name:
                        p.zero_()
                    elif "lora_A" in name:
                        nn.init.kaiming_uniform_(p, a=5 ** 0.5)
                    else:
                        p.copy_(state[name])
        return b.loaded.model

    return Problem("digits", b.process, make_model, b.reward, tuple(b.loaded.sample_shape), b.features,
                   {"built": b, "images": b.images, "target_class": 3})


# ------------------------------------------------------------------------------ sampling + metrics
@torch.no_grad()
def sample(problem: Problem, model: Any, n: int, seed: int, base: bool, batch: int = 512) -> Tensor:
    from soctune.trajectory import rollout

    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        ctx = model.base() if base else _Null()
        with ctx:
            out.append(rollout(problem.process, model, batch_size=m, sample_shape=problem.sample_shape,
                               generator=gen).x_final)
    return torch.cat(out)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def reference(problem: Problem, n_base: int, seed: int = 777) -> dict[str, Any]:
    """Base samples and exact tilt samples (closed form for the mixture; rejection sampling of
    n_base base samples for digits, split in two halves: one is the reference set, the other is
    scored like a method, giving the 'exact target' row)."""
    model = problem.make_model(0)
    xb = sample(problem, model, n_base, seed, base=True)
    with torch.no_grad():
        rb = problem.reward(xb).float()
    fb = problem.features(xb)
    out: dict[str, Any] = {"base_x": xb, "base_r": rb, "base_f": fb}
    if problem.name == "gmm":
        tgt: GaussianMixture = problem.extra["target"]
        xt, _ = tgt.sample(n_base, generator=torch.Generator().manual_seed(seed + 1))
        out["target_x"] = xt.float()
    else:
        acc = rejection_sample_tilt(torch.arange(len(xb)), rb, LAM, float(problem.reward.maximum),
                                    torch.Generator().manual_seed(seed + 1))
        half = len(acc) // 2
        out["ref_idx"], out["target_idx"] = acc[:half], acc[half:]
        out["acceptance"] = len(acc) / len(xb)
    return out


def metrics_of(problem: Problem, x: Tensor, ref: dict[str, Any], n_boot: int = 10) -> dict[str, Any]:
    """Reward mean ± s.e., diversity (mean pairwise feature distance), prior preservation (Fréchet
    distance to base features), target fidelity (SW₂ to exact tilt samples ± s.e.)."""
    with torch.no_grad():
        r = problem.reward(x).float()
    f = problem.features(x)
    mean, se = mean_and_stderr(r)
    out: dict[str, Any] = {"reward": mean, "reward_se": se, "diversity": diversity(f),
                           "prior_fd": feature_frechet_distance(f, ref["base_f"])}
    if problem.name == "gmm":
        fid = gmm_tilt_fidelity(x.double(), problem.extra["target"], n_ref=4096, seed=5, n_boot=n_boot)
        out.update(fidelity=fid["sw_to_target"], fidelity_se=fid["sw_to_target_se"], fidelity_floor=fid["sw_exact_floor"],
                   weight_err=fid["weight_err"], weights=fid["weights"])
    else:
        ref_f = ref["base_f"][ref["ref_idx"]]
        d, dse = target_fidelity(f, ref_f, n_boot=n_boot, generator=torch.Generator().manual_seed(5))
        out.update(fidelity=d, fidelity_se=dse)
        from soctune.examples.digits.evaluator import digit_probabilities

        labels = digit_probabilities(problem.extra["images"](x)).argmax(1)
        out["target_share"] = float((labels == problem.extra["target_class"]).double().mean())
    return out


# ------------------------------------------------------------------------------ memory probe
def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size every ~0.5 ms in a thread (torch releases the GIL in its
    kernels); ``peak - start`` is the extra memory of the code inside the ``with`` block."""

    def __enter__(self) -> "PeakRSS":
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *a: Any) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def add_option_argument(ap: argparse.ArgumentParser, example: str) -> None:
    """``--option KEY=VALUE`` (repeatable): a solver option for a study, beside the library's defaults."""
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help=f"a solver option beside the defaults, e.g. {example} (repeatable; a study)")


def parse_options(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """The ``--option`` items as solver options, values parsed as the CLI's ``--set`` parses them (YAML)."""
    options: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            ap.error(f"--option takes KEY=VALUE, got '{item}'")
        options.update(parse_set(f"solver.{item}")["solver"])
    return options
