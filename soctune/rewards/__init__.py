"""Reward functions (log-rewards r(x, cond) -> [B]), registered by name; ``"a+0.5*b"`` is a weighted sum."""

from .base import (REWARDS, FunctionReward, LinearReward, QuadraticReward, Reward, WeightedSum, get_reward,
                   list_rewards, register_reward, split_terms)

__all__ = ["REWARDS", "FunctionReward", "LinearReward", "QuadraticReward", "Reward", "WeightedSum", "get_reward",
           "list_rewards", "register_reward", "split_terms"]
