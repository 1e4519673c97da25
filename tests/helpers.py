"""Shared test helpers: which processes the conformance suite covers, and a tiny model for any
process (:func:`tiny_model_for`)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from soctune.models.base import CorrectedDenoiser, Denoiser, ZeroDenoiser
from soctune.models.gmm import GaussianMixture, GaussianMixtureDenoiser, two_mode_mixture
from soctune.sde import GaussianPathProcess, Process, list_processes
from soctune.sde.base import PROCESSES

TESTS_DIR = Path(__file__).resolve().parent
DIM = 2  # state size of every conformance run
_REGISTERS = re.compile(r"^\s*@?register_process\(", re.MULTILINE)


def import_test_processes() -> None:
    """Import every helper module in tests/ that registers a process (e.g. ``user_ou``), so a
    process added by a test file is covered without editing any test."""
    for path in sorted(TESTS_DIR.glob("*.py")):
        if path.name.startswith("test_") or path.stem in ("conftest", "helpers"):
            continue
        if _REGISTERS.search(path.read_text(encoding="utf-8")):
            importlib.import_module(path.stem)


def conformance_process_names() -> list[str]:
    """Every registered process: the built-ins plus those registered by test helper modules. The
    SOC-matching benchmark problems (soctune.problems, registered once that package is imported, e.g.
    by an earlier test module) are left out: their state dimension is fixed by the problem, not DIM;
    tests/test_soc_matching.py runs them."""
    from soctune.problems.soc_matching import SOCProblemProcess
    import_test_processes()
    list_processes()  # loads the built-ins
    return [e.name for e in PROCESSES.entries() if not issubclass(e.obj, SOCProblemProcess)]


class TinyMLPDenoiser(Denoiser):
    """A 2-layer MLP on (x, t) for processes that take neither a Gaussian-path prediction nor a
    control (e.g. a neural-SDE ``drift``): [B, D], [B] -> [B, D]."""

    def __init__(self, dim: int, prediction_type: str, hidden: int = 16) -> None:
        super().__init__()
        self.prediction_type = prediction_type
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=-1))


def gmm_prediction_type(process: Process) -> str:
    """The first prediction type in the process's preference order that an exact mixture model
    can produce."""
    for pt in process.accepts:  # the process's own preference order
        if pt in ("epsilon", "velocity", "v_prediction", "sample"):
            return pt
    raise AssertionError(f"{type(process).__name__} accepts no Gaussian-path prediction type")


def tiny_model_for(process: Process, dim: int = DIM, seed: int = 0) -> Denoiser:
    """A small model with trainable parameters that ``process`` accepts:

    * Gaussian-path process: the exact two-mode mixture model (its first accepted prediction
      type) plus a small correction MLP;
    * a process taking a ``control``: the zero control plus a small correction MLP;
    * otherwise a tiny MLP predicting the process's first accepted type.

    The correction's output layer gets small random weights (instead of the library's zero
    init) so that reward gradients reach every parameter.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(process, GaussianPathProcess):
            base: Denoiser = GaussianMixtureDenoiser(two_mode_mixture(), process, gmm_prediction_type(process))
        elif "control" in process.accepts:
            base = ZeroDenoiser()
        else:
            return TinyMLPDenoiser(dim, process.accepts[0])
        model = CorrectedDenoiser(base, dim, hidden=16, depth=2, time_features=4)
        nn.init.normal_(model.correction.out.weight, std=0.05)
        nn.init.normal_(model.correction.out.bias, std=0.05)
    return model


def three_mode_mixture() -> GaussianMixture:
    """An anisotropic, unequal-weight 2-D mixture: weights 0.2/0.3/0.5, correlated and elongated
    covariances, modes ≥ 4.5 apart (so nearest-mode assignment is unambiguous)."""
    return GaussianMixture(
        torch.tensor([0.2, 0.3, 0.5]),
        torch.tensor([[-3.0, 0.0], [2.0, 2.5], [1.5, -2.5]]),
        torch.tensor([[[0.4, 0.15], [0.15, 0.2]], [[0.15, -0.05], [-0.05, 0.5]], [[0.3, 0.0], [0.0, 0.1]]]),
    )


def mixture_stats(x: Tensor, gmm: GaussianMixture) -> tuple[Tensor, Tensor]:
    """(weights [M], means [M, D]) of samples x [n, D] assigned to their most responsible mode."""
    comp = gmm.responsibilities(x).argmax(-1)
    weights = torch.bincount(comp, minlength=len(gmm.weights)).double() / x.shape[0]
    means = torch.stack([x[comp == m].double().mean(0) for m in range(len(gmm.weights))])
    return weights, means


def _assets_present() -> bool:
    try:
        from soctune.examples.digits import shipped_model_path

        shipped_model_path("ddpm"), shipped_model_path("flow"), shipped_model_path("classifier")
        return True
    except (FileNotFoundError, ImportError):
        return False


#: skip a test that needs the shipped digits models when they are not built
needs_assets = pytest.mark.skipif(not _assets_present(), reason="shipped digits models not built")


def write_clip_tokenizer(folder: Path, max_length: int = 8):
    """A character-level CLIP BPE tokenizer (vocab.json + merges.txt written here)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
