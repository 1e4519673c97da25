"""The ``digits`` evaluator, declared by the shipped digits model folders (``soctune.json``):
features from the shipped classifier, and a class report by an *independent* pixel classifier
(a logistic regression, not the CNN the ``digit:K`` reward uses), with the share and spread of
the rewarded digit."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ...evaluation import Evaluator, register_evaluator
from ...metrics import diversity

NUM_CLASSES = 10


@lru_cache(maxsize=1)
def independent_digit_classifier() -> Any:
    """A multinomial logistic regression on raw digit pixels (scikit-learn), trained here on the
    full digits set: an evaluator independent of the CNN used as reward."""
    from sklearn.linear_model import LogisticRegression

    from .data import load_digits_tensor

    x, y = load_digits_tensor()
    clf = LogisticRegression(max_iter=2000, C=0.5)
    clf.fit(x.reshape(len(x), -1).numpy(), y.numpy())
    return clf


def digit_probabilities(x: Tensor) -> Tensor:
    """Independent class probabilities [N, 10] of digit images [N, 1, 8, 8] in [−1, 1]."""
    clf = independent_digit_classifier()
    return torch.from_numpy(clf.predict_proba(x.detach().float().clamp(-1, 1).reshape(len(x), -1).cpu().numpy()))


def _spread(x: Tensor) -> float:
    """Mean pairwise L2 distance of rows [n, D]; 0 for fewer than two."""
    return diversity(x) if x.shape[0] > 1 else 0.0


@register_evaluator("digits", "8×8 digits: shipped classifier features; class shares and the rewarded digit's "
                              "share/spread by an independent pixel classifier")
class DigitsEvaluator(Evaluator):
    """Evaluator of the shipped 8×8 digits models (images [N, 1, 8, 8] in [−1, 1])."""

    def __init__(self) -> None:
        from .classifier import load_classifier

        self.classifier = load_classifier().eval().requires_grad_(False)

    def features(self, images: Tensor) -> Tensor:
        """The shipped classifier's penultimate features [N, 128]."""
        from .reward import to_digit_input

        with torch.no_grad():
            return self.classifier.features(to_digit_input(images.float()))

    def target(self, reward: str) -> int | None:
        """K of a ``digit:K`` reward spec, else None."""
        name, _, arg = reward.partition(":")
        return int(arg) if name == "digit" and arg.isdigit() else None

    def report(self, images: Tensor, features: Tensor, target: Any = None) -> dict[str, Any]:
        """Labels ℓ_i = argmax of :func:`digit_probabilities`: class_counts / class_shares [10],
        confidence (mean max probability), class_spread_pixels [10] (pixel spread within each
        class); with a target digit K: target_share (share of ℓ = K), target_spread_pixels and
        target_diversity (spread of those samples' pixels and features)."""
        flat = images.detach().float().flatten(1)
        probs = digit_probabilities(images)
        labels = probs.argmax(1)
        counts = torch.bincount(labels, minlength=NUM_CLASSES)
        out: dict[str, Any] = {
            "class_counts": counts.tolist(), "class_shares": (counts.double() / images.shape[0]).tolist(),
            "confidence": float(probs.max(1).values.mean()),
            "class_spread_pixels": [_spread(flat[labels == c]) for c in range(NUM_CLASSES)]}
        if target is not None:
            sel = labels == int(target)
            out.update(target_share=float(sel.double().mean()), target_spread_pixels=_spread(flat[sel]),
                       target_diversity=_spread(features[sel]))
        return out


__all__ = ["DigitsEvaluator", "digit_probabilities", "independent_digit_classifier"]
