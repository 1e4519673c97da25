"""Real diffusers models through soctune: tiny randomly initialised SD / SD3 / pixel-UNet / Flux
networks that the tests build and save locally (no download, no mocks of diffusers or peft).

What is checked:
* load_model + our processes reproduce the diffusers pipelines: our ``ddpm`` rollout with CFG
  and prompts equals StableDiffusionPipeline(DDPMScheduler) and our deterministic
  ``fm-memoryless`` rollout equals StableDiffusion3Pipeline(FlowMatchEuler) for the same seed
  (measured max |Δ| ≤ 8e-7 on [0, 1] images; tolerance 1e-5) — this pins the time mapping,
  the prediction conversions, CFG and the VAE decoding at once;
* LoRA: a saved LoRA loads into StableDiffusionPipeline.load_lora_weights and reproduces our
  network; weight 0 restores the pipeline's base output exactly; ``with model.base():`` equals
  the network before adapters were added, exactly; mixing/scaling of several LoRAs;
* bad input gives one-line SoctuneErrors naming the fix;
* two iterations of adjoint-matching, nabla-db and draft through Trainer on the tiny SD model
  with prompts and CFG, reward on decoded images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from soctune.models import lora  # noqa: E402
from soctune.models.diffusers_model import DiffusersDenoiser, LoadedModel, load_model  # noqa: E402
from soctune.registry import SoctuneError  # noqa: E402
from soctune.rewards import get_reward  # noqa: E402
from soctune.trajectory import rollout  # noqa: E402

from helpers import write_clip_tokenizer  # noqa: E402

PROMPTS = ["a cat", "red dog", "tree"]  # ≤ 6 characters + 2 specials: fit the 8-token encoders
RES = 16  # pixels; tiny VAEs downsample by 2 -> 8×8 latents


# ------------------------------------------------------------------------------- builders


def clip_text_config(vocab_size: int, hidden: int = 16, projection: int | None = None):
    from transformers import CLIPTextConfig

    kw = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **kw)


def tiny_vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=RES, **kw)


def build_sd(folder: Path) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = write_clip_tokenizer(folder.parent / "tok_sd")
    unet = UNet2DConditionModel(sample_size=RES // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(clip_text_config(len(tok))),
                                   tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_sd3(folder: Path) -> Path:
    """SD3 pipeline with its two CLIP encoders; the T5 encoder is left out (text_encoder_3=None,
    which SD3 pipelines support: its tokens become zeros) — a sentencepiece T5 tokenizer
    cannot be written from scratch here."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(1)
    tok = write_clip_tokenizer(folder.parent / "tok_sd3")
    transformer = SD3Transformer2DModel(sample_size=RES // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    encoders = [CLIPTextModelWithProjection(clip_text_config(len(tok), projection=16)) for _ in range(2)]
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
                                    text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1],
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder


def build_pixel(folder: Path) -> Path:
    """A DDPMPipeline with a small attention-free UNet2DModel (the shipped digits layout)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(2)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
                       norm_num_groups=8, add_attention=False)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
                 ).save_pretrained(folder)
    return folder


def build_sdxl(folder: Path) -> Path:
    """SDXL: two CLIP encoders (penultimate states concatenated, pooled projection) and the
    UNet's text_time added conditioning."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(4)
    tok = write_clip_tokenizer(folder.parent / "tok_xl")
    unet = UNet2DConditionModel(sample_size=RES // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          steps_offset=1)
    StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(clip_text_config(len(tok))),
                              text_encoder_2=CLIPTextModelWithProjection(clip_text_config(len(tok), projection=16)),
                              tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return build_sd3(tmp_path_factory.mktemp("models") / "sd3")


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory) -> Path:
    return build_pixel(tmp_path_factory.mktemp("models") / "pixel")


def randomize_lora(model, std: float = 0.05, seed: int = 0) -> None:
    """Give the (zero-initialised) adapter visible random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def assert_one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


# ------------------------------------------------------------------- matches the pipelines


def test_sd_ddpm_rollout_with_cfg_equals_diffusers_pipeline(sd_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    m = load_model(sd_dir, lora_rank=4, guidance_scale=3.0)
    assert (m.kind, m.prediction_type, m.sample_shape, m.is_latent) == ("vp", "epsilon", (4, 8, 8), True)
    proc = m.default_process("ddpm", num_steps=4)
    cond = m.encode_prompts(PROMPTS)
    assert cond.prompts == PROMPTS and cond["encoder_hidden_states"].shape == (3, 8, 16)
    traj = rollout(proc, m.model, batch_size=3, sample_shape=m.sample_shape, cond=cond,
                   generator=torch.Generator().manual_seed(0))
    ours = (m.decode(traj.x_final) / 2 + 0.5).clamp(0, 1)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=4, height=RES, width=RES, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    # measured 4.8e-7 (float32 round-off); the ε-model, CFG, DDPM posterior and VAE must all agree
    assert (ours - ref).abs().max().item() < 1e-5

    # reward on decoded images, with the decoder inside the gradient
    reward = m.image_reward(get_reward("compressibility"))
    x = traj.x_final.detach().requires_grad_(True)
    r = reward(x, cond)
    assert r.shape == (3,) and torch.isfinite(r).all()
    (g,) = torch.autograd.grad(r.sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_sd3_flow_rollout_equals_diffusers_pipeline(sd3_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    m = load_model(sd3_dir, lora_rank=4, guidance_scale=2.0, max_sequence_length=8)
    assert (m.kind, m.prediction_type) == ("flow", "velocity")
    cond = m.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    # σ = 0: the flow path's DDIM kernel is exactly the Euler step of FlowMatchEulerDiscreteScheduler
    proc = m.default_process("fm-memoryless", num_steps=4, noise_scale=0.0)
    traj = rollout(proc, m.model, batch_size=3, sample_shape=m.sample_shape, cond=cond,
                   generator=torch.Generator().manual_seed(0))
    ours = (m.decode(traj.x_final) / 2 + 0.5).clamp(0, 1)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=4, height=RES, width=RES, guidance_scale=2.0, output_type="pt",
               max_sequence_length=8, generator=torch.Generator().manual_seed(0)).images
    assert (ours - ref).abs().max().item() < 1e-5  # measured 7.5e-7

    # the SD3 LoRA file format: the pipeline's transformer computes ours after load_lora_weights
    randomize_lora(m)
    m.save_lora(tmp_path / "lora")
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x, t = torch.randn(3, *m.sample_shape), torch.full((3,), 0.4)
    raw = pipe.transformer(hidden_states=x, timestep=torch.full((3,), 600.0), return_dict=False,
                           encoder_hidden_states=cond["encoder_hidden_states"],
                           pooled_projections=cond["pooled_projections"])[0]
    assert torch.allclose(m.denoiser(x, t, cond), -raw, atol=1e-6, rtol=0)  # velocity = −(ε − x₁)

    # the memoryless SDE (the default) with a reward on decoded images
    proc = m.default_process(num_steps=4)
    assert proc.registered_name == "fm-memoryless" and proc.memoryless
    traj = rollout(proc, m.model, batch_size=3, sample_shape=m.sample_shape, cond=cond,
                   generator=torch.Generator().manual_seed(1), reward_fn=m.image_reward(get_reward("brightness")))
    assert traj.reward.shape == (3,) and torch.isfinite(traj.reward).all()
    assert float(traj.stds[0]) > 0 and float(traj.stds[-1]) == 0


def test_sdxl_rollout_and_lora_equal_diffusers_pipeline(tmp_path: Path) -> None:
    """SDXL's added conditioning (pooled text + size ids) and its zeroed empty prompt, and the
    SDXL LoRA file format, against StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline

    folder = build_sdxl(tmp_path / "sdxl")
    m = load_model(folder, lora_rank=4, guidance_scale=3.0)
    cond = m.encode_prompts(PROMPTS)
    assert cond["added_cond_kwargs"]["time_ids"].shape == (3, 6)
    proc = m.default_process("ddpm", num_steps=4)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        traj = rollout(proc, m.model, batch_size=3, sample_shape=m.sample_shape, cond=cond,
                       generator=torch.Generator().manual_seed(0))
        ref = pipe(PROMPTS, num_inference_steps=4, height=RES, width=RES, guidance_scale=3.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
        return (m.decode(traj.x_final) / 2 + 0.5).clamp(0, 1), ref

    ours, ref = both()
    assert (ours - ref).abs().max().item() < 1e-5  # measured 3.6e-7
    randomize_lora(m)
    m.save_lora(tmp_path / "lora")
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ours_lora, ref_lora = both()
    assert (ours_lora - ref_lora).abs().max().item() < 1e-5  # measured 3.6e-7
    assert (ref_lora - ref).abs().max().item() > 1e-3  # measured 3.7e-3


def test_dpmpp_sde_on_loaded_vp_model(sd_dir: Path) -> None:
    m = load_model(sd_dir, lora_rank=0, guidance_scale=2.0)
    proc = m.default_process("dpmpp-sde", num_steps=3)
    traj = rollout(proc, m.model, batch_size=2, sample_shape=m.sample_shape, cond=m.encode_prompts(PROMPTS[:2]),
                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.x_final).all()


def test_flux_transformer_denoiser_matches_pipeline_packing() -> None:
    """Flux works on packed 2×2 patches; our adapter must pack, call and unpack exactly as
    FluxPipeline (and map t to σ = 1 − t, output to −velocity)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(3)
    net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=16, axes_dims_rope=(4, 2, 2))
    sched = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    sched["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    den = DiffusersDenoiser(net, sched)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.3, 0.7])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32), "pooled_projections": torch.randn(2, 16)}
    ours = den(x, t, cond)
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", x.dtype)
    raw = net(hidden_states=packed, timestep=1 - t, encoder_hidden_states=cond["encoder_hidden_states"],
              pooled_projections=cond["pooled_projections"], txt_ids=torch.zeros(5, 3), img_ids=ids).sample
    ref = -FluxPipeline._unpack_latents(raw, 64, 64, 8)  # pixel size 64 = 8 latents · VAE factor 8
    assert torch.equal(ours, ref)
    # a rollout with the memoryless flow SDE and Flux's dynamic shift μ
    from soctune.sde import get_process

    proc = get_process("fm-memoryless", num_steps=3, scheduler_config=sched, mu=0.8)
    traj = rollout(proc, den, x_init=torch.randn(2, 4, 8, 8), cond=cond, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.x_final).all()


# ---------------------------------------------------------------------------------- LoRA


def test_saved_lora_loads_into_stable_diffusion_pipeline(sd_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    m = load_model(sd_dir, lora_rank=4, lora_alpha=8)  # α ≠ r: the scale must survive the file
    randomize_lora(m)
    path = m.save_lora(tmp_path / "lora")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)  # no "module." prefixes
    assert len(keys) == len(m.trainable_parameters())

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(PROMPTS[:2], num_inference_steps=3, height=RES, width=RES, guidance_scale=3.0,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    base_images = images()
    pipe.load_lora_weights(str(tmp_path / "lora"), adapter_name="ft")
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 16)
    # the pipeline's network now computes ours (rank, α and every target loaded)
    assert torch.allclose(pipe.unet(x, 500, e).sample, m.network(x, 500, e).sample, atol=1e-6, rtol=0)
    lora_images = images()
    # measured ≈ 2e-2 on [0, 1] images for LoRA weights of std 0.05
    assert (lora_images - base_images).abs().max().item() > 1e-3
    pipe.set_adapters(["ft"], [0.0])
    assert torch.equal(images(), base_images)  # scaling by 0 restores the base exactly

    # and back into soctune (diffusers' loader path), frozen or trainable (to resume training)
    for trainable in (False, True):
        fresh = load_model(sd_dir, lora_rank=0)
        fresh.load_lora(tmp_path / "lora", trainable=trainable)
        assert torch.allclose(fresh.network(x, 500, e).sample, m.network(x, 500, e).sample, atol=1e-6, rtol=0)
        assert len(fresh.trainable_parameters()) == (len(keys) if trainable else 0)


def test_base_context_equals_network_before_adapters(sd_dir: Path) -> None:
    m = load_model(sd_dir, lora_rank=0, guidance_scale=2.0)
    cond = m.encode_prompts(PROMPTS[:2])
    x, t = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.2, 0.9])
    before = m.model(x, t, cond)
    lora.add_lora(m, rank=4)
    assert torch.equal(m.model(x, t, cond), before)  # B = 0 at init
    randomize_lora(m)
    adapted = m.model(x, t, cond)
    with m.base():
        base = m.model(x, t, cond)
    assert torch.equal(base, before)
    assert (adapted - before).abs().max() > 1e-3
    # the base context toggles peft's switch; trainability must come back unchanged
    assert m.trainable_parameters() and all(p.requires_grad for p in lora.lora_parameters(m))
    assert torch.equal(m.model(x, t, cond), adapted)


def test_lora_mixing_and_scaling(pixel_dir: Path, tmp_path: Path) -> None:
    """Two LoRAs on an attention-free UNet2DModel (no diffusers adapter mixin: the generic peft
    path): composition, interpolation, scale 0 = base; loaded adapters are frozen."""
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), 0.5)
    outs = {}
    for i in (1, 2):
        m = load_model(pixel_dir, lora_rank=4)
        assert lora.default_target_modules(m.network) == ["conv1", "conv2", "time_emb_proj"]
        randomize_lora(m, seed=i)
        outs[i] = m.model(x, t)
        m.save_lora(tmp_path / f"lora{i}")
    fresh = load_model(pixel_dir, lora_rank=0)
    base = fresh.model(x, t)
    a = fresh.load_lora(tmp_path / "lora1", adapter_name="a")
    b = fresh.load_lora(tmp_path / "lora2", scale=0.0, adapter_name="b")
    assert fresh.trainable_parameters() == []  # loaded adapters are frozen components
    assert torch.allclose(fresh.model(x, t), outs[1], atol=1e-6, rtol=0)
    fresh.set_adapter_weights({a: 0.0, b: 1.0})
    assert torch.allclose(fresh.model(x, t), outs[2], atol=1e-6, rtol=0)
    fresh.set_adapter_weights({a: 0.0, b: 0.0})
    assert torch.equal(fresh.model(x, t), base)
    fresh.set_adapter_weights({a: 1.0, b: 1.0})  # composition differs from either alone
    both = fresh.model(x, t)
    # measured max |Δ| 0.30 and 0.42
    assert (both - outs[1]).abs().max() > 0.05 and (both - outs[2]).abs().max() > 0.05
    fresh.set_adapter_weights({a: 0.5})  # DRaFT-style interpolation lies between base and LoRA 1
    half = fresh.model(x, t)
    d_base, d_full = (half - base).norm(), (outs[1] - base).norm()
    assert 0.3 * d_full < d_base < 0.7 * d_full  # measured 0.55 (the network is not linear in w)
    assert lora.adapter_weights(fresh) == {"a": 0.5}
    # a missing LoRA, or one saved for another network, is refused in one line, nothing half-loaded
    other = load_model(pixel_dir, lora_rank=0)
    with pytest.raises(SoctuneError) as err:
        other.load_lora(tmp_path / "nowhere")
    assert_one_line(err, "does not exist")
    from diffusers import UNet2DModel

    wider = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
                        norm_num_groups=8, add_attention=False)
    lora.add_lora(wider, rank=2)  # the raw diffusers network works too
    lora.save_lora(wider, tmp_path / "lora_wider")
    with pytest.raises(SoctuneError) as err:
        other.load_lora(tmp_path / "lora_wider", adapter_name="wider")
    assert_one_line(err, "was it saved for this model")
    assert lora.adapter_names(other) == [] and torch.equal(other.model(x, t), base)


def test_full_finetune_keeps_a_frozen_base(pixel_dir: Path) -> None:
    m = load_model(pixel_dir, full_finetune=True)
    params = m.trainable_parameters()
    assert len(params) == len(list(m.network.parameters())) and lora.adapter_names(m) == []
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.4)
    before = m.model(x, t)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    with m.base():
        assert torch.equal(m.model(x, t), before)
    assert (m.model(x, t) - before).abs().max() > 1e-3


# ------------------------------------------------------------------------------- bad input


def test_missing_path_and_uncached_hub_id_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SoctuneError) as err:
        load_model(tmp_path / "no_such_model")
    assert_one_line(err, "does not exist", "model_index.json")
    with pytest.raises(SoctuneError) as err:
        load_model("soctune-tests/certainly-not-cached-model")
    assert_one_line(err, "not in the local Hugging Face cache", "huggingface-cli download", "local path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoctuneError) as err:
        load_model(tmp_path / "empty")
    assert_one_line(err, "not a diffusers model folder")


def test_reward_needing_absent_weights_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SoctuneError) as err:
        get_reward("aesthetic")
    assert_one_line(err, "aesthetic:PATH", "nothing is downloaded")
    with pytest.raises(SoctuneError) as err:
        get_reward(f"pickscore:{tmp_path / 'missing'}")
    assert_one_line(err, "does not exist", "PickScore_v1")
    for name, module, package in (("hpsv2", "hpsv2", "pip install hpsv2"),
                                  ("imagereward", "ImageReward", "pip install image-reward")):
        expected = "needs local weights" if importlib.util.find_spec(module) else package
        with pytest.raises(SoctuneError) as err:
            get_reward(name)
        assert_one_line(err, expected)


def test_process_that_cannot_use_the_model_fails_in_one_line(sd_dir: Path, sd3_dir: Path) -> None:
    from soctune.sde import get_process

    vp = load_model(sd_dir, lora_rank=0, guidance_scale=2.0)
    with pytest.raises(SoctuneError) as err:
        vp.default_process("fm-memoryless")
    assert_one_line(err, "fm-memoryless", "epsilon", "ddpm")
    flow = load_model(sd3_dir, lora_rank=0, max_sequence_length=8)
    with pytest.raises(SoctuneError) as err:
        flow.default_process("ddpm")
    assert_one_line(err, "velocity", "fm-memoryless")
    # a DDPM process built on diffusers' default (linear) betas instead of the model's
    # scaled_linear schedule: rollout's check_model consults the model and refuses it
    wrong = get_process("ddpm", num_steps=3)
    with pytest.raises(SoctuneError) as err:
        rollout(wrong, vp.model, batch_size=1, sample_shape=vp.sample_shape)
    assert_one_line(err, "different noise schedule", "scheduler_config")


def test_text_model_without_cond_samples_unconditionally(sd_dir: Path) -> None:
    """cond=None means the empty prompt (the null conditioning), not an error."""
    m = load_model(sd_dir, lora_rank=0, guidance_scale=3.0)
    x, t = torch.randn(2, *m.sample_shape), torch.full((2,), 0.5)
    assert torch.equal(m.model(x, t), m.denoiser(x, t, m.encode_prompts(["", ""])))


# ------------------------------------------------------------------------- solvers end to end


@pytest.mark.parametrize("solver,options", [
    ("adjoint-matching", {"num_loss_steps": 2}),
    ("nabla-db", {"transitions": 2}),
    ("draft", {"k": 1}),
])
def test_solvers_run_on_tiny_sd_with_prompts_and_cfg(sd_dir: Path, solver: str, options: dict) -> None:
    from soctune import TrainConfig, Trainer
    from soctune.solvers import get_solver

    m = load_model(sd_dir, lora_rank=4, guidance_scale=3.0)
    # "trailing" spacing starts at τ = N − 1 (ᾱ ≈ 0.005), so the 4-step chain is memoryless, as
    # the tilt-sampling solvers want; SD's own "leading" spacing would start at τ = 751
    proc = m.default_process("ddpm", num_steps=4,
                             scheduler_config={**m.scheduler_config, "timestep_spacing": "trailing"})
    assert proc.memoryless
    reward = m.image_reward(get_reward("brightness"))
    x_probe, t_probe = torch.randn(2, *m.sample_shape), torch.full((2,), 0.5)
    cond_probe = m.encode_prompts(PROMPTS[:2])
    base_before = m.model(x_probe, t_probe, cond_probe).detach()
    lora_before = [p.detach().clone() for p in m.trainable_parameters()]
    ft = Trainer(proc, m.model, get_solver(solver, reward_scale=10.0, **options), reward, m.sample_shape,
                   TrainConfig(iters=2, batch_size=2, lr=1e-2, seed=0), cond_sampler=m.cond_sampler(PROMPTS))
    history = ft.train()
    assert len(history) == 2 and all(h["updates"] >= 1 for h in history)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    moved = max((p - q).abs().max().item() for p, q in zip(m.trainable_parameters(), lora_before))
    assert moved > 0  # the LoRA trained
    with m.base():  # and the base model is untouched
        assert torch.equal(m.model(x_probe, t_probe, cond_probe), base_before)
    samples = ft.sample(2, seed=0)
    assert samples.shape == (2, *m.sample_shape) and torch.isfinite(m.decode(samples)).all()


# ---------------------------------------------------------------------------- shipped models


@pytest.mark.parametrize("alias,process", [("digits-ddpm", "ddpm"), ("digits-flow", "fm-memoryless")])
def test_shipped_digits_models_load(alias: str, process: str) -> None:
    from soctune.examples.digits import ASSETS_DIR

    if not (ASSETS_DIR / alias.split("-")[1] / "unet" / "config.json").is_file():
        pytest.skip("shipped digits models not built (soctune pretrain-digits)")
    m = load_model(alias)
    assert isinstance(m, LoadedModel) and m.sample_shape == (1, 8, 8) and not m.is_latent
    assert lora.default_target_modules(m.network) == ["conv1", "conv2", "time_emb_proj"]
    proc = m.default_process(num_steps=10)
    assert proc.registered_name == process
    traj = rollout(proc, m.model, batch_size=4, sample_shape=m.sample_shape, generator=torch.Generator().manual_seed(0),
                   reward_fn=m.image_reward(get_reward("digit:3")))
    assert traj.reward.shape == (4,) and (traj.reward <= 0).all()
