"""scikit-learn's 8×8 digits as tensors, and the seeded held-out split the classifier uses."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def load_digits_tensor() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits (bundled with sklearn, no download).

    Returns:
        images [1797, 1, 8, 8] float32 in [−1, 1] (pixel/16·2 − 1) and labels [1797] int64.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images).to(torch.float32)  # [1797, 8, 8], integer levels 0..16
    images = rearrange(images, "n h w -> n 1 h w") / 16.0 * 2.0 - 1.0
    labels = torch.from_numpy(d.target).to(torch.int64)
    return images, labels


def heldout_split(n: int, seed: int = 0, fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """A seeded random split of range(n) into (train indices, held-out indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(fraction * n))
    return perm[n_test:], perm[:n_test]


__all__ = ["heldout_split", "load_digits_tensor"]
