"""The shipped 8×8 digits family (scikit-learn's digits, no download): two tiny diffusers models,
a classifier used as the ``digit:K`` reward, and the ``digits`` evaluator.

Artefacts live in ``soctune/assets/digits/`` (package data):

* ``ddpm/``  — an ε-prediction DDPM, a standard diffusers ``DDPMPipeline`` folder
  (``model_index.json``, ``unet/``, ``scheduler/``), loadable as ``digits-ddpm``;
* ``flow/``  — a rectified-flow model in ``FlowMatchEulerDiscreteScheduler`` conventions
  (``unet/``, ``scheduler/``; the network predicts ε − x₀ at timestep 1000σ), ``digits-flow``;
* ``classifier.safetensors`` + ``classifier.json`` — a small CNN trained on noisy inputs, so its
  log-probabilities are a smooth, differentiable reward.

Each model folder holds a ``soctune.json`` declaring ``{"evaluator": "digits"}``. Modules:
:mod:`.data` (the data set), :mod:`.classifier` (the CNN), :mod:`.pretrain` (rebuilds every
artefact, ``soctune pretrain-digits``), :mod:`.reward` (``digit:K``), :mod:`.evaluator`.
This module imports nothing heavy: model aliases resolve through it without torch.
"""

from __future__ import annotations

from pathlib import Path

#: Where the shipped models live (inside the installed package, see pyproject package-data).
ASSETS_DIR = Path(__file__).resolve().parent.parent.parent / "assets" / "digits"


def shipped_model_path(kind: str) -> Path:
    """Path of a shipped model: ``"ddpm"``/``"flow"`` -> its diffusers folder,
    ``"classifier"`` -> ``classifier.safetensors``.

    Raises:
        FileNotFoundError: the asset was not built (one line, naming the fix).
    """
    if kind in ("ddpm", "flow"):
        path, marker = ASSETS_DIR / kind, ASSETS_DIR / kind / "unet" / "config.json"
    elif kind == "classifier":
        path = marker = ASSETS_DIR / "classifier.safetensors"
    else:
        raise ValueError(f"unknown digits model {kind!r}; expected 'ddpm', 'flow' or 'classifier'")
    if not marker.is_file():
        raise FileNotFoundError(f"shipped digits {kind} model not found at {path}; run `soctune pretrain-digits` "
                                "to build it")
    return path


__all__ = ["ASSETS_DIR", "shipped_model_path"]
