"""Rewards backed by pretrained scorers: ``aesthetic``, ``pickscore``, ``clipscore``, ``hpsv2``,
``imagereward``.

Nothing is downloaded: each reward loads its weights from a local path (``name:PATH`` or
``path=...``) and, if an optional package or the weights are missing, fails with a one-line
:class:`~soctune.registry.SoctuneError` naming what to install or where the weights go.

All of them are differentiable in the image: preprocessing (resize to the scorer's input size,
normalisation) is done with torch ops on [B, C, H, W] images in [−1, 1] instead of the PIL
processors, so the reward gradient reaches the sampler. Text–image scorers read the prompts
from the conditioning (``cond.prompts`` of :class:`~soctune.models.diffusers_model.TextCond`,
or a plain list of strings).

Devices and precision: each scorer moves its input to the device (and dtype) of its own
parameters — so ``reward.to("cuda")`` is all it takes, whatever device the images come from —
and returns the scores [B] on the input's device in float32 (float64 when both the images and
the scorer — ``reward.double()`` — are float64, e.g. for finite-difference checks).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import one_line_reason
from ..registry import SoctuneError
from .base import Reward, register_reward
from .image import as_image

#: CLIP's image normalisation (OpenAI CLIP, also used by open_clip ViT-H-14 and BLIP)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _require(package: str, pip_name: str, reward: str, weights: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise SoctuneError(f"reward '{reward}' needs the optional package '{pip_name}' (pip install {pip_name}) "
                           f"and local weights ({weights}); nothing is downloaded") from None


def _require_path(path: str | Path | None, reward: str, weights: str) -> Path:
    if path is None or str(path) == "":
        raise SoctuneError(f"reward '{reward}' needs local weights: pass {reward}:PATH with {weights} "
                           "(nothing is downloaded)")
    p = Path(path).expanduser()
    if not p.exists():
        raise SoctuneError(f"reward '{reward}': weights path '{p}' does not exist; it must hold {weights}")
    return p


def preprocess(x: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """Differentiable CLIP-style preprocessing: [B, C, H, W] in [−1, 1] -> [B, 3, size, size]
    normalised; grey images are repeated to RGB. As transformers' ``CLIPImageProcessor`` does:
    the short side is resized to ``size`` and the long side to ``int(size · long / short)``
    (truncated), bicubic, then a centre crop with offsets ``(n − size) // 2``. The resize is
    torch's antialiased bicubic, PIL's kernel (a = −0.5) in both directions; it differs from the
    processor's PIL resize by PIL's uint8 rounding between its two separable passes (≤ 1.04/255
    per pixel, measured in tests/test_reward_adapters.py) and, on saturated or noisy images, by
    PIL clipping the kernel's overshoot to [0, 255] there."""
    x = (as_image(x) + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    nh, nw = (new_long, size) if w <= h else (size, new_long)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top: top + size, left: left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    sd = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / sd


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, floating dtype) of a scorer's parameters: where its inputs must go."""
    p = next(module.parameters())
    return p.device, p.dtype


def _score(score: Tensor, x: Tensor) -> Tensor:
    """Scores [B] on x's device in float32 — float64 when both the images and the scorer are."""
    both64 = score.dtype == torch.float64 and x.dtype == torch.float64
    return score.to(device=x.device, dtype=torch.float64 if both64 else torch.float32)


def _clip_normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(image_mean, image_std) from the folder's preprocessor_config.json, else OpenAI CLIP's."""
    mean, std = CLIP_MEAN, CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        try:
            cfg = json.loads(pre.read_text())
        except ValueError:
            raise SoctuneError(f"'{pre}' is not valid JSON") from None
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return tuple(map(float, mean)), tuple(map(float, std))


def prompts_of(cond: Any, batch: int, reward: str) -> list[str]:
    """The B prompt strings carried by the conditioning."""
    prompts = getattr(cond, "prompts", None)
    if prompts is None and isinstance(cond, (list, tuple)) and all(isinstance(p, str) for p in cond):
        prompts = list(cond)
    if prompts is None:
        raise SoctuneError(f"reward '{reward}' scores image–prompt pairs but the conditioning carries no prompts; "
                           "sample with LoadedModel.cond_sampler(prompts) or pass cond=TextCond(..., prompts)")
    if len(prompts) == 1 and batch > 1:
        prompts = list(prompts) * batch
    if len(prompts) != batch:
        raise SoctuneError(f"reward '{reward}' got {len(prompts)} prompts for {batch} images")
    return list(prompts)


def _image_features(clip: nn.Module, pixels: Tensor) -> Tensor:
    out = clip.get_image_features(pixel_values=pixels)
    return out if isinstance(out, Tensor) else out.pooler_output  # transformers ≥ 5 returns an output object


def _text_features(clip: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    out = clip.get_text_features(input_ids=ids, attention_mask=mask)
    return out if isinstance(out, Tensor) else out.pooler_output


def _parse_kv(arg: str | None, keys: Sequence[str]) -> dict[str, str]:
    """``"PATH"`` -> {"path": PATH}; ``"clip=A,head=B"`` -> {"clip": A, "head": B}."""
    if not arg:
        return {}
    if "=" not in arg:
        return {"path": arg}
    out = {}
    for part in arg.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in keys:
            raise SoctuneError(f"unknown option '{k.strip()}'; expected one of {', '.join(keys)}")
        out[k.strip()] = v.strip()
    return out


def _load_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class LinearStack(nn.Module):
    """The LAION aesthetic head: Linear layers applied in sequence, no activations (the
    improved-aesthetic-predictor MLP 768→1024→128→64→16→1; its dropouts are inactive at eval).
    Built from a state dict with keys ``layers.<i>.weight``/``bias``."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        if not idx:
            raise SoctuneError("aesthetic head weights have no 'layers.<i>.weight' entries; expected the LAION "
                               "improved-aesthetic-predictor MLP (sac+logos+ava1-l14-linearMSE.pth)")
        self.linears = nn.ModuleList()
        for i in idx:
            w = state[f"layers.{i}.weight"]
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data.copy_(w)
            lin.bias.data.copy_(state[f"layers.{i}.bias"])
            self.linears.append(lin)

    def forward(self, h: Tensor) -> Tensor:
        for lin in self.linears:
            h = lin(h)
        return h


@register_reward("aesthetic", "LAION aesthetic predictor (CLIP ViT-L/14 + MLP head) from local weights; arg: PATH")
class AestheticReward(Reward):
    """r(x) = MLP(e / ‖e‖), e = CLIP ViT-L/14 image embedding (the LAION improved aesthetic
    predictor, as in DDPO / DRaFT / AlignProp); scores ≈ 1–10.

    Args:
        path: a folder holding ``clip/`` (a transformers CLIPModel, e.g. openai/clip-vit-large-patch14)
            and the head (``*.pth``/``*.safetensors``); or give ``clip_path`` and ``head_path``.
    """

    WEIGHTS = ("a folder with clip/ (transformers openai/clip-vit-large-patch14) and the LAION head "
               "sac+logos+ava1-l14-linearMSE.pth")

    def __init__(self, path: str | Path | None = None, clip_path: str | Path | None = None,
                 head_path: str | Path | None = None) -> None:
        super().__init__()
        _require("transformers", "transformers", "aesthetic", self.WEIGHTS)
        from transformers import CLIPModel

        if clip_path is None or head_path is None:
            root = _require_path(path, "aesthetic", self.WEIGHTS)
            clip_path = clip_path or (root / "clip" if (root / "clip").is_dir() else root)
            if head_path is None:
                heads = sorted([*root.glob("*.pth"), *root.glob("*.pt"), *root.glob("*.safetensors")])
                heads = [h for h in heads if not h.name.startswith(("model", "pytorch_model"))]  # not CLIP's
                if not heads:
                    raise SoctuneError(f"reward 'aesthetic': no head weights (*.pth / *.safetensors) in '{root}'; "
                                       "put sac+logos+ava1-l14-linearMSE.pth there")
                head_path = heads[0]
        clip_dir = _require_path(clip_path, "aesthetic", self.WEIGHTS)
        head_file = _require_path(head_path, "aesthetic", self.WEIGHTS)
        try:
            self.clip = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval().requires_grad_(False)
        except Exception as exc:  # noqa: BLE001
            raise SoctuneError(f"reward 'aesthetic': cannot load CLIP from '{clip_dir}' ({one_line_reason(exc)}); it must "
                               "be a transformers CLIPModel folder") from None
        self.head = LinearStack(_load_state(head_file)).eval().requires_grad_(False)
        width, takes = int(self.clip.config.projection_dim), self.head.linears[0].in_features
        if takes != width:
            raise SoctuneError(f"reward 'aesthetic': the head '{head_file.name}' takes {takes}-d embeddings but the "
                               f"CLIP in '{clip_dir}' makes {width}-d ones; use the matching CLIP (ViT-L/14 for the "
                               "LAION head)")
        self.size = int(self.clip.config.vision_config.image_size)
        self.mean, self.std = _clip_normalisation(clip_dir)

    @classmethod
    def from_arg(cls, arg: str | None) -> "AestheticReward":
        kv = _parse_kv(arg, ("path", "clip", "head"))
        return cls(path=kv.get("path"), clip_path=kv.get("clip"), head_path=kv.get("head"))

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        dev, dtype = _placement(self.clip)
        e = _image_features(self.clip, preprocess(x.to(dev), self.size, self.mean, self.std).to(dtype))
        e = e / e.norm(dim=-1, keepdim=True)
        head_dtype = self.head.linears[0].weight.dtype
        return _score(self.head(e.to(head_dtype)).squeeze(-1), x)


class _CLIPSimilarityReward(Reward):
    """r(x, c) = s · cos(E_img(x), E_txt(c)) with a transformers CLIPModel loaded from a local
    folder (plus its tokenizer); subclasses choose the scale s (:meth:`scale`). Images go through
    :func:`preprocess` at the model's input size, normalised with the folder's
    ``preprocessor_config.json`` (OpenAI CLIP's mean/std without one); prompts come from the
    conditioning (:func:`prompts_of`), tokenized to at most 77 tokens."""

    NAME = "clip"
    WEIGHTS = "a transformers CLIPModel folder plus its CLIP tokenizer files"

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        name = self.NAME
        _require("transformers", "transformers", name, self.WEIGHTS)
        from transformers import AutoTokenizer, CLIPModel

        root = _require_path(path, name, self.WEIGHTS)
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        try:
            self.clip = CLIPModel.from_pretrained(str(root), local_files_only=True).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise SoctuneError(f"reward '{name}': cannot load '{root}' ({one_line_reason(exc)}); it must hold "
                               f"{self.WEIGHTS}") from None
        self.size = int(self.clip.config.vision_config.image_size)
        self.mean, self.std = _clip_normalisation(root)
        self.max_length = min(77, int(self.clip.config.text_config.max_position_embeddings))

    @classmethod
    def from_arg(cls, arg: str | None) -> "_CLIPSimilarityReward":
        return cls(path=_parse_kv(arg, ("path",)).get("path"))

    def scale(self) -> Tensor | float:
        raise NotImplementedError

    def cosine(self, x: Tensor, cond: Any = None) -> Tensor:
        """cos(E_img(x), E_txt(c)) [B] in the scorer's dtype, on its device."""
        prompts = prompts_of(cond, x.shape[0], self.NAME)
        dev, dtype = _placement(self.clip)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        img = _image_features(self.clip, preprocess(x.to(dev), self.size, self.mean, self.std).to(dtype))
        txt = _text_features(self.clip, tok["input_ids"].to(dev), tok["attention_mask"].to(dev))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        return _score(self.scale() * self.cosine(x, cond), x)


@register_reward("pickscore",
                 "PickScore (CLIP-H fine-tuned on Pick-a-Pic) from a local folder; needs prompts; arg: PATH")
class PickScoreReward(_CLIPSimilarityReward):
    """r(x, c) = s · cos(E_img(x), E_txt(c)), s = exp(logit_scale) (PickScore_v1, ≈ 100·cosine).

    Args:
        path: a transformers CLIPModel folder (yuvalkirstain/PickScore_v1) that also holds the
            tokenizer files (from laion/CLIP-ViT-H-14-laion2B-s32B-b79K), or a ``tokenizer/``
            sub-folder with them.
    """

    NAME = "pickscore"
    WEIGHTS = "a transformers CLIPModel folder of yuvalkirstain/PickScore_v1 plus its CLIP tokenizer files"

    def scale(self) -> Tensor:
        return self.clip.logit_scale.exp()


@register_reward("clipscore",
                 "CLIP score 100·cos(image, prompt) from a local transformers CLIP folder; needs prompts; arg: PATH")
class CLIPScoreReward(_CLIPSimilarityReward):
    """r(x, c) = 100 · cos(E_img(x), E_txt(c)): the CLIP score of Hessel et al. (2021) with the
    scale torchmetrics uses (w = 100 instead of the paper's 2.5, the usual "CLIP score ≈ 30"
    numbers) and without the paper's clamp at 0, so the reward stays differentiable with a
    non-zero gradient everywhere (clamp it yourself to compare with reported scores of
    unrelated pairs). No ``maximum`` is declared: 100 bounds it but is far from reachable
    (matching pairs score ≈ 20–35), so rejection sampling of the tilt would accept nothing.

    Args:
        path: a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14) with its
            tokenizer files, or a ``tokenizer/`` sub-folder with them; its
            ``preprocessor_config.json`` (if present) sets the image mean/std.
    """

    NAME = "clipscore"
    WEIGHTS = "a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14) plus its CLIP tokenizer files"
    SCALE = 100.0

    def scale(self) -> float:
        return self.SCALE


@register_reward("hpsv2",
                 "Human Preference Score v2 (open_clip ViT-H-14) from a local checkpoint; needs prompts; arg: PATH")
class HPSv2Reward(Reward):
    """r(x, c) = cos(E_img(x), E_txt(c)) with the HPS v2(.1) fine-tuned open_clip ViT-H-14.

    Args:
        path: ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` (a file or a folder with it).
    """

    WEIGHTS = "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt"

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        try:
            oc = importlib.import_module("hpsv2.src.open_clip")
        except ImportError:
            oc = _require("open_clip", "hpsv2", "hpsv2", self.WEIGHTS)
        p = _require_path(path, "hpsv2", self.WEIGHTS)
        if p.is_dir():
            cands = sorted(p.glob("HPS_v2*.pt"))
            if not cands:
                raise SoctuneError(f"reward 'hpsv2': no HPS_v2*.pt in '{p}'; put {self.WEIGHTS} there")
            p = cands[0]
        try:
            model = oc.create_model("ViT-H-14", pretrained=None, precision="fp32")
            state = torch.load(str(p), map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
            self.tokenizer = oc.get_tokenizer("ViT-H-14")
        except Exception as exc:  # noqa: BLE001
            raise SoctuneError(f"reward 'hpsv2': cannot load '{p}' ({one_line_reason(exc)})") from None
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_arg(cls, arg: str | None) -> "HPSv2Reward":
        return cls(path=_parse_kv(arg, ("path",)).get("path"))

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        prompts = prompts_of(cond, x.shape[0], "hpsv2")
        dev, dtype = _placement(self.model)
        img = self.model.encode_image(preprocess(x.to(dev), 224).to(dtype), normalize=True)
        txt = self.model.encode_text(self.tokenizer(prompts).to(dev), normalize=True)
        return _score((img * txt).sum(-1), x)


@register_reward("imagereward", "ImageReward (BLIP + MLP) from a local folder; needs prompts; arg: PATH")
class ImageRewardReward(Reward):
    """r(x, c) = (MLP(BLIP(x, c)[CLS]) − μ) / σ, ImageReward's standardised score, computed
    differentiably from the BLIP image/text encoders (as DRaFT/AlignProp do).

    Args:
        path: a folder with ``ImageReward.pt`` and ``med_config.json`` (BLIP's tokenizer,
            bert-base-uncased, must be in the local Hugging Face cache).
    """

    WEIGHTS = "a folder with ImageReward.pt and med_config.json (and bert-base-uncased in the HF cache)"

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        rm = _require("ImageReward", "image-reward", "imagereward", self.WEIGHTS)
        root = _require_path(path, "imagereward", self.WEIGHTS)
        ckpt, med = root / "ImageReward.pt", root / "med_config.json"
        if not ckpt.is_file() or not med.is_file():
            raise SoctuneError(f"reward 'imagereward': '{root}' must hold ImageReward.pt and med_config.json")
        try:
            self.model = rm.load(str(ckpt), device="cpu", med_config=str(med)).eval().requires_grad_(False)
        except Exception as exc:  # noqa: BLE001
            raise SoctuneError(f"reward 'imagereward': cannot load '{root}' ({one_line_reason(exc)}); BLIP also needs the "
                               "bert-base-uncased tokenizer in the local Hugging Face cache") from None

    @classmethod
    def from_arg(cls, arg: str | None) -> "ImageRewardReward":
        return cls(path=_parse_kv(arg, ("path",)).get("path"))

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        prompts = prompts_of(cond, x.shape[0], "imagereward")
        m = self.model
        dev, dtype = _placement(m)
        tok = m.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image_embeds = m.blip.visual_encoder(preprocess(x.to(dev), 224).to(dtype))
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=dev)
        out = m.blip.text_encoder(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev),
                                  encoder_hidden_states=image_embeds, encoder_attention_mask=atts, return_dict=True)
        score = m.mlp(out.last_hidden_state[:, 0, :]).squeeze(-1)
        return _score((score - m.mean) / m.std, x)


__all__ = ["AestheticReward", "CLIPScoreReward", "CLIP_MEAN", "CLIP_STD", "HPSv2Reward", "ImageRewardReward",
           "LinearStack", "PickScoreReward", "preprocess", "prompts_of"]
