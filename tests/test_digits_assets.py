"""The shipped 8×8-digits models load with diffusers alone and generate recognisable digits.

Everything here reads ``soctune/assets/digits`` directly (diffusers + sklearn), so a broken
asset is caught independently of soctune's own loading code — except (c), which checks the
shipped classifier through :func:`soctune.examples.digits.classifier.load_classifier`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ASSETS = Path(__file__).resolve().parent.parent / "soctune" / "assets" / "digits"

pytestmark = pytest.mark.skipif(not (ASSETS / "ddpm" / "unet" / "config.json").is_file(),
                                reason="digits assets not built (run `soctune pretrain-digits`)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded torch/BLAS: these ops are tiny, and on a shared 2-core machine a second
    spinning thread made sampling and the LR fit ~10× slower (40 s vs 3.5 s measured)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_lr():
    """Independent judge: multinomial logistic regression on raw pixels in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    return LogisticRegression(max_iter=5000).fit(d.images.reshape(len(d.images), -1) / 16.0, d.target)


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_folders_load_with_diffusers(kind: str) -> None:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(ASSETS / kind / "unet")
    assert unet.config.sample_size == 8
    assert unet.config.in_channels == unet.config.out_channels == 1
    if kind == "ddpm":
        sched = DDPMScheduler.from_pretrained(ASSETS / kind / "scheduler")
        assert sched.config.prediction_type == "epsilon"
        assert sched.config.beta_schedule == "squaredcos_cap_v2"
        assert not sched.config.clip_sample
    else:
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(ASSETS / kind / "scheduler")
        assert sched.config.shift == 1.0
    assert sched.config.num_train_timesteps == 1000
    out = unet(torch.zeros(2, 1, 8, 8), torch.tensor([10, 900])).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_ddpm_pipeline_loads() -> None:
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(ASSETS / "ddpm")
    assert pipe.unet.config.sample_size == 8


def test_ddpm_samples_are_confident_digits(digits_lr) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(ASSETS / "ddpm" / "unet").eval()
    sched = DDPMScheduler.from_pretrained(ASSETS / "ddpm" / "scheduler")
    sched.set_timesteps(50)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=gen)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=gen).prev_sample
    p = digits_lr.predict_proba(((x.clamp(-1, 1) + 1) / 2).reshape(64, -1).numpy())
    classes = np.unique(p.argmax(1))
    # Measured over sampling seeds 0..9 (this sampler, 64 samples): all 10 classes every time,
    # mean max-probability 0.904-0.951 (mean 0.925; real digits score 0.92 on this judge).
    # 0.85 is ~4.5 sd below that mean, yet far above a broken model (blobs score ~0.3-0.6).
    assert len(classes) >= 8, f"only classes {classes.tolist()} among 64 samples"
    assert p.max(1).mean() > 0.85, f"mean confidence {p.max(1).mean():.3f}"


def test_shipped_classifier_accuracy() -> None:
    from soctune.examples.digits.classifier import load_classifier
    from soctune.examples.digits.data import load_digits_tensor

    x, y = load_digits_tensor()
    clf = load_classifier()
    with torch.no_grad():
        acc = (clf(x).argmax(-1) == y).float().mean().item()
    # 98.3 % on its 20 % held-out split, ~99.7 % on all 1797 digits (80 % are its training set).
    assert acc > 0.97, f"accuracy {acc:.4f}"


def test_shipped_weights_are_small() -> None:
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 20 * 2**20, f"digits assets take {total / 2**20:.1f} MB"
