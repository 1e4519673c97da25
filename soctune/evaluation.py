"""Before/after evaluation of a fine-tuned model: reward, class shares, diversity, prior
preservation and distance to the exact tilt (rejection samples of the base model)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
from torch import Tensor

from .metrics import diversity, feature_frechet_distance, mean_and_stderr, rejection_sample_tilt
from .models.gmm import sliced_wasserstein

FeatureFn = Callable[[Tensor], Tensor]


@lru_cache(maxsize=1)
def independent_digit_classifier() -> Any:
    """A multinomial logistic regression on raw digit pixels (scikit-learn), trained here on the
    full digits set: an evaluator independent of the CNN used as reward."""
    from sklearn.linear_model import LogisticRegression

    from .models.digits import load_digits_tensor

    x, y = load_digits_tensor()
    clf = LogisticRegression(max_iter=2000, C=0.5)
    clf.fit(x.reshape(len(x), -1).numpy(), y.numpy())
    return clf


def digit_probabilities(x: Tensor) -> Tensor:
    """Independent class probabilities [N, 10] of digit images [N, 1, 8, 8] in [−1, 1]."""
    clf = independent_digit_classifier()
    return torch.from_numpy(clf.predict_proba(x.detach().float().clamp(-1, 1).reshape(len(x), -1).cpu().numpy()))


def pixel_features(x: Tensor, side: int = 16) -> Tensor:
    """Generic features: images [N, C, H, W] average-pooled to at most side×side, flattened."""
    x = x.detach().float()
    if x.shape[-1] > side:
        x = torch.nn.functional.adaptive_avg_pool2d(x, side)
    return x.flatten(1)


def evaluate_samples(x: Tensor, rewards: Tensor, features: Tensor, *, target_class: int | None = None,
                     images: Tensor | None = None) -> dict[str, Any]:
    """Metrics of one sample set: x [N, *S] states, rewards [N], features [N, D]; for digits,
    ``images`` [N, 1, 8, 8] and the rewarded ``target_class`` add class shares and the pixel
    spread among samples of that class."""
    mean, se = mean_and_stderr(rewards)
    out: dict[str, Any] = {"n": int(x.shape[0]), "reward_mean": mean, "reward_se": se,
                           "reward_std": float(rewards.double().std()), "diversity": diversity(features)}
    if images is not None and images.shape[1:] == (1, 8, 8):
        probs = digit_probabilities(images)
        labels = probs.argmax(1)
        out["class_counts"] = torch.bincount(labels, minlength=10).tolist()
        out["confidence"] = float(probs.max(1).values.mean())
        if target_class is not None:
            sel = labels == target_class
            out["target_share"] = float(sel.double().mean())
            out["target_spread_pixels"] = diversity(images[sel].flatten(1)) if int(sel.sum()) > 1 else 0.0
            out["target_diversity"] = diversity(features[sel]) if int(sel.sum()) > 1 else 0.0
    return out


def tilt_fidelity(ft_features: Tensor, base_features: Tensor, base_rewards: Tensor, lam: float, r_max: float,
                  generator: torch.Generator, n_boot: int = 20) -> dict[str, float]:
    """Distance to the exact tilt p_base·e^{λr}: rejection-sample the base samples (accept with
    e^{λ(r − r_max)}), then the sliced Wasserstein distance in feature space from the fine-tuned
    samples and from the base samples to those exact samples (mean ± bootstrap s.e.)."""
    ref = rejection_sample_tilt(base_features, base_rewards, lam, r_max, generator)
    if ref.shape[0] < 10:
        return {"target_samples": float(ref.shape[0])}
    m = ref.shape[0]

    def dist(a: Tensor) -> tuple[float, float]:
        vals = []
        for _ in range(n_boot):
            ia = torch.randint(a.shape[0], (m,), generator=generator)
            ir = torch.randint(m, (m,), generator=generator)
            vals.append(sliced_wasserstein(a[ia], ref[ir], generator=generator))
        return mean_and_stderr(torch.tensor(vals)) if len(vals) > 1 else (vals[0], float("nan"))

    ft, ft_se = dist(ft_features)
    base, base_se = dist(base_features)
    return {"target_samples": float(m), "sw_to_target": ft, "sw_to_target_se": ft_se,
            "sw_base_to_target": base, "sw_base_to_target_se": base_se,
            "frechet_to_target": feature_frechet_distance(ft_features, ref) if m > ft_features.shape[1] else float("nan")}


def compare(before: dict[str, Any], after: dict[str, Any], ft_features: Tensor, base_features: Tensor) -> dict[str, Any]:
    """Summary of a run: both metric sets plus prior preservation (Fréchet distance between
    fine-tuned and base features)."""
    return {"before": before, "after": after,
            "prior_preservation_frechet": feature_frechet_distance(ft_features, base_features)}
