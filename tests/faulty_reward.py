"""A reward plug-in for fault injection (``--reward faulty_reward:NaNDigitReward[:always]``):
the digit-3 reward with sample 0's reward replaced by NaN while the class switch ``active`` is
on (or always, with the argument ``always``). The NaN enters the reward only, not its gradient
(r + where(mask, nan, 0) keeps ∇r finite), so only the reward check can catch it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from soctune.rewards.base import Reward
from soctune.rewards.digits import DigitReward


class NaNDigitReward(Reward):
    """log p(3 | x) [B], with r[0] = NaN while ``NaNDigitReward.active`` (or ``always``)."""

    active = False
    maximum = 0.0

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.inner = DigitReward(3)
        self.always = bool(always)

    @classmethod
    def from_arg(cls, arg: str | None) -> "NaNDigitReward":
        return cls(always=arg == "always")

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        r = self.inner(x, cond)
        if self.always or type(self).active:
            mask = torch.arange(r.shape[0], device=r.device) == 0
            r = torch.where(mask, torch.full_like(r, float("nan")), r)
        return r
