"""Real architectures at scale, random weights, no download: cost and memory of the solvers on
Stable Diffusion 1.5's networks (UNet2DConditionModel, AutoencoderKL and CLIP ViT-L/14 text
encoder, from their published configs) and on an SD3-style MMDiT (SD3-medium's transformer config
at reduced depth).

For each method — AM-lean (10 loss steps), ∇-DB (10% of transitions), DRaFT-1, DRaFT-K=all (with
its per-step checkpointing) — and each precision (fp32, bf16: autocast + frozen weights in bf16)
and network checkpointing (off, on), one fresh process builds the model, encodes one prompt with
the text encoder and releases it, then measures (after a warm-up): the wall time of a no-grad
rollout and of a training iteration (medians), their ratio, and the peak memory of an iteration —
on CUDA ``torch.cuda.max_memory_allocated`` (total), on the CPU the peak resident set (total,
weights included) and its increase over the memory after the warm-up (sampled every 0.5 ms).
``--k-list`` repeats the memory measurement at several K for AM-lean and ∇-DB. Appends to
results/scale.jsonl; benchmarks/report.py renders the "Scale" section of RESULTS.md.

    # this CPU: SD1.5 at 16×16 latents (128 px), batch 1, K = 10
    OMP_NUM_THREADS=2 python benchmarks/scale.py --arch sd15 --latent 16 --batch 1 --steps 10
    # a GPU: 64×64 latents (512 px), batch 4, K = 25 and 50
    python benchmarks/scale.py --arch sd15 --device cuda --latent 64 --batch 4 --steps 25 --k-list 25 50
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
OUT = HERE / "results" / "scale.jsonl"

#: the published configs (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
                 norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                  "clip_sample": False, "steps_offset": 1, "timestep_spacing": "trailing"}
#: stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (num_layers reduced: --sd3-layers)
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_VAE = dict(SD15_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

METHODS = {
    "AM-lean (10 loss steps)": ("adjoint-matching", {"num_loss_steps": 10}),
    "nabla-DB 10%": ("nabla-db", {"transitions": 0.1}),
    "DRaFT-1": ("draft", {"k": 1}),
    "DRaFT-K=all (ckpt)": ("draft", {"k": "all", "checkpoint": True}),
}
K_SCALING = ("AM-lean (10 loss steps)", "nabla-DB 10%")


def build(arch: str, latent: int, device: Any, precision: str, ckpt: bool, sd3_layers: int) -> tuple[Any, Any, str]:
    """(LoadedModel, conditioning of one prompt, process name): random weights from the configs."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from soctune.models.diffusers_model import from_parts

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if arch == "sd15":
        network = UNet2DConditionModel(**SD15_UNET).to(dtype)
        vae = AutoencoderKL(**SD15_VAE)
        sched, process = SD15_SCHEDULER, "ddpm"
        text = CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).to(device)
        ids = torch.randint(0, SD15_CLIP["vocab_size"], (1, 77), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # the prompt set's embedding, computed once; then the encoder is released
            cond = {"encoder_hidden_states": text(ids.to(device)).last_hidden_state.to(dtype)}
        del text
    else:
        network = SD3Transformer2DModel(**dict(SD3_TRANSFORMER, num_layers=sd3_layers)).to(dtype)
        vae = AutoencoderKL(**SD3_VAE)
        sched, process = SD3_SCHEDULER, "fm-memoryless"
        # SD3's encoders (two CLIPs + T5-XXL) are used once and released: stand-in embeddings of
        # the right shapes (333 tokens of width 4096, pooled width 2048) cost the same downstream
        g = torch.Generator().manual_seed(0)
        cond = {"encoder_hidden_states": torch.randn(1, 333, 4096, generator=g).to(device, dtype),
                "pooled_projections": torch.randn(1, 2048, generator=g).to(device, dtype)}
    model = from_parts(network, sched, vae=vae, source=f"{arch} (random weights)", device=device, lora_rank=8,
                       gradient_checkpointing=ckpt, resolution=latent * 8)
    return model, cond, process


def run_one(args: argparse.Namespace) -> None:
    import torch

    from soctune import TrainConfig, Trainer
    from soctune.rewards import get_reward
    from soctune.solvers import get_solver
    from soctune.trainer import make_accelerator
    from soctune.trajectory import rollout

    sys.path.insert(0, str(HERE))
    from common import PeakRSS

    acc = make_accelerator(args.device, args.precision)
    dev = acc.device
    cuda = dev.type == "cuda"
    m, cond1, pname = build(args.arch, args.latent, dev, args.precision, args.ckpt == "on", args.sd3_layers)
    weights_mb = sum(p.numel() * p.element_size() for p in m.network.parameters()) / 2**20
    proc = m.default_process(pname, num_steps=args.steps)
    B = args.batch

    def cond_sampler(n: int, gen: torch.Generator) -> Any:
        return {k: v.expand(n, *v.shape[1:]) for k, v in cond1.items()}

    reward = m.image_reward(get_reward("brightness"))
    rows = []
    for label in args.methods:
        solver_name, options = METHODS[label]
        trainer = Trainer(proc, m.model, get_solver(solver_name, **options), reward, m.sample_shape,
                          TrainConfig(batch_size=B, lr=1e-4, device=args.device, precision=args.precision),
                          cond_sampler=cond_sampler, accelerator=acc)

        def roll() -> None:
            with torch.no_grad(), trainer.autocast():
                rollout(proc, m.model, batch_size=B, sample_shape=m.sample_shape, cond=cond_sampler(B, None),
                        generator=torch.Generator(device=dev).manual_seed(0), device=dev)

        def timed(fn: Any) -> float:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t

        roll()
        trainer.train_iteration()  # warm-up
        t_roll = statistics.median(timed(roll) for _ in range(args.repeats))
        t_iter = []
        peak_total = peak_extra = 0.0
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                t_iter.append(timed(trainer.train_iteration))
                peak_total = max(peak_total, torch.cuda.max_memory_allocated() / 2**20)
            else:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                with PeakRSS() as rss:
                    t_iter.append(timed(trainer.train_iteration))
                peak_total = max(peak_total, rss.peak / 2**20)
                peak_extra = max(peak_extra, rss.delta_mb)
        it = statistics.median(t_iter)
        row = {"arch": args.arch, "sd3_layers": args.sd3_layers if args.arch == "sd3" else None, "method": label,
               "precision": args.precision, "ckpt": args.ckpt, "device": str(dev),
               "device_name": torch.cuda.get_device_name(0) if cuda else f"CPU × {os.cpu_count()}",
               "latent": args.latent, "batch": B, "steps": args.steps, "repeats": args.repeats,
               "rollout_s": t_roll, "iter_s": it, "ratio": it / t_roll, "images_per_s": B / it,
               "peak_total_mb": peak_total, "peak_extra_mb": peak_extra if not cuda else None,
               "network_weights_mb": weights_mb, "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["sd15", "sd3"], default="sd15")
    ap.add_argument("--sd3-layers", type=int, default=4, help="transformer blocks of the SD3-style MMDiT (SD3-medium: 24)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--latent", type=int, default=16, help="latent side (pixels = 8×)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="K of the main grid")
    ap.add_argument("--k-list", type=int, nargs="*", default=[10, 50], help="K values of the memory-scaling runs")
    ap.add_argument("--k-latent", type=int, default=None, help="latent side of the K-scaling runs (default --latent)")
    ap.add_argument("--k-precisions", nargs="+", default=["bf16"], help="precisions of the K-scaling runs")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--ckpt-modes", nargs="+", default=["off", "on"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default="off", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args)
        return
    base = [sys.executable, __file__, "--one", "--arch", args.arch, "--sd3-layers", str(args.sd3_layers), "--device",
            args.device, "--latent", str(args.latent), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    for precision in args.precisions:  # a fresh process per configuration: memory and allocator state
        for ckpt in args.ckpt_modes:
            subprocess.run([*base, "--steps", str(args.steps), "--precision", precision, "--ckpt", ckpt,
                            "--methods", *args.methods], check=True)
    scaling = [lb for lb in args.methods if lb in K_SCALING]
    k_latent = args.k_latent or args.latent
    kbase = [*base[:base.index("--latent")], "--latent", str(k_latent), *base[base.index("--latent") + 2:]]
    for k in args.k_list if scaling else []:
        if k == args.steps and k_latent == args.latent:
            continue  # the main grid has it
        for precision in args.k_precisions:
            subprocess.run([*kbase, "--steps", str(k), "--precision", precision, "--ckpt", "on",
                            "--methods", *scaling], check=True)


if __name__ == "__main__":
    main()
