"""Rewards beyond the analytic ones: digit:K, the weight-free image rewards, and the pretrained
scorers (exercised with tiny random CLIP models the test writes — nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from soctune.registry import SoctuneError
from soctune.rewards import get_reward, list_rewards

from helpers import write_clip_tokenizer

# --------------------------------------------------------------------------------- registry


def test_new_rewards_are_registered_with_descriptions() -> None:
    entries = dict(list_rewards())
    for name in ("digit", "compressibility", "brightness", "contrast", "aesthetic", "hpsv2", "imagereward",
                 "pickscore"):
        assert name in entries and entries[name] and "\n" not in entries[name]


# ----------------------------------------------------------------------------------- digit:K


def _classifier_built() -> bool:
    from soctune.examples.digits import ASSETS_DIR

    return (ASSETS_DIR / "classifier.safetensors").is_file()


needs_classifier = pytest.mark.skipif(not _classifier_built(), reason="shipped digits classifier not built")


@needs_classifier
def test_digit_reward_ranks_real_digits_of_its_class_highest() -> None:
    from soctune.examples.digits.data import heldout_split, load_digits_tensor

    images, labels = load_digits_tensor()
    _, test = heldout_split(images.shape[0])  # digits the classifier never saw
    x, y = images[test], labels[test]
    for k in range(10):
        r = get_reward(f"digit:{k}")(x)
        assert r.shape == (x.shape[0],) and (r <= 0).all()
        n_k = int((y == k).sum())
        top = torch.topk(r, n_k).indices
        # precision of the top-n_k ranking (n_k = 30–51 held-out digits): measured 0.949–1.0 per class
        assert (y[top] == k).float().mean() >= 0.9, k
        # mean log-probability gap between class k and the rest: measured 22.6–30.6 nats
        assert r[y == k].mean() > r[y != k].mean() + 15.0, k


@needs_classifier
def test_digit_reward_gradient_is_sane_and_accepts_decoded_images() -> None:
    from soctune.examples.digits.data import load_digits_tensor

    images, labels = load_digits_tensor()
    reward = get_reward("digit:3")
    x = images[labels == 8][:16].clone().requires_grad_(True)  # 8s: far from a 3, strong gradient
    r = reward(x)
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and g.flatten(1).norm(dim=1).min() > 0
    # first order: a small ascent step raises r by ≈ ε‖g‖² (relative error measured ≤ 1 %)
    eps = 1e-3
    with torch.no_grad():
        gain = reward(x + eps * g) - r
        pred = eps * g.flatten(1).pow(2).sum(1)
    assert torch.allclose(gain, pred, rtol=0.05, atol=1e-6)
    # RGB 16×16 images (what a latent model decodes to) are scored through grey + area resize
    rgb = x.detach().repeat_interleave(2, -1).repeat_interleave(2, -2).expand(-1, 3, -1, -1)
    assert torch.allclose(reward(rgb), r.detach(), atol=1e-5)  # measured exact (0.0)


def test_digit_reward_needs_a_class() -> None:
    with pytest.raises(SoctuneError) as err:
        get_reward("digit")
    assert "digit:K" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SoctuneError):
        get_reward("digit:12")


# --------------------------------------------------------------------------- image rewards


def _test_images(seed: int, n: int = 48, size: int = 64) -> torch.Tensor:
    """Smooth fields, blocky fields and white noise mixed at random levels: [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        smooth = F.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=(size, size), mode="bicubic",
                               align_corners=False)
        blocky = F.interpolate(torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, size=(size, size), mode="nearest")
        a, b = torch.rand(2, generator=g)
        x = smooth + a * (blocky - smooth) + 0.8 * b**2 * torch.randn(1, 3, size, size, generator=g)
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def _jpeg_sizes(x: torch.Tensor, quality: int) -> np.ndarray:
    from PIL import Image

    arr = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return np.array(sizes)


@pytest.mark.parametrize("quality", [75, 95])
def test_compressibility_tracks_real_jpeg_size(quality: int) -> None:
    pytest.importorskip("PIL")
    from scipy.stats import spearmanr

    reward = get_reward(f"compressibility:{quality}")
    for seed in range(3):
        x = _test_images(seed)
        rho = spearmanr(-reward(x).numpy(), _jpeg_sizes(x, quality)).statistic
        # measured Spearman ρ over seeds 0–4: 0.965–0.985 (quality 75 and 95)
        assert rho > 0.93, (seed, rho)


def test_compressibility_gradient_ascent_compresses() -> None:
    reward = get_reward("compressibility")
    x = _test_images(0, n=8, size=32).requires_grad_(True)
    r = reward(x)
    assert r.shape == (8,) and (r <= 0).all()
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all()
    # autograd against central finite differences in float64 (measured max rel. error ≤ 6e-8)
    x64 = x.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(reward(x64).sum(), x64)
    d = torch.randn(x64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        fd = (reward(x64 + h * d) - reward(x64 - h * d)) / (2 * h)
    assert torch.allclose(fd, (g64 * d).flatten(1).sum(1), rtol=1e-6, atol=1e-9)
    # a flat image is (nearly) free; noise is expensive
    flat, noisy = torch.zeros(1, 3, 32, 32), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert reward(flat).item() > -1e-6 and reward(noisy.clamp(-1, 1)).item() < -1.0
    # odd sizes are padded like JPEG does; grey images work
    assert reward(torch.zeros(2, 1, 13, 21)).shape == (2,)


def test_brightness_and_contrast_values_and_gradients() -> None:
    bright, contrast = get_reward("brightness"), get_reward("contrast")
    white, black = torch.ones(1, 3, 8, 8), -torch.ones(1, 3, 8, 8)
    assert bright(white).item() == pytest.approx(1.0) and bright(black).item() == pytest.approx(0.0)
    half = torch.cat([white[..., :4], black[..., 4:]], -1)
    assert contrast(half).item() == pytest.approx(0.5, abs=1e-5)
    assert contrast(white).item() < 1e-5
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    (g,) = torch.autograd.grad(bright(x).sum(), x)
    # ∂/∂x of mean((x+1)/2 · w) = w / (2·HW) per channel (BT.601 weights)
    expected = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None] / (2 * 64)
    assert torch.allclose(g, expected.expand_as(g), atol=1e-7)
    with pytest.raises(SoctuneError) as err:
        bright(torch.zeros(2, 4, 8, 8))  # latents are not images
    assert "image_reward" in str(err.value)


# -------------------------------------------------------------------- pretrained scorers


def _tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random transformers CLIPModel + character-level tokenizer saved to ``folder``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tok = write_clip_tokenizer(folder, max_length=16)
    tok.save_pretrained(folder)
    text = dict(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder


def test_aesthetic_reward_with_local_tiny_weights(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import CLIPModel

    from soctune.rewards.pretrained import preprocess

    _tiny_clip(tmp_path / "aes" / "clip")
    torch.manual_seed(1)
    head = {"layers.0.weight": torch.randn(8, 16), "layers.0.bias": torch.randn(8),
            "layers.2.weight": torch.randn(1, 8), "layers.2.bias": torch.randn(1)}
    torch.save(head, tmp_path / "aes" / "sac+logos+ava1-l14-linearMSE.pth")
    reward = get_reward(f"aesthetic:{tmp_path / 'aes'}")
    x = (torch.rand(3, 3, 48, 40) * 2 - 1).requires_grad_(True)
    r = reward(x)
    clip = CLIPModel.from_pretrained(str(tmp_path / "aes" / "clip"))
    with torch.no_grad():
        e = clip.get_image_features(pixel_values=preprocess(x, 32))
        e = e if isinstance(e, torch.Tensor) else e.pooler_output
        e = e / e.norm(dim=-1, keepdim=True)
        h = e @ head["layers.0.weight"].T + head["layers.0.bias"]  # the LAION head has no activations
        ref = h @ head["layers.2.weight"].T + head["layers.2.bias"]
    assert torch.allclose(r.detach(), ref[:, 0], atol=1e-5)
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_pickscore_reward_reads_prompts_from_cond(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from soctune.models.diffusers_model import TextCond

    reward = get_reward(f"pickscore:{_tiny_clip(tmp_path / 'pick')}")
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    cond = TextCond({}, ["a cat", "a dog"])
    r = reward(x, cond)
    assert r.shape == (2,) and torch.isfinite(r).all()
    assert torch.allclose(reward(x.flip(0), TextCond({}, ["a dog", "a cat"])), r.flip(0), atol=1e-5)
    assert not torch.allclose(reward(x, TextCond({}, ["a dog", "a cat"])), r)  # the prompt matters
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(SoctuneError) as err:
        reward(x, None)
    assert "carries no prompts" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,module,package", [("hpsv2", "hpsv2", "pip install hpsv2"),
                                                 ("imagereward", "ImageReward", "pip install image-reward")])
def test_optional_scorers_name_what_is_missing(name: str, module: str, package: str, tmp_path: Path) -> None:
    with pytest.raises(SoctuneError) as err:
        get_reward(name)
    msg = str(err.value)
    assert "\n" not in msg
    assert (package in msg) if importlib.util.find_spec(module) is None else ("needs local weights" in msg)
