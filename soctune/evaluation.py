"""Before/after evaluation of a fine-tuned model: reward, diversity, prior preservation, distance
to the exact tilt (rejection samples of the base model, or the closed form of a Gaussian-mixture
tilt), and what a model family's own evaluator adds (e.g. class shares).

Evaluators are registered by name. A model folder declares its evaluator in ``soctune.json``
(``{"evaluator": "NAME"}``); a folder without one gets ``generic`` (pixel features, no class
report). The declaration is data: nothing in a model or run folder is imported or executed, and
only registered names are accepted. Evaluators of the shipped example families
(``soctune/examples/*/evaluator.py``) register when a folder first names one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .metrics import diversity, feature_frechet_distance, mean_and_stderr, rejection_sample_tilt, target_fidelity
from .models.gmm import GaussianMixture, mixture_weights_by_nearest_mean
from .registry import Registry, SoctuneError

FeatureFn = Callable[[Tensor], Tensor]

#: the file in a model folder that names its evaluator: ``{"evaluator": "NAME"}``
EVALUATOR_FILE = "soctune.json"

EVALUATORS: Registry[Any] = Registry("evaluator")
register_evaluator = EVALUATORS.register


class Evaluator:
    """How a model family's samples are judged, beyond reward and the generic metrics.

    ``features`` embeds images [N, C, H, W] in [−1, 1] as [N, D] (diversity, prior
    preservation's Fréchet distance, distance to the tilt); ``target`` reads, from the run's
    reward spec, what the reward favours (None: nothing this evaluator reports on);
    ``report`` adds the family's own metrics of a sample set. The base class is the generic
    evaluator: pixel features, no target, no report.
    """

    def features(self, images: Tensor) -> Tensor:
        """Images [N, C, H, W] -> features [N, D] (:func:`pixel_features`)."""
        return pixel_features(images)

    def target(self, reward: str) -> Any:
        """What the reward spec ``reward`` (e.g. ``"name:arg"``) rewards, in this evaluator's
        terms, or None."""
        return None

    def report(self, images: Tensor, features: Tensor, target: Any = None) -> dict[str, Any]:
        """Family-specific metrics of images [N, C, H, W] with their features [N, D] (JSON
        values); ``target`` from :meth:`target` adds metrics about what the reward favours."""
        return {}


@register_evaluator("generic", "pixel features (average-pooled to at most 16×16), no class report")
class GenericEvaluator(Evaluator):
    """Any model: the base :class:`Evaluator`."""


def list_evaluators() -> list[tuple[str, str]]:
    """[(name, description)] of every registered evaluator, the shipped families' included."""
    _load_example_evaluators()
    return [(e.name, e.description) for e in EVALUATORS.entries()]


def get_evaluator(name: str, source: str = "") -> Evaluator:
    """The registered evaluator ``name``, built. Only registered names: an import path
    (``pkg.module:Class``) is refused, since the name may come from a downloaded model folder.
    ``source`` names where the name came from, for the error."""
    if name not in EVALUATORS:
        _load_example_evaluators()
    if ":" in name or name not in EVALUATORS:
        origin = f" (named in {source})" if source else ""
        raise SoctuneError(f"unknown evaluator '{name}'{origin}; use a registered evaluator name: "
                           f"{', '.join(EVALUATORS.names())} (import paths are not accepted)")
    return EVALUATORS.get(name)()


def evaluator_for(model_dir: str | Path | None) -> Evaluator:
    """The evaluator a model folder declares in its ``soctune.json`` (``{"evaluator": NAME}``,
    read as JSON, never executed), or the generic one when there is none (or no folder)."""
    if model_dir is None:
        return GenericEvaluator()
    path = Path(model_dir) / EVALUATOR_FILE
    if not path.is_file():
        return GenericEvaluator()
    try:
        decl = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SoctuneError(f"{path} is not valid JSON ({exc}); write {{\"evaluator\": \"NAME\"}} or delete "
                           "it") from None
    name = decl.get("evaluator", "generic") if isinstance(decl, dict) else None
    if not isinstance(name, str):
        raise SoctuneError(f"{path} must hold {{\"evaluator\": \"NAME\"}} with NAME a registered evaluator "
                           f"({', '.join(n for n, _ in list_evaluators())})")
    return get_evaluator(name, source=str(path))


def _load_example_evaluators() -> None:
    """Import ``soctune/examples/*/evaluator.py`` (each registers its evaluator). Only the
    shipped package's own modules are imported, and only when a name is not yet known."""
    import importlib
    import importlib.util
    import pkgutil

    from . import examples

    for info in pkgutil.iter_modules(examples.__path__):
        name = f"{examples.__name__}.{info.name}.evaluator"
        if info.ispkg and importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def pixel_features(x: Tensor, side: int = 16) -> Tensor:
    """Generic features: images [N, C, H, W] average-pooled to at most side×side, flattened."""
    x = x.detach().float()
    if x.shape[-1] > side:
        x = torch.nn.functional.adaptive_avg_pool2d(x, side)
    return x.flatten(1)


def evaluate_samples(x: Tensor, rewards: Tensor, features: Tensor, *, evaluator: Evaluator | None = None,
                     images: Tensor | None = None, target: Any = None) -> dict[str, Any]:
    """Metrics of one sample set: x [N, *S] states, rewards [N] (mean, standard error, std),
    features [N, D] (diversity: mean pairwise distance); with ``images`` [N, C, H, W], the
    ``evaluator``'s report of them (and of ``target``, what the reward favours) is added."""
    mean, se = mean_and_stderr(rewards)
    out: dict[str, Any] = {"n": int(x.shape[0]), "reward_mean": mean, "reward_se": se,
                           "reward_std": float(rewards.double().std()), "diversity": diversity(features)}
    if images is not None and evaluator is not None:
        out.update(evaluator.report(images, features, target))
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


FEATURE_EXTRACTORS = ("pixels", "dreamsim")
#: older names of an evaluator's features
_FEATURE_ALIASES = {"classifier": "digits"}


def feature_extractor(name: str = "pixels", device: str = "cpu") -> FeatureFn:
    """Embedding used by diversity and Fréchet metrics, images [N, C, H, W] in [−1, 1] -> [N, D]:
    ``pixels`` (:func:`pixel_features`), ``dreamsim`` (the DreamSim perceptual embedding, where
    the ``dreamsim`` package and its weights are installed) or a registered evaluator's features
    (``digits``: the shipped digits classifier's penultimate layer, 128-D; also ``classifier``)."""
    if name == "pixels":
        return pixel_features
    if name == "dreamsim":
        try:
            from dreamsim import dreamsim  # type: ignore[import-not-found]
        except ImportError:
            raise SoctuneError("feature extractor 'dreamsim' needs `pip install dreamsim`; or use 'pixels' or an "
                               "evaluator's name") from None
        net, _ = dreamsim(pretrained=True, device=device)

        def dreamsim_features(x: Tensor) -> Tensor:
            img = torch.nn.functional.interpolate(((x.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1), size=224,
                                                  mode="bilinear", align_corners=False)
            with torch.no_grad():
                return net.embed(img.to(device)).cpu()
        return dreamsim_features
    try:
        evaluator = get_evaluator(_FEATURE_ALIASES.get(name, name))
    except SoctuneError:
        raise SoctuneError(f"unknown feature extractor '{name}'; choose one of {', '.join(FEATURE_EXTRACTORS)} or an "
                           f"evaluator's ({', '.join(EVALUATORS.names())})") from None

    def evaluator_features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return evaluator.features(x.float())
    return evaluator_features


def compare(before: dict[str, Any], after: dict[str, Any], ft_features: Tensor, base_features: Tensor) -> dict[str, Any]:
    """Summary of a run: both metric sets plus prior preservation (Fréchet distance between
    fine-tuned and base features)."""
    return {"before": before, "after": after,
            "prior_preservation_frechet": feature_frechet_distance(ft_features, base_features)}
