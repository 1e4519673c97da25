"""Pretrained diffusers models (UNets, SD3/Flux transformers) as soctune denoisers.

:func:`load_model` reads a diffusers checkpoint from a local folder or the local Hugging Face
cache (there is no download: a hub id that is not cached fails with a one-line error) and
returns a :class:`LoadedModel`: the :class:`DiffusersDenoiser` (network + LoRA adapter), its
scheduler config, and for latent text-to-image models the VAE and text encoders.

Time mapping (generation time t ∈ [0, 1], t = 0 noise, t = 1 data) — done here, once:

* VP diffusion models (DDPM/DDIM/Euler/DPM schedulers with ᾱ): diffusers timestep
  τ = N(1 − t) − 1 (N = ``num_train_timesteps``), snapped to the nearest integer when within
  float rounding of it; the output is ε / v / x̂₁ (the data estimate) per the config's ``prediction_type``.
* Flow-matching models (``FlowMatch*`` schedulers): σ = 1 − t, timestep = N·σ (Flux: σ), the
  network predicts dx/dσ = ε − x₁, so the generation-time velocity is −output.

Conditioning (``cond``) is what the network takes besides (x, t): a dict of tensors with a
leading batch dimension (``encoder_hidden_states``, ``pooled_projections``,
``added_cond_kwargs``, ``class_labels``), a float tensor [B, L, D] (text embeddings) or an
integer tensor [B] (class labels). ``cond=None`` means the model's null conditioning (the
empty prompt), i.e. unconditional sampling.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from ..io import one_line_reason
from ..registry import SoctuneError
from . import lora as _lora
from .base import ClassifierFreeGuidance, Denoiser, _expand_cond, index_batch

#: shipped tiny models, usable as ``load_model("digits-ddpm")``
ALIASES = {"digits-ddpm": "ddpm", "digits-flow": "flow"}


class TextCond(dict):
    """Encoded prompts: a dict of tensors for the network plus the prompt strings in
    ``.prompts`` (text–image rewards read them; the network never sees them)."""

    def __init__(self, tensors: dict[str, Any], prompts: Sequence[str] | None = None) -> None:
        super().__init__(tensors)
        self.prompts = list(prompts) if prompts is not None else None


def _map_tensors(c: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(c, TextCond):
        return TextCond({k: _map_tensors(v, fn) for k, v in c.items()}, c.prompts)
    if isinstance(c, dict):
        return {k: _map_tensors(v, fn) for k, v in c.items()}
    if isinstance(c, Tensor):
        return fn(c)
    return c


# ------------------------------------------------------------------------------ denoiser


class DiffusersDenoiser(Denoiser):
    """A diffusers network as a :class:`~soctune.models.base.Denoiser`:
    ``forward(x [B,C,H,W], t [B], cond) -> prediction [B,C,H,W]`` (float32 out).

    Args:
        network: UNet2DModel, UNet2DConditionModel, SD3Transformer2DModel,
            FluxTransformer2DModel (or another network taking (sample, timestep, **cond)).
        scheduler_config: the pretrained scheduler's config (its class decides VP vs flow).
        null_cond: conditioning used when ``cond`` is None (the empty prompt's embedding).
        flux_guidance: embedded guidance value of guidance-distilled Flux models.
    """

    def __init__(self, network: nn.Module, scheduler_config: dict[str, Any], *, null_cond: Any = None,
                 flux_guidance: float | None = None, pipeline_class: str | None = None) -> None:
        super().__init__()
        self.network = network
        self.scheduler_config = dict(scheduler_config)
        self.kind, self.prediction_type = scheduler_kind(self.scheduler_config)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.null_cond = null_cond
        self.flux_guidance = flux_guidance
        self.pipeline_class = pipeline_class
        self.base_network: nn.Module | None = None  # frozen copy, full fine-tuning only
        self._is_flux = type(network).__name__.startswith("Flux")
        self._is_transformer = type(network).__name__.endswith("Transformer2DModel")

    # ---- adaptation ------------------------------------------------------------------------
    def enable_full_finetune(self) -> None:
        """All network weights trainable; the base becomes a frozen copy (≈ 2× weight memory,
        plus the optimiser's moments for every weight)."""
        self.base_network = _lora.full_finetune_copy(self.network)

    @contextmanager
    def base(self) -> Iterator[None]:
        if self.base_network is not None:
            trained, self.network = self.network, self.base_network
            try:
                yield
            finally:
                self.network = trained
        else:
            with _lora.adapters_disabled(self.network):
                yield

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    # ---- time ------------------------------------------------------------------------------
    def timestep(self, t: Tensor) -> Tensor:
        """Diffusers timestep [B] (float32) of generation times t [B].

        VP: τ = N(1 − t) − 1; flow: N(1 − t) (Flux: 1 − t). Values within float rounding of
        an integer are snapped to it, so grid times hit the trained integer timesteps."""
        N = self.num_train_timesteps
        tt = t.to(torch.float64)
        if self.kind == "flow":
            if self._is_flux:
                return (1 - tt).to(torch.float32)
            tau = N * (1 - tt)
        else:
            tau = N * (1 - tt) - 1
        tol = max(1e-6, 4 * N * torch.finfo(t.dtype).eps) if t.is_floating_point() else 1e-6
        near = torch.round(tau)
        tau = torch.where((tau - near).abs() <= tol, near, tau)
        return tau.to(torch.float32)

    # ---- forward ---------------------------------------------------------------------------
    def _cond_kwargs(self, cond: Any, b: int) -> dict[str, Any]:
        if cond is None:
            cond = self.null_cond
        if cond is None:
            if type(self.network).__name__ == "UNet2DConditionModel" or self._is_transformer:
                raise SoctuneError(
                    f"{type(self.network).__name__} needs conditioning; pass cond (e.g. LoadedModel.encode_prompts"
                    "([...])) or load a pipeline folder with its text encoder")
            return {}
        if isinstance(cond, Tensor):
            if not cond.is_floating_point():
                return {"class_labels": cond if cond.ndim else cond.expand(b)}
            if cond.ndim == 3:
                return {"encoder_hidden_states": _expand_cond(cond, b)}
            raise SoctuneError(f"cannot interpret a float cond of shape {tuple(cond.shape)}; pass a dict like "
                               "{'encoder_hidden_states': [B, L, D]}")
        if isinstance(cond, dict):
            dtype = self.dtype

            def cast(v: Tensor) -> Tensor:
                return v.to(dtype) if v.is_floating_point() else v

            return _map_tensors(_expand_cond(dict(cond), b), cast)
        raise SoctuneError(f"unsupported cond type {type(cond).__name__}; pass a tensor or a dict of tensors")

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen weights (inputs are cast to it; trainable LoRA weights are float32
        whatever the frozen ones are)."""
        first = None
        for p in self.network.parameters():
            if not p.requires_grad:
                return p.dtype
            if first is None:
                first = p
        return first.dtype if first is not None else torch.float32

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        b = x.shape[0]
        kwargs = self._cond_kwargs(cond, b)
        ts = self.timestep(t).to(x.device)
        h = x.to(self.dtype)
        if self._is_flux:
            out = self._flux_forward(h, ts, kwargs)
        elif self._is_transformer:
            out = self.network(hidden_states=h, timestep=ts, return_dict=False, **kwargs)[0]
        else:
            out = self.network(h, ts, return_dict=False, **kwargs)[0]
        out = self._prediction_channels(out, x.shape[1]).to(x.dtype)
        return -out if self.kind == "flow" else out

    def _prediction_channels(self, out: Tensor, c: int) -> Tensor:
        """The prediction's C channels of a network output [B, C', ...]: C' = C, or C' = 2C when the
        scheduler config declares a learned variance (``variance_type`` learned / learned_range,
        output [prediction, variance] as diffusers' schedulers split it). Any other C' is a
        one-line error — cutting channels without the config saying so would silently use a
        wrong prediction."""
        if out.shape[1] == c:
            return out
        variance = self.scheduler_config.get("variance_type")
        if out.shape[1] == 2 * c and variance in ("learned", "learned_range"):
            return out[:, :c]
        raise SoctuneError(
            f"the network outputs {out.shape[1]} channels for a {c}-channel input, but the scheduler config's "
            f"variance_type is {variance!r}; only variance_type 'learned'/'learned_range' explains {2 * c} "
            f"(prediction + variance): fix the scheduler config or use a network with out_channels={c}")

    def _flux_forward(self, h: Tensor, sigma: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """Flux works on 2×2-patch token sequences: pack [B,C,H,W] -> [B,(H/2)(W/2),4C]."""
        B, C, H, W = h.shape
        packed = rearrange(h, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)
        ii, jj = torch.meshgrid(torch.arange(H // 2), torch.arange(W // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(ii), ii, jj], -1).reshape(-1, 3).to(h.device, h.dtype)
        ehs = kwargs.pop("encoder_hidden_states")
        txt_ids = torch.zeros(ehs.shape[1], 3, device=h.device, dtype=h.dtype)
        guidance = None
        if getattr(self.network.config, "guidance_embeds", False):
            g = 3.5 if self.flux_guidance is None else self.flux_guidance
            guidance = torch.full((B,), float(g), device=h.device, dtype=torch.float32)
        out = self.network(hidden_states=packed, timestep=sigma.to(h.dtype), guidance=guidance,
                           encoder_hidden_states=ehs, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
                           **kwargs)[0]
        return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=H // 2, w=W // 2, p=2, q=2)

    # ---- process compatibility ---------------------------------------------------------
    def check_process(self, process: Any) -> None:
        """Raise a one-line :class:`SoctuneError` if ``process`` samples a different noise path
        than the one the network was trained on (called by ``Process.check_model``)."""
        from ..sde.gaussian import DiscreteVPSchedule, FlowSchedule, scheduler_alphas_cumprod

        sched = getattr(process, "schedule", None)
        name = getattr(process, "registered_name", type(process).__name__)
        if sched is None:
            return
        if self.kind == "flow" and not isinstance(sched, FlowSchedule):
            raise SoctuneError(
                f"process '{name}' samples a VP diffusion path but this is a flow-matching model "
                f"({self.scheduler_config.get('_class_name', 'FlowMatch')}, velocity); use process 'fm-memoryless'")
        if self.kind == "vp":
            if isinstance(sched, FlowSchedule):
                raise SoctuneError(
                    f"process '{name}' samples a flow-matching path but this is a VP diffusion model predicting "
                    f"'{self.prediction_type}' on a DDPM schedule; use process 'ddpm' (or 'dpmpp-sde')")
            if isinstance(sched, DiscreteVPSchedule):
                mine = scheduler_alphas_cumprod(self.scheduler_config).to(torch.float64)
                theirs = sched.log_ab[1:].exp()
                if mine.shape != theirs.shape or float((mine - theirs).abs().max()) > 1e-6:
                    raise SoctuneError(
                        f"process '{name}' uses a different noise schedule than the model's scheduler; build it with "
                        "scheduler_config=<the model's> (LoadedModel.default_process does)")


class GuidedDiffusersDenoiser(ClassifierFreeGuidance):
    """Classifier-free guidance around a :class:`DiffusersDenoiser` (forwards process checks
    and the network, so LoRA helpers and ``Process.check_model`` see through it)."""

    @property
    def network(self) -> nn.Module:
        return self.model.network

    def check_process(self, process: Any) -> None:
        self.model.check_process(process)


def scheduler_kind(config: dict[str, Any]) -> tuple[str, str]:
    """(``"flow"``, ``"velocity"``) for FlowMatch schedulers, else (``"vp"``, prediction_type)."""
    cls = str(config.get("_class_name", ""))
    if "FlowMatch" in cls:
        return "flow", "velocity"
    pt = config.get("prediction_type", "epsilon") or "epsilon"
    if pt not in ("epsilon", "v_prediction", "sample"):
        raise SoctuneError(f"unsupported prediction_type '{pt}' in the scheduler config; expected epsilon, "
                           "v_prediction or sample")
    return "vp", pt


# ------------------------------------------------------------------------------- loaded model


@dataclass
class LoadedModel:
    """A pretrained diffusers model ready for soctune.

    ``model`` is what processes and solvers use (the :class:`DiffusersDenoiser`, wrapped in
    classifier-free guidance when ``guidance_scale`` ≠ 1 and the model is text-conditional);
    ``denoiser`` is the unguided one. ``sample_shape`` is the state shape (latent for latent
    models). Rewards on images go through :meth:`decode` (see :meth:`image_reward`).
    """

    model: Denoiser
    denoiser: DiffusersDenoiser
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, ...]
    source: str
    vae: nn.Module | None = None
    pipeline: Any = None
    pipeline_class: str | None = None
    guidance_scale: float = 1.0
    max_sequence_length: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    # ---- properties --------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        return self.denoiser.network

    @property
    def kind(self) -> str:
        """``"vp"`` (diffusion) or ``"flow"`` (flow matching)."""
        return self.denoiser.kind

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def null_cond(self) -> Any:
        return self.denoiser.null_cond

    @contextmanager
    def base(self) -> Iterator[None]:
        """The pretrained model (adapters off; full fine-tuning: the frozen copy)."""
        with self.denoiser.base():
            yield

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.denoiser.trainable_parameters()

    # ---- images ------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [−1, 1], float32, differentiable, from latents [B, *S]
        (x = VAE.decode(z / scaling_factor + shift_factor), clamped as the pipelines do).
        Pixel-space models return their samples unchanged (as float32)."""
        if self.vae is None:
            return latents.float()
        cfg = self.vae.config
        z = latents.float() / float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        if shift:
            z = z + float(shift)
        img = self.vae.decode(z.to(next(self.vae.parameters()).dtype), return_dict=False)[0].float()
        return img.clamp(-1, 1)

    def image_reward(self, reward: Callable[..., Tensor]) -> "DecodedReward":
        """r(decode(x), cond): a reward on images as a reward on the model's states, with the
        decoder inside the gradient."""
        return DecodedReward(reward, self.decode)

    # ---- text --------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> TextCond:
        """Text conditioning [B, …] for a list of B prompts (no gradient through the encoders)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        pipe = self.pipeline
        if pipe is None or getattr(pipe, "text_encoder", None) is None and not hasattr(pipe, "text_encoder_2"):
            raise SoctuneError(f"model '{self.source}' has no text encoder; pass cond tensors directly or load a "
                               "pipeline folder with text_encoder/ and tokenizer/")
        name = type(pipe).__name__
        prompts = list(prompts)
        dev = self._text_device()  # where the encoders are (the CPU once released)
        try:
            with torch.no_grad():
                if "StableDiffusion3" in name:
                    kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
                    pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=dev,
                                                          num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                          **kw)
                    out: dict[str, Any] = {"encoder_hidden_states": pe, "pooled_projections": pooled}
                elif name.startswith("Flux"):
                    kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
                    pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=dev,
                                                       num_images_per_prompt=1, **kw)
                    out = {"encoder_hidden_states": pe, "pooled_projections": pooled}
                elif "XL" in name:
                    pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=dev, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
                    out = {"encoder_hidden_states": pe,
                           "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self._sdxl_time_ids(len(prompts))}}
                elif hasattr(pipe, "encode_prompt"):
                    pe, _ = pipe.encode_prompt(prompts, dev, 1, False)
                    out = {"encoder_hidden_states": pe}
                else:
                    raise SoctuneError(f"prompt encoding for {name} is not supported; pass cond tensors directly")
        except SoctuneError:
            raise
        except Exception as exc:  # noqa: BLE001 — surface as one line
            raise SoctuneError(f"encoding prompts with {name} failed ({one_line_reason(exc)}); check the text encoder "
                               "and tokenizer folders") from None
        dtype, dev = self.denoiser.dtype, self.device
        return TextCond(_map_tensors(out, lambda v: v.to(dev, dtype) if v.is_floating_point() else v.to(dev)),
                        prompts)

    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders (empty for models without text)."""
        pipe = self.pipeline
        return [e for c in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if isinstance(e := getattr(pipe, c, None), nn.Module)] if pipe is not None else []

    def release_text_encoders(self) -> None:
        """Move the text encoders off the accelerator (to the CPU) once the prompt set's
        embeddings are cached (:meth:`cond_sampler`, the null conditioning): they are used once,
        and SD3's T5 alone holds ~9 GB in fp32. A later :meth:`encode_prompts` still works (on
        the CPU, results moved to the device)."""
        for enc in self.text_encoders():
            enc.to("cpu")

    def _text_device(self) -> torch.device:
        encs = self.text_encoders()
        return next(encs[0].parameters()).device if encs else self.device

    def _sdxl_time_ids(self, b: int) -> Tensor:
        h, w = self.sample_shape[1] * self._vae_scale(), self.sample_shape[2] * self._vae_scale()
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.denoiser.dtype, device=self.device)
        return ids.expand(b, -1)

    def _null_cond(self, negative_prompt: str = "") -> Any:
        """The unconditional branch of classifier-free guidance: the negative prompt's embedding
        (SDXL's zeros for the empty one, as its pipeline does)."""
        pipe = self.pipeline
        c = self.encode_prompts([negative_prompt])
        if negative_prompt:
            return c
        if "XL" in type(pipe).__name__ and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            # SDXL's negative is zeros (text and pooled), with the same size conditioning
            added = c["added_cond_kwargs"]
            return TextCond({"encoder_hidden_states": torch.zeros_like(c["encoder_hidden_states"]),
                             "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                                   "time_ids": added["time_ids"]}}, [""])
        return c

    def cond_sampler(self, prompts: Sequence[str]) -> Callable[[int, torch.Generator], TextCond]:
        """A ``cond_sampler(B, generator)`` for :class:`~soctune.trainer.Trainer` drawing B
        prompts uniformly from ``prompts`` (encoded once, here)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise SoctuneError("cond_sampler needs at least one prompt")
        encoded = self.encode_prompts(prompts)

        def sample(b: int, generator: torch.Generator) -> TextCond:
            idx = torch.randint(len(prompts), (b,), generator=generator, device=generator.device).cpu()
            return index_batch(encoded, idx, len(prompts))  # a TextCond: its prompt strings follow idx

        return sample

    # ---- processes ---------------------------------------------------------------------
    def default_process(self, name: str | None = None, num_steps: int = 50, **options: Any) -> Any:
        """The soctune process ``name`` (default ``ddpm`` for VP models, ``fm-memoryless`` for
        flow models) on the model's scheduler config; raises a one-line error when the process
        cannot use this model."""
        import inspect

        from ..sde.base import PROCESSES, _load_builtin

        _load_builtin()
        name = name or ("fm-memoryless" if self.kind == "flow" else "ddpm")
        cls = PROCESSES.get(name)
        params = inspect.signature(cls.__init__).parameters if isinstance(cls, type) else {}
        opts: dict[str, Any] = dict(options)
        if "scheduler_config" in params:
            # a dict given here overrides single keys of the model's config (e.g. timestep_spacing)
            given = opts.get("scheduler_config")
            opts["scheduler_config"] = {**self.scheduler_config, **given} if isinstance(given, dict) else (
                given if given is not None else self.scheduler_config)
        if "mu" in params and self.scheduler_config.get("use_dynamic_shifting") and "mu" not in opts:
            opts["mu"] = self.flux_mu()
        accepts = getattr(cls, "accepts", None)
        if isinstance(accepts, tuple) and self.prediction_type not in accepts:  # before a config gets misread
            raise SoctuneError(
                f"process '{name}' cannot use prediction type '{self.prediction_type}' of this {self.kind.upper()} "
                f"model; it accepts {', '.join(accepts)} — use process "
                f"'{'fm-memoryless' if self.kind == 'flow' else 'ddpm'}'")
        try:
            proc = PROCESSES.build(name, num_steps=num_steps, **opts)
        except SoctuneError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SoctuneError(f"cannot build process '{name}' for this model ({one_line_reason(exc)}); "
                               "check the process options") from None
        proc.check_model(self.model)
        self.denoiser.check_process(proc)
        return proc.to(self.device)

    def flux_mu(self) -> float:
        """The resolution-dependent timestep shift μ of dynamic-shifting configs (Flux)."""
        cfg = self.scheduler_config
        seq = (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        return float(seq * m + base_shift - m * base_len)

    def _vae_scale(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ---- LoRA ----------------------------------------------------------------------------
    def save_lora(self, folder: str | Path, adapter_name: str = _lora.TRAIN_ADAPTER) -> Path:
        """See :func:`soctune.models.lora.save_lora`."""
        return _lora.save_lora(self, folder, adapter_name=adapter_name, pipeline_class=self.pipeline_class)

    def load_lora(self, folder: str | Path, scale: float = 1.0, adapter_name: str | None = None,
                  trainable: bool = False) -> str:
        """See :func:`soctune.models.lora.load_lora`."""
        return _lora.load_lora(self, folder, scale=scale, adapter_name=adapter_name, trainable=trainable)

    def set_adapter_weights(self, weights: dict[str, float]) -> None:
        """See :func:`soctune.models.lora.set_adapter_weights`."""
        _lora.set_adapter_weights(self, weights)


class DecodedReward(nn.Module):
    """r(decode(x), cond) -> [B]: an image reward applied to decoded latents (float32)."""

    def __init__(self, reward: Callable[..., Tensor], decode: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.reward = reward
        self.decode = decode
        self.maximum = getattr(reward, "maximum", None)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        return self.reward(self.decode(x), cond)


# --------------------------------------------------------------------------------- loading

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path_or_hub_id: str | Path) -> Path:
    """A local folder for ``path_or_hub_id``: an existing path, a shipped alias
    (``digits-ddpm``, ``digits-flow``) or a hub id already in the local Hugging Face cache."""
    spec = str(path_or_hub_id)
    if spec in ALIASES:
        from ..examples.digits import shipped_model_path

        try:
            return shipped_model_path(ALIASES[spec])
        except FileNotFoundError as exc:
            raise SoctuneError(str(exc)) from None
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # noqa: BLE001 — any miss means "not cached"
            raise SoctuneError(
                f"model '{spec}' is not a local folder and not in the local Hugging Face cache (this machine cannot "
                f"download); download it elsewhere (huggingface-cli download {spec}) and pass its local path") from None
    raise SoctuneError(
        f"model path '{spec}' does not exist; pass a diffusers folder (model_index.json, or unet/ or "
        "transformer/ plus scheduler/), a cached hub id, or digits-ddpm / digits-flow")


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); use what it takes."""
    try:
        from diffusers.utils import deprecation_utils

        new = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:
        new = False
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def _load_component(folder: Path, dtype: torch.dtype) -> nn.Module:
    import diffusers

    cfg = json.loads((folder / "config.json").read_text())
    cls = getattr(diffusers, str(cfg.get("_class_name", "")), None)
    if cls is None:
        raise SoctuneError(f"unknown diffusers model class '{cfg.get('_class_name')}' in {folder / 'config.json'}; "
                           "upgrade diffusers or check the folder")
    return cls.from_pretrained(str(folder), **_dtype_kwarg(dtype))


def load_model(path_or_hub_id: str | Path, *, lora_rank: int = 8, lora_alpha: float | None = None,
               target_modules: Sequence[str] | None = None, full_finetune: bool = False,
               guidance_scale: float = 1.0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               resolution: int | None = None, max_sequence_length: int | None = None,
               gradient_checkpointing: bool = False, vae_tiling: bool = False,
               negative_prompt: str | None = None) -> LoadedModel:
    """Load a diffusers model as a soctune :class:`LoadedModel` with a trainable LoRA adapter.

    Args:
        path_or_hub_id: a pipeline folder (``model_index.json``), a plain folder with ``unet/``
            or ``transformer/`` plus ``scheduler/`` (optionally ``vae/``), a hub id in the local
            cache, or ``digits-ddpm`` / ``digits-flow``.
        lora_rank, lora_alpha, target_modules: the adapter (see :func:`soctune.models.lora.add_lora`);
            ``lora_rank=0`` adds none (sampling only).
        full_finetune: train every network weight instead (keeps a frozen copy as the base).
        guidance_scale: classifier-free guidance w for text models (1 = off); Flux's
            embedded guidance for guidance-distilled Flux models.
        dtype: network dtype (VAE is kept in float32 so decoded images and reward gradients are).
        resolution: image side in pixels (default the network's sample size).
        max_sequence_length: text length for SD3/Flux prompt encoding (default the pipeline's).
        gradient_checkpointing: recompute the network's blocks (and the VAE decoder's, inside
            the reward's gradient) in backward (diffusers' ``enable_gradient_checkpointing``) in
            every forward that keeps a graph — DRaFT's last steps, Adjoint Matching's loss steps
            and lean-adjoint VJPs, ∇-DB's transitions: less activation memory for about one more
            forward per backward (benchmarks/RESULTS.md, "Scale").
        vae_tiling: decode large images in overlapping tiles (the VAE always decodes in
            per-sample slices; tiling blends tile borders, so it is off unless asked for).
        negative_prompt: the prompt whose embedding is the unconditional branch of
            classifier-free guidance (default the empty prompt).
    """
    folder = resolve_model_path(path_or_hub_id)
    with _quiet_loading():
        network, scheduler_config, vae, pipe, pipeline_class = _load_parts(folder, dtype)
    return from_parts(network, scheduler_config, vae=vae, pipeline=pipe, pipeline_class=pipeline_class,
                      source=str(path_or_hub_id), device=device, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      target_modules=target_modules, full_finetune=full_finetune, guidance_scale=guidance_scale,
                      resolution=resolution, max_sequence_length=max_sequence_length,
                      gradient_checkpointing=gradient_checkpointing, vae_tiling=vae_tiling,
                      negative_prompt=negative_prompt)


def from_parts(network: nn.Module, scheduler_config: dict[str, Any], *, vae: nn.Module | None = None,
               pipeline: Any = None, pipeline_class: str | None = None, source: str = "in-memory",
               device: str | torch.device = "cpu", lora_rank: int = 8, lora_alpha: float | None = None,
               target_modules: Sequence[str] | None = None, full_finetune: bool = False, guidance_scale: float = 1.0,
               resolution: int | None = None, max_sequence_length: int | None = None,
               gradient_checkpointing: bool = False, vae_tiling: bool = False,
               negative_prompt: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` from networks already built in Python (e.g. from a published config
    with random weights, as benchmarks/scale.py does); :func:`load_model` ends here too. The
    arguments are :func:`load_model`'s; ``scheduler_config`` needs its ``_class_name``."""
    if gradient_checkpointing:
        if not getattr(network, "_supports_gradient_checkpointing", False):
            raise SoctuneError(f"{type(network).__name__} does not support gradient checkpointing; set "
                               "model.gradient_checkpointing=false")
        network.enable_gradient_checkpointing(_lora.checkpointing_function(network))
        if vae is not None and getattr(vae, "_supports_gradient_checkpointing", False):
            # the decode inside the reward's gradient: its full-resolution activations are the
            # largest tensors of an iteration at 256 px and up (benchmarks/scale.py)
            vae.enable_gradient_checkpointing()
    if vae is not None and hasattr(vae, "use_slicing"):
        vae.use_slicing = True  # per-sample decode inside the reward: activation memory of one image
    if vae is not None and vae_tiling:
        if not hasattr(vae, "use_tiling"):
            raise SoctuneError(f"{type(vae).__name__} cannot decode in tiles; set model.vae_tiling=false")
        vae.use_tiling = True
    return _assemble(source, network, scheduler_config, vae, pipeline, pipeline_class, torch.device(device),
                     lora_rank=lora_rank, lora_alpha=lora_alpha, target_modules=target_modules,
                     full_finetune=full_finetune, guidance_scale=guidance_scale, resolution=resolution,
                     max_sequence_length=max_sequence_length, negative_prompt=negative_prompt)


def _load_parts(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any], Any, Any, str | None]:
    """(network, scheduler config, vae, pipeline, pipeline class name) from a local folder."""
    import diffusers

    pipe = None
    pipeline_class = None
    vae = None
    try:
        if (folder / "model_index.json").is_file():
            index = json.loads((folder / "model_index.json").read_text())
            pipeline_class = index.get("_class_name")
            absent = {k: None for k, v in index.items()
                      if not k.startswith("_") and isinstance(v, list) and v[0] is None}
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                                               **_dtype_kwarg(dtype), **absent)
            network = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
            if network is None:
                raise SoctuneError(f"pipeline {pipeline_class} at '{folder}' has no unet or transformer")
            scheduler_config = dict(pipe.scheduler.config)
            scheduler_config["_class_name"] = type(pipe.scheduler).__name__
            vae = getattr(pipe, "vae", None)
        else:
            sub = next((folder / s for s in ("unet", "transformer") if (folder / s / "config.json").is_file()), None)
            sched_file = folder / "scheduler" / "scheduler_config.json"
            if sub is None or not sched_file.is_file():
                raise SoctuneError(f"'{folder}' is not a diffusers model folder; expected model_index.json, or unet/ "
                                   "or transformer/ plus scheduler/scheduler_config.json")
            network = _load_component(sub, dtype)
            scheduler_config = json.loads(sched_file.read_text())
            if (folder / "vae" / "config.json").is_file():
                vae = _load_component(folder / "vae", torch.float32)
    except SoctuneError:
        raise
    except Exception as exc:  # noqa: BLE001 — corrupt/incomplete checkpoints: one line
        raise SoctuneError(f"cannot load diffusers model from '{folder}' ({one_line_reason(exc)}); check the folder is a "
                           "complete diffusers checkpoint") from None
    return network, scheduler_config, vae, pipe, pipeline_class


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """The library never prints: silence diffusers'/transformers' loading progress bars."""
    import diffusers.utils.logging as dlog

    try:
        import transformers.utils.logging as tlog
    except ImportError:  # pragma: no cover - transformers is optional
        tlog = None
    d_on = dlog.is_progress_bar_enabled()
    t_on = tlog.is_progress_bar_enabled() if tlog is not None else False
    dlog.disable_progress_bar()
    if tlog is not None:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on and tlog is not None:
            tlog.enable_progress_bar()


def _assemble(source: Any, network: nn.Module, scheduler_config: dict[str, Any], vae: Any, pipe: Any,
              pipeline_class: str | None, dev: torch.device, *, lora_rank: int, lora_alpha: float | None,
              target_modules: Sequence[str] | None, full_finetune: bool, guidance_scale: float,
              resolution: int | None, max_sequence_length: int | None,
              negative_prompt: str | None = None) -> LoadedModel:
    """Freeze and place the parts, add the adapter (or full fine-tuning), wire text + CFG."""
    network.requires_grad_(False).to(dev)
    if vae is not None:
        vae = vae.to(dev).requires_grad_(False).eval()
        if next(vae.parameters()).dtype != torch.float32:
            vae = vae.float()
    if pipe is not None:
        for comp in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(pipe, comp, None)
            if isinstance(enc, nn.Module):
                enc.requires_grad_(False).to(dev).eval()

    denoiser = DiffusersDenoiser(network, scheduler_config, pipeline_class=pipeline_class)
    if full_finetune:
        denoiser.enable_full_finetune()
    elif lora_rank:
        _lora.add_lora(network, rank=lora_rank, alpha=lora_alpha, target_modules=target_modules)

    sample_shape = _sample_shape(network, vae, resolution)
    loaded = LoadedModel(model=denoiser, denoiser=denoiser, scheduler_config=scheduler_config,
                         sample_shape=sample_shape, source=str(source), vae=vae, pipeline=pipe,
                         pipeline_class=pipeline_class, guidance_scale=float(guidance_scale),
                         max_sequence_length=max_sequence_length, device=dev)
    has_text = pipe is not None and any(isinstance(getattr(pipe, c, None), nn.Module)
                                        for c in ("text_encoder", "text_encoder_2"))
    if denoiser._is_flux and getattr(network.config, "guidance_embeds", False):
        denoiser.flux_guidance = float(guidance_scale) if guidance_scale != 1.0 else None
        has_text_cfg = False
    else:
        has_text_cfg = has_text
    if has_text:
        try:
            denoiser.null_cond = loaded._null_cond(negative_prompt or "")
        except SoctuneError:
            # a pipeline whose prompt encoding soctune does not know: the model still loads, and
            # callers pass conditioning tensors themselves (no automatic CFG then)
            loaded.pipeline = None
            has_text = has_text_cfg = False
    if has_text_cfg and guidance_scale != 1.0:
        loaded.model = GuidedDiffusersDenoiser(denoiser, guidance_scale, denoiser.null_cond)
    return loaded


def _sample_shape(network: nn.Module, vae: nn.Module | None, resolution: int | None) -> tuple[int, ...]:
    cfg = network.config
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if resolution is not None:
        side: int | tuple[int, int] = int(resolution) // scale
    else:
        side = getattr(cfg, "sample_size", None) or (1024 // scale)
    h, w = (side, side) if isinstance(side, int) else tuple(side)
    if vae is not None:
        channels = int(vae.config.latent_channels)
    else:
        channels = int(getattr(cfg, "in_channels", 3))
    return (channels, int(h), int(w))


__all__ = ["ALIASES", "DecodedReward", "DiffusersDenoiser", "GuidedDiffusersDenoiser", "LoadedModel", "TextCond",
           "from_parts", "load_model", "resolve_model_path", "scheduler_kind"]
