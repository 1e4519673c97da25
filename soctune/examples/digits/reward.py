"""``digit:K`` — log p(K | x) under the shipped 8×8 digits classifier (the default job's reward).

Registered under ``digit`` by :mod:`soctune.rewards.digits`, where the reward registry's scan
finds built-in registrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...registry import SoctuneError
from ...rewards.base import Reward
from ...rewards.image import as_image


def to_digit_input(x: Tensor) -> Tensor:
    """Images [B, C, H, W] in [−1, 1] -> classifier input [B, 1, 8, 8] in [−1, 1].

    RGB becomes grey by the channel mean; other sizes are resampled (area averaging when
    shrinking, bilinear when enlarging) — differentiable, so decoded images of a latent
    model can be scored too."""
    x = as_image(x)
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) != (8, 8):
        mode = "area" if h >= 8 and w >= 8 else "bilinear"
        x = F.interpolate(x, size=(8, 8), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    return x


class DigitReward(Reward):
    """r(x) = log softmax(f(x))_K with f the shipped :class:`~soctune.examples.digits.classifier.DigitClassifier`
    (trained with input noise, so ∇r is smooth off the data manifold). Upper bound 0.

    Args:
        digit: K ∈ {0, …, 9}.
        classifier_path: a ``classifier.safetensors`` (default: the shipped one).
    """

    maximum = 0.0

    def __init__(self, digit: int = 0, classifier_path: str | Path | None = None) -> None:
        super().__init__()
        from .classifier import load_classifier

        if not 0 <= int(digit) <= 9:
            raise SoctuneError(f"digit reward needs a class K in 0..9, got {digit}")
        self.digit = int(digit)
        try:
            clf = load_classifier(classifier_path)
        except FileNotFoundError as exc:
            raise SoctuneError(f"reward 'digit' cannot find its classifier ({exc}); run `soctune pretrain-digits` "
                               "or pass classifier_path=...") from None
        self.classifier = clf.eval().requires_grad_(False)

    @classmethod
    def from_arg(cls, arg: str | None) -> "DigitReward":
        if arg is None or not arg.strip().isdigit():
            raise SoctuneError(f"reward 'digit' needs the target class: digit:K with K in 0..9 (got '{arg or ''}')")
        return cls(int(arg))

    def log_probs(self, x: Tensor) -> Tensor:
        """log p(· | x) [B, 10]."""
        return torch.log_softmax(self.classifier(to_digit_input(x)).float(), dim=-1)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        return self.log_probs(x)[:, self.digit]


__all__ = ["DigitReward", "to_digit_input"]
