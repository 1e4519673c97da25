"""Before/after evaluation of a fine-tuned model: reward, class shares, diversity, prior
preservation and distance to the exact tilt (rejection samples of the base model, or the closed
form of a Gaussian-mixture tilt)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
from torch import Tensor

from .metrics import diversity, feature_frechet_distance, mean_and_stderr, rejection_sample_tilt, target_fidelity
from .models.gmm import GaussianMixture, mixture_weights_by_nearest_mean

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
    """Distance to the exact tilt p_base·e^{λr} for a bounded reward (r ≤ r_max): rejection-sample
    the base samples (accept with e^{λ(r − r_max)}; the accepted ones are exact samples of the tilt),
    then the sliced 2-Wasserstein distance in feature space from the fine-tuned samples
    ft_features [n, D] and from the base samples base_features [N, D] to those exact samples, each
    with its bootstrap standard error (see :func:`~soctune.metrics.target_fidelity`)."""
    ref = rejection_sample_tilt(base_features, base_rewards, lam, r_max, generator)
    m = ref.shape[0]
    if m < 10:
        return {"target_samples": float(m)}
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    # the same generator seed for both calls: same projection directions, so the two are comparable
    ft, ft_se = target_fidelity(ft_features, ref, n_boot, generator=torch.Generator().manual_seed(seed))
    base, base_se = target_fidelity(base_features, ref, n_boot, generator=torch.Generator().manual_seed(seed))
    return {"target_samples": float(m), "sw_to_target": ft, "sw_to_target_se": ft_se,
            "sw_base_to_target": base, "sw_base_to_target_se": base_se,
            "frechet_to_target": feature_frechet_distance(ft_features, ref) if m > ft_features.shape[1] else float("nan")}


def gmm_tilt_fidelity(x: Tensor, target: GaussianMixture, n_ref: int = 4096, seed: int = 0,
                      n_boot: int = 20) -> dict[str, float]:
    """Distance of samples x [n, D] to a closed-form target mixture (e.g. a tilt from
    :meth:`GaussianMixture.tilt_quadratic`): sliced 2-Wasserstein distance to ``n_ref`` exact samples
    (± bootstrap s.e.), the same distance for a second independent exact set of size n (the
    sampling floor: what a perfect sampler scores), and the largest error of the mode weights
    (nearest-mode assignment) against the exact weights."""
    gen = torch.Generator().manual_seed(seed)
    ref, _ = target.sample(n_ref, generator=gen)
    exact, _ = target.sample(x.shape[0], generator=gen)
    sw_seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    d, se = target_fidelity(x, ref, n_boot, generator=torch.Generator().manual_seed(sw_seed))
    floor, floor_se = target_fidelity(exact, ref, n_boot, generator=torch.Generator().manual_seed(sw_seed))
    w = mixture_weights_by_nearest_mean(x.double(), target)
    return {"sw_to_target": d, "sw_to_target_se": se, "sw_exact_floor": floor, "sw_exact_floor_se": floor_se,
            "weights": w.tolist(), "weight_err": float((w - target.weights).abs().max())}


FEATURE_EXTRACTORS = ("classifier", "pixels", "dreamsim")


def feature_extractor(name: str = "classifier", device: str = "cpu") -> FeatureFn:
    """Embedding used by diversity and Fréchet metrics, images [N, C, H, W] in [−1, 1] -> [N, D]:
    ``classifier`` (the shipped digits classifier's penultimate features, 128-D), ``pixels``
    (:func:`pixel_features`) or ``dreamsim`` (the DreamSim perceptual embedding, where the
    ``dreamsim`` package and its weights are installed)."""
    from .registry import SoctuneError

    if name == "classifier":
        from .models.digits import load_classifier

        clf = load_classifier().eval()

        def classifier_features(x: Tensor) -> Tensor:
            from .rewards.digits import to_digit_input

            with torch.no_grad():
                return clf.features(to_digit_input(x.float()))
        return classifier_features
    if name == "pixels":
        return pixel_features
    if name == "dreamsim":
        try:
            from dreamsim import dreamsim  # type: ignore[import-not-found]
        except ImportError:
            raise SoctuneError("feature extractor 'dreamsim' needs `pip install dreamsim`; or use 'classifier'/'pixels'") from None
        net, _ = dreamsim(pretrained=True, device=device)

        def dreamsim_features(x: Tensor) -> Tensor:
            img = torch.nn.functional.interpolate(((x.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1), size=224,
                                                  mode="bilinear", align_corners=False)
            with torch.no_grad():
                return net.embed(img.to(device)).cpu()
        return dreamsim_features
    raise SoctuneError(f"unknown feature extractor '{name}'; choose one of {', '.join(FEATURE_EXTRACTORS)}")


def compare(before: dict[str, Any], after: dict[str, Any], ft_features: Tensor, base_features: Tensor) -> dict[str, Any]:
    """Summary of a run: both metric sets plus prior preservation (Fréchet distance between
    fine-tuned and base features)."""
    return {"before": before, "after": after,
            "prior_preservation_frechet": feature_frechet_distance(ft_features, base_features)}
