"""Registers ``digit:K``; the reward itself lives with the shipped digits family
(:mod:`soctune.examples.digits.reward`). The registration stays here because the reward
registry finds its built-ins in this package (``soctune list`` reads this call without
importing torch)."""

from ..examples.digits.reward import DigitReward, to_digit_input
from .base import register_reward

register_reward("digit", "log p(K | x) under the shipped 8×8 digits classifier; arg: the digit K (0–9)")(DigitReward)

__all__ = ["DigitReward", "to_digit_input"]
