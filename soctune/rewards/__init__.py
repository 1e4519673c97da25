"""Reward functions (log-rewards r(x, cond) -> [B]), registered by name."""

from .base import REWARDS, FunctionReward, LinearReward, QuadraticReward, Reward, get_reward, list_rewards, register_reward

__all__ = ["REWARDS", "FunctionReward", "LinearReward", "QuadraticReward", "Reward", "get_reward", "list_rewards",
           "register_reward"]
