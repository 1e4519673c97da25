"""Pretrained-scorer adapters (aesthetic, pickscore, clipscore) against transformers' own CLIP
pipeline, their gradients, weighted reward sums, devices, and the one-line errors.

Everything runs on a tiny random CLIPModel (image 32, patch 8, hidden 32, 2 layers, projection 16)
written to a temporary folder; nothing is downloaded.

Measured tolerances (transformers 5.x, CLIPImageProcessor falling back to its PIL backend, torch
2.13 CPU), asserted with ≈ 1.2–2× margin:

* preprocessing: :func:`preprocess` vs ``CLIPImageProcessor`` on the same uint8 image differs by at
  most 1.04/255 per pixel (before normalisation) on smooth, unsaturated images, downsized,
  upsized, square or not (exact at the model size). Both use the a = −0.5 bicubic kernel; PIL
  rounds to uint8 between its two separable passes (≤ ≈ 1/255). On saturated or noisy images
  PIL also clips the overshoot between passes (5.9/255 on clamped smooth fields, 15–20/255 on
  noise), so the test images are smooth fields in [−0.8, 0.8].
* scores on those pixels vs the direct CLIPModel reference: aesthetic ≤ 4.4e-4 (score spread
  across images ≈ 0.03–0.08), pickscore ≤ 9.7e-3 (spread ≈ 3–4), clipscore ≤ 6.8e-2
  (= Δcos 6.8e-4; spread ≈ 23–29).
* gradients (float64 scorer and image): central finite differences along a random direction,
  step 1e-5, relative error ≤ 1.8e-9; the float32 gradient is within 1.8e-6 (relative, 2-norm)
  of the float64 one.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from soctune.registry import SoctuneError
from soctune.rewards import Reward, WeightedSum, get_reward, split_terms

from helpers import write_clip_tokenizer

pytest.importorskip("transformers")

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)  # deliberately not CLIP's: must be read from the folder
PROMPTS = ["a red cat", "a dog", "blue sky"]
SCORERS = ("aesthetic", "pickscore", "clipscore")


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'clip': a tiny CLIPModel + tokenizer + preprocessor folder, 'aesthetic': a folder with
    clip/ and a LinearStack head (safetensors) taking projection_dim = 16 inputs}."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("reward_weights")
    clip_dir = root / "clip"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = write_clip_tokenizer(clip_dir, max_length=16)
        tok.save_pretrained(clip_dir)
        text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip_dir)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(MEAN),
                           image_std=list(STD)).save_pretrained(clip_dir)
        aes = root / "aesthetic"
        shutil.copytree(clip_dir, aes / "clip")
        torch.manual_seed(1)
        head = {"layers.0.weight": torch.randn(8, 16) / 4, "layers.0.bias": torch.randn(8) / 4,
                "layers.2.weight": torch.randn(1, 8) / 3, "layers.2.bias": torch.randn(1)}
        save_file(head, str(aes / "sac+logos+ava1-l14-linearMSE.safetensors"))  # the LAION name has '+'s
    return {"clip": clip_dir, "aesthetic": aes, "head": aes / "sac+logos+ava1-l14-linearMSE.safetensors"}


def _spec(name: str, weights: dict[str, Path]) -> str:
    return f"{name}:{weights['aesthetic'] if name == 'aesthetic' else weights['clip']}"


@pytest.fixture(scope="module")
def rewards(weights: dict[str, Path]) -> dict[str, Reward]:
    return {name: get_reward(_spec(name, weights)) for name in SCORERS}


def _smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random fields in [−0.8, 0.8] (no saturation: see the module docstring): [n, 3, h, w]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 5, generator=g) * 2 - 1
    return 0.8 * F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def _quantise(x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """([HWC uint8 arrays] for the processor, the same image as a float tensor in [−1, 1])."""
    u = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [a.permute(1, 2, 0).numpy() for a in u], u.float() / 127.5 - 1


def _processor_pixels(weights: dict[str, Path], images: list) -> torch.Tensor:
    import warnings

    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision; falling back to the PIL backend"
        proc = CLIPImageProcessor.from_pretrained(str(weights["clip"]))
    return proc(images=images, return_tensors="pt")["pixel_values"]


def _reference(name: str, weights: dict[str, Path], pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The score computed directly with the CLIPModel on the processor's pixels."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(str(weights["clip"])).eval()
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=pixels)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        if name == "aesthetic":
            head = load_file(str(weights["head"]))  # the LAION head: linear layers, no activations
            h = img @ head["layers.0.weight"].T + head["layers.0.bias"]
            return (h @ head["layers.2.weight"].T + head["layers.2.bias"])[:, 0]
        tok = AutoTokenizer.from_pretrained(str(weights["clip"]))(prompts, padding="max_length", truncation=True,
                                                                  max_length=16, return_tensors="pt")
        txt = clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        txt = txt / txt.norm(dim=-1, keepdim=True)
        scale = clip.logit_scale.exp() if name == "pickscore" else 100.0
        return scale * (img * txt).sum(-1)


SHAPES = [(32, 32), (48, 40), (40, 48), (20, 24), (64, 64), (47, 40), (37, 53)]


# --------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("h,w", SHAPES)
def test_preprocess_matches_clip_image_processor(weights: dict[str, Path], h: int, w: int) -> None:
    from soctune.rewards.pretrained import preprocess

    images, xq = _quantise(_smooth_images(4, h, w, seed=h * 100 + w))
    ref = _processor_pixels(weights, images)
    ours = preprocess(xq, 32, MEAN, STD)
    assert ours.shape == ref.shape == (4, 3, 32, 32)
    err = ((ours - ref) * torch.tensor(STD)[:, None, None]).abs().max().item() * 255  # in 1/255 pixel steps
    # measured ≤ 1.04 (PIL's uint8 rounding between its two passes), exact at the model size
    assert err <= (1e-4 if (h, w) == (32, 32) else 1.25), err
    # grey images are scored as RGB
    grey = xq[:, :1]
    assert torch.allclose(preprocess(grey, 32, MEAN, STD), preprocess(grey.expand(-1, 3, -1, -1), 32, MEAN, STD))


# ------------------------------------------------------------------- scores vs reference
#: measured max |score − reference| over SHAPES: 4.4e-4, 9.7e-3, 6.8e-2 (see the module docstring)
SCORE_TOL = {"aesthetic": 1e-3, "pickscore": 2e-2, "clipscore": 0.15}


@pytest.mark.parametrize("name", SCORERS)
def test_score_matches_direct_clip_reference(weights: dict[str, Path], rewards: dict[str, Reward], name: str) -> None:
    reward = rewards[name]
    prompts = PROMPTS + ["a tree"]
    for h, w in SHAPES:
        images, xq = _quantise(_smooth_images(4, h, w, seed=h * 7 + w))
        ref = _reference(name, weights, _processor_pixels(weights, images), prompts)
        with torch.no_grad():
            r = reward(xq, prompts)
        assert r.shape == (4,) and r.dtype == torch.float32
        err = (r - ref).abs().max().item()
        assert err <= SCORE_TOL[name], (h, w, err)
        # the comparison is not vacuous: the scores of different images differ by far more
        assert (ref.max() - ref.min()).item() > 20 * SCORE_TOL[name], (h, w)


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", SCORERS)
def test_gradient_matches_finite_differences_in_float64(weights: dict[str, Path], name: str) -> None:
    reward = get_reward(_spec(name, weights)).double()
    for h, w in [(48, 40), (20, 24)]:
        x = _smooth_images(3, h, w, seed=5).double().requires_grad_(True)
        r = reward(x, PROMPTS)
        assert r.dtype == torch.float64
        (g,) = torch.autograd.grad(r.sum(), x)
        assert torch.isfinite(g).all() and (g.flatten(1).norm(dim=1) > 0).all()
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        step = 1e-5
        with torch.no_grad():
            fd = (reward(x + step * d, PROMPTS) - reward(x - step * d, PROMPTS)) / (2 * step)
        analytic = (g * d).flatten(1).sum(1)
        # measured max relative error 1.8e-9
        assert torch.allclose(fd, analytic, rtol=1e-6, atol=0), (h, w, fd, analytic)


@pytest.mark.parametrize("name", SCORERS)
def test_float32_gradient_is_finite_nonzero_and_close_to_float64(weights: dict[str, Path], rewards: dict[str, Reward],
                                                                 name: str) -> None:
    x = _smooth_images(3, 48, 40, seed=6)
    x32 = x.clone().requires_grad_(True)
    (g32,) = torch.autograd.grad(rewards[name](x32, PROMPTS).sum(), x32)
    x64 = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(get_reward(_spec(name, weights)).double()(x64, PROMPTS).sum(), x64)
    assert torch.isfinite(g32).all() and (g32.flatten(1).norm(dim=1) > 0).all()
    rel = ((g32.double() - g64).norm() / g64.norm()).item()
    assert rel < 1e-4, rel  # float32 round-off only: measured 1.8e-6


# ---------------------------------------------------------------------------- weighted sums
def test_weighted_sum_value_and_gradient_are_the_weighted_terms(weights: dict[str, Path],
                                                                 rewards: dict[str, Reward]) -> None:
    spec = (f"{_spec('aesthetic', weights)}+0.5*{_spec('pickscore', weights)}+-2*{_spec('clipscore', weights)}"
            "+1e-1*brightness")
    total = get_reward(spec)
    assert isinstance(total, WeightedSum) and total.weights == [1.0, 0.5, -2.0, 0.1]
    assert total.maximum is None  # a negative weight (and scorers without a maximum)
    x = _smooth_images(3, 40, 48, seed=7).requires_grad_(True)
    r = total(x, PROMPTS)
    assert r.shape == (3,) and r.dtype == torch.float32
    (g,) = torch.autograd.grad(r.sum(), x)
    terms = [(1.0, rewards["aesthetic"]), (0.5, rewards["pickscore"]), (-2.0, rewards["clipscore"]),
             (0.1, get_reward("brightness"))]
    ref_r = torch.zeros(3)
    ref_g = torch.zeros_like(x)
    for w, reward in terms:
        ri = reward(x, PROMPTS)
        (gi,) = torch.autograd.grad(ri.sum(), x)
        ref_r, ref_g = ref_r + w * ri.detach(), ref_g + w * gi
    assert torch.allclose(r.detach(), ref_r, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g, ref_g, rtol=1e-5, atol=1e-5)
    assert (g != 0).any()


def test_sum_grammar() -> None:
    assert split_terms("aesthetic+0.5*hpsv2") == ["aesthetic", "0.5*hpsv2"]
    assert split_terms("brightness + -0.1 * contrast") == ["brightness", "-0.1 * contrast"]
    assert split_terms("linear:1e+3,0") == ["linear:1e+3,0"]  # an exponent's '+'
    assert split_terms("2.5e+2*brightness+1e-3*contrast") == ["2.5e+2*brightness", "1e-3*contrast"]
    # a '+' that starts no term stays in the argument (the LAION head's file name has two)
    spec = "aesthetic:clip=/w/clip,head=/w/sac+logos+ava1-l14-linearMSE.pth+2*hpsv2:/w/hps"
    assert split_terms(spec) == ["aesthetic:clip=/w/clip,head=/w/sac+logos+ava1-l14-linearMSE.pth", "2*hpsv2:/w/hps"]
    assert split_terms("user_ou:OUProcess+brightness") == ["user_ou:OUProcess", "brightness"]  # plug-ins start terms

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    b, c = get_reward("brightness")(x), get_reward("contrast")(x)
    assert torch.allclose(get_reward("brightness+-0.1*contrast")(x), b - 0.1 * c)
    assert torch.allclose(get_reward(" 2 * brightness ")(x), 2 * b)
    assert torch.allclose(get_reward("sum:brightness")(x), b)
    assert torch.allclose(get_reward("linear:1e+0")(x[:, :1, :1, :1]), x.flatten(1)[:, 0])  # still a single reward
    assert not isinstance(get_reward("brightness"), WeightedSum)
    # maximum: Σ wᵢ·maxᵢ for non-negative weights and bounded terms, else None
    assert get_reward("brightness+0.5*contrast").maximum == pytest.approx(1.25)
    assert get_reward("brightness+2*quadratic").maximum == pytest.approx(1.0)
    assert get_reward("brightness+-1*contrast").maximum is None
    assert get_reward("brightness+linear").maximum is None
    # the Python API: terms as (weight, reward or single spec), the spec never split
    s = WeightedSum([(1.0, "brightness"), (3.0, lambda x, cond=None: x.flatten(1).sum(1))])
    assert torch.allclose(s(x), b + 3 * x.flatten(1).sum(1), atol=1e-5)


@pytest.mark.parametrize("spec,term", [("brightness+0.5*nope", "0.5*nope"),
                                       ("brightness+nan*contrast", "nan*contrast"),
                                       ("brightness+0.5*", "0.5*"),
                                       ("brightness+2*digit:12", "2*digit:12"),
                                       ("brightness+0.5*clipscore:/does/not/exist", "0.5*clipscore:/does/not/exist")])
def test_bad_sum_term_is_a_one_line_error_naming_it(spec: str, term: str) -> None:
    with pytest.raises(SoctuneError) as err:
        get_reward(spec)
    msg = str(err.value)
    assert f"'{term}'" in msg and "\n" not in msg


def test_sum_is_listed_with_its_syntax() -> None:
    from soctune.rewards import list_rewards

    desc = dict(list_rewards())["sum"]
    assert "aesthetic+0.5*hpsv2" in desc and "\n" not in desc
    with pytest.raises(SoctuneError) as err:
        get_reward("sum")
    assert "\n" not in str(err.value)
    with pytest.raises(SoctuneError):
        get_reward("brightness+contrast", quality=3)  # options are for single rewards


# ----------------------------------------------------------------------- devices and dtypes
def test_rewards_move_with_to_and_return_float32_on_the_input_device(weights: dict[str, Path]) -> None:
    total = get_reward(f"{_spec('clipscore', weights)}+0.5*{_spec('aesthetic', weights)}")
    params = list(total.parameters())
    assert len(params) > 0 and all(p.dtype == torch.float32 for p in params)
    total = total.double()  # .to() reaches every term's CLIP and head
    assert all(p.dtype == torch.float64 for p in total.parameters())
    x = _smooth_images(2, 32, 32, seed=8)
    assert total(x, PROMPTS[:2]).dtype == torch.float32  # a float32 image is cast to the scorer's dtype
    total = total.float()
    assert all(p.dtype == torch.float32 for p in total.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("name", SCORERS)
def test_scorer_on_cuda_takes_cpu_images(weights: dict[str, Path], rewards: dict[str, Reward], name: str) -> None:
    x = _smooth_images(3, 48, 40, seed=9)
    with torch.no_grad():
        ref = rewards[name](x, PROMPTS)
    gpu = get_reward(_spec(name, weights)).to("cuda")
    xc = x.clone().requires_grad_(True)
    r = gpu(xc, PROMPTS)  # images on the CPU, scorer on the GPU
    assert r.device.type == "cpu" and r.dtype == torch.float32
    (g,) = torch.autograd.grad(r.sum(), xc)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.allclose(r.detach(), ref, rtol=1e-3, atol=1e-3 * max(1.0, ref.abs().max().item()))
    rc = gpu(x.cuda(), PROMPTS)
    assert rc.device.type == "cuda" and rc.dtype == torch.float32
    total = get_reward(f"{_spec(name, weights)}+0.1*brightness").to("cuda")
    assert total(x.cuda(), PROMPTS).device.type == "cuda"


# ---------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("name", SCORERS)
def test_missing_or_wrong_weights_are_one_line_errors(name: str, tmp_path: Path) -> None:
    cases = {f"{name}": "needs local weights", f"{name}:{tmp_path / 'absent'}": "does not exist",
             f"{name}:{tmp_path}": "no head weights" if name == "aesthetic" else "cannot load"}
    for spec, expected in cases.items():
        with pytest.raises(SoctuneError) as err:
            get_reward(spec)
        msg = str(err.value)
        assert expected in msg and "\n" not in msg and f"'{name}'" in msg, (spec, msg)


def test_aesthetic_head_of_the_wrong_width_is_a_one_line_error(weights: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    shutil.copytree(weights["clip"], tmp_path / "clip")
    head = {"layers.0.weight": torch.randn(1, 768), "layers.0.bias": torch.randn(1)}
    save_file(head, str(tmp_path / "head.safetensors"))
    with pytest.raises(SoctuneError) as err:
        get_reward(f"aesthetic:{tmp_path}")
    assert "768" in str(err.value) and "16" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,module,pip", [("hpsv2", ("hpsv2", "open_clip"), "pip install hpsv2"),
                                             ("imagereward", ("ImageReward",), "pip install image-reward")])
def test_missing_optional_package_names_the_pip_install(name: str, module: tuple[str, ...], pip: str,
                                                        tmp_path: Path) -> None:
    installed = any(importlib.util.find_spec(m) is not None for m in module)
    for spec in (f"{name}:{tmp_path}", f"brightness+0.5*{name}:{tmp_path}"):
        with pytest.raises(SoctuneError) as err:
            get_reward(spec)
        msg = str(err.value)
        assert "\n" not in msg
        if not installed:
            assert pip in msg, msg
