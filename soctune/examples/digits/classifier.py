"""The small CNN behind the ``digit:K`` reward and the ``digits`` evaluator's features."""

from __future__ import annotations

import json
from pathlib import Path

from einops import rearrange
from torch import Tensor, nn

from . import shipped_model_path


class DigitClassifier(nn.Module):
    """Small CNN for 8×8 digits: [B, 1, 8, 8] in [−1, 1] -> logits [B, 10].

    SiLU activations and average pooling (no ReLU/max-pool kinks) keep the input gradient
    smooth, which matters because the log-probabilities are used as a differentiable reward.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.config = dict(channels=[c1, c2], hidden=hidden, num_classes=num_classes)
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),  # 8×8 -> 4×4
            nn.Conv2d(c1, c2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),  # 4×4 -> 2×2
        )
        self.fc = nn.Sequential(nn.Linear(c2 * 4, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: [B, 1, 8, 8] -> [B, hidden]."""
        h = rearrange(self.conv(x), "b c h w -> b (c h w)")
        return self.fc(h)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: [B, 1, 8, 8] -> [B, num_classes]."""
        return self.head(self.features(x))


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load a :class:`DigitClassifier` in eval mode, gradients still enabled (it is a reward).

    Args:
        path: a ``classifier.safetensors`` file or the folder holding it (its
            ``classifier.json`` sits next to it); default the shipped one.
    """
    from safetensors.torch import load_file

    p = Path(path) if path is not None else shipped_model_path("classifier")
    if p.is_dir():
        p = p / "classifier.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"no digits classifier at {p}")
    cfg_path = p.with_suffix(".json")
    cfg = json.loads(cfg_path.read_text())["config"] if cfg_path.is_file() else {}
    model = DigitClassifier(channels=tuple(cfg.get("channels", (32, 64))), hidden=cfg.get("hidden", 128),
                            num_classes=cfg.get("num_classes", 10))
    model.load_state_dict(load_file(str(p)))
    return model.eval()


__all__ = ["DigitClassifier", "load_classifier"]
