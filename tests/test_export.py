"""LoRA export (soctune.models.export / `soctune export`): a finetune run's diffusers-format LoRA
converted to kohya-ss keys loads back through diffusers' own kohya loader and computes exactly
what soctune's model computes; ComfyUI / diffusers outputs likewise; bad input fails in one line.

Tiny randomly initialised SD / SDXL / SD3 pipelines built locally (no download). The LoRAs use
α ≠ r, so a wrong per-module alpha would show as a factor α/r in the output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from soctune.models.diffusers_model import load_model  # noqa: E402
from soctune.models.export import FORMATS, export_lora  # noqa: E402
from soctune.registry import SoctuneError  # noqa: E402
from soctune_cli.app import app  # noqa: E402
from test_diffusers_models import build_sd, build_sd3, build_sdxl, randomize_lora  # noqa: E402

RANK, ALPHA = 4, 8.0
REL_TOL = 1e-5
runner = CliRunner()


def _keys_and_meta(path: Path) -> tuple[list[str], dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        return keys, dict(f.metadata() or {}), {k: f.get_tensor(k) for k in keys}


def _assert_same(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= REL_TOL * scale, (err, scale)
    # the LoRA moves the output far more than the tolerance (measured ≈ 5e-2 · scale)
    assert (base - ref).abs().max().item() > 100 * REL_TOL * scale


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory) -> tuple[Path, Path, object]:
    """(model folder, finetune-style run folder with lora/, soctune model holding that LoRA)."""
    root = tmp_path_factory.mktemp("export")
    sd_dir = build_sd(root / "sd")
    m = load_model(sd_dir, lora_rank=RANK, lora_alpha=ALPHA)
    randomize_lora(m)  # lora_B starts at zero: give the adapter a visible effect
    run = root / "run"
    m.save_lora(run / "lora")
    (run / "config.yaml").write_text("model: {}\n")  # a run folder holds more than lora/
    return sd_dir, run, m


def _sd_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 120]), torch.randn(2, 8, 16, generator=g)


def _sd_pipe_output(sd_dir: Path, lora_file: Path | None) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))  # diffusers' own loader (kohya keys -> peft)
    x, t, e = _sd_inputs()
    with torch.no_grad():
        return pipe.unet(x, t, e).sample


def test_kohya_export_loads_in_diffusers_and_matches_soctune(sd_run, tmp_path: Path) -> None:
    sd_dir, run, m = sd_run
    out = export_lora(run, "kohya", tmp_path / "kohya.safetensors")
    assert out == tmp_path / "kohya.safetensors"
    keys, meta, tensors = _keys_and_meta(out)
    n_modules = len(m.trainable_parameters()) // 2
    assert all(k.startswith("lora_unet_") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) == n_modules and len(keys) == 3 * n_modules
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert all(tensors[k].item() == ALPHA for k in keys if k.endswith(".alpha"))  # α per module, not r
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == "8"

    x, t, e = _sd_inputs()
    with torch.no_grad():
        ours = m.network(x, t, e).sample
        with m.base():
            base = m.network(x, t, e).sample
    assert torch.equal(_sd_pipe_output(sd_dir, None), base)
    _assert_same(_sd_pipe_output(sd_dir, out), ours, base)  # measured max |Δ| = 0


def test_comfyui_and_diffusers_exports(sd_run, tmp_path: Path) -> None:
    sd_dir, run, m = sd_run
    # comfyui for a UNet LoRA is the kohya file (ComfyUI's loader maps lora_unet_* keys for SD1.5/SDXL)
    kohya = export_lora(run / "lora", "kohya", tmp_path / "k.safetensors")
    comfy = export_lora(run / "lora" / "pytorch_lora_weights.safetensors", "COMFYUI", tmp_path / "c.safetensors")
    (kk, _, kt), (ck, _, ct) = _keys_and_meta(kohya), _keys_and_meta(comfy)
    assert kk == ck and all(torch.equal(kt[k], ct[k]) for k in kk)
    # an existing folder as --out: a default file name inside it
    folder = tmp_path / "dl"
    folder.mkdir()
    dif = export_lora(run, "diffusers", folder)
    assert dif == folder / "pytorch_lora_weights.safetensors"
    dk, dmeta, dt = _keys_and_meta(dif)
    sk, smeta, st = _keys_and_meta(run / "lora" / "pytorch_lora_weights.safetensors")
    assert dk == sk and dmeta["lora_adapter_metadata"] == smeta["lora_adapter_metadata"]
    assert all(torch.equal(dt[k], st[k]) for k in dk)

    x, t, e = _sd_inputs()
    with torch.no_grad():
        ours = m.network(x, t, e).sample
        with m.base():
            base = m.network(x, t, e).sample
    _assert_same(_sd_pipe_output(sd_dir, comfy), ours, base)
    _assert_same(_sd_pipe_output(sd_dir, dif), ours, base)


def test_sdxl_kohya_export_matches(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    xl_dir = build_sdxl(tmp_path / "sdxl")
    m = load_model(xl_dir, lora_rank=RANK, lora_alpha=ALPHA)
    randomize_lora(m, seed=3)
    m.save_lora(tmp_path / "run" / "lora")
    out = export_lora(tmp_path / "run", "kohya", tmp_path / "xl.safetensors")
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    cond = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    with torch.no_grad():
        base = pipe.unet(x, 400, e, added_cond_kwargs=cond).sample
        ours = m.network(x, 400, e, added_cond_kwargs=cond).sample
        pipe.load_lora_weights(str(out))
        got = pipe.unet(x, 400, e, added_cond_kwargs=cond).sample
    _assert_same(got, ours, base)


def test_sd3_transformer_lora_comfyui_works_and_kohya_fails_in_one_line(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    sd3_dir = build_sd3(tmp_path / "sd3")
    m = load_model(sd3_dir, lora_rank=RANK, lora_alpha=2.0, max_sequence_length=8)  # scale 1/2
    randomize_lora(m, std=0.2, seed=1)
    m.save_lora(tmp_path / "run" / "lora")
    with pytest.raises(SoctuneError) as exc:
        export_lora(tmp_path / "run", "kohya", tmp_path / "k.safetensors")
    msg = str(exc.value)
    assert "\n" not in msg and "comfyui" in msg and "diffusers" in msg
    assert not (tmp_path / "k.safetensors").exists()

    out = export_lora(tmp_path / "run", "comfyui", tmp_path / "c.safetensors")
    keys, meta, _ = _keys_and_meta(out)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "lora_adapter_metadata" not in meta  # α/r is folded into lora_B: readers assume scale 1
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(2, 8, 32, generator=g), timestep=torch.tensor([500.0, 300.0]),
              pooled_projections=torch.randn(2, 32, generator=g), return_dict=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    with torch.no_grad():
        base = pipe.transformer(x, **kw)[0]
        ours = m.network(x, **kw)[0]
        pipe.load_lora_weights(str(out))
        got = pipe.transformer(x, **kw)[0]
    _assert_same(got, ours, base)


def test_bad_input_fails_in_one_line(sd_run, tmp_path: Path) -> None:
    _, run, _ = sd_run
    cases = [
        ((tmp_path / "nope", "kohya", tmp_path / "o.safetensors"), "does not exist"),
        ((run, "a1111", tmp_path / "o.safetensors"), "unknown export format 'a1111'"),
        ((tmp_path, "kohya", tmp_path / "o.safetensors"), "no LoRA weights"),
        ((run, "kohya", tmp_path / "o.ckpt"), ".safetensors"),
        ((run / "lora", "diffusers", run / "lora"), "is the LoRA being exported"),
    ]
    for args, needle in cases:
        with pytest.raises(SoctuneError) as exc:
            export_lora(*args)
        assert "\n" not in str(exc.value) and needle in str(exc.value), str(exc.value)
    # already kohya: nothing to convert
    k = export_lora(run, "kohya", tmp_path / "k.safetensors")
    with pytest.raises(SoctuneError, match="already a kohya-format LoRA"):
        export_lora(k, "kohya", tmp_path / "k2.safetensors")
    # a module whose name diffusers' kohya loader cannot map back: refused, not silently dropped
    bad = tmp_path / "bad" / "pytorch_lora_weights.safetensors"
    bad.parent.mkdir()
    save_file({"unet.mid_block.my_layer.lora_A.weight": torch.ones(2, 8),
               "unet.mid_block.my_layer.lora_B.weight": torch.ones(8, 2)}, str(bad))
    with pytest.raises(SoctuneError) as exc:
        export_lora(bad.parent, "kohya", tmp_path / "b.safetensors")
    assert "\n" not in str(exc.value) and "mid_block.my_layer" in str(exc.value)
    assert not (tmp_path / "b.safetensors").exists()


def test_cli_export(sd_run, tmp_path: Path) -> None:
    _, run, _ = sd_run
    res = runner.invoke(app, ["export", str(run), "--format", "nonsense", "--out", str(tmp_path / "o.safetensors")])
    assert isinstance(res.exception, SoctuneError), res.output
    msg = str(res.exception)
    assert "\n" not in msg and "unknown export format 'nonsense'" in msg and all(f in msg for f in FORMATS)

    res = runner.invoke(app, ["export", str(run), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert (tmp_path / "k.safetensors").is_file() and "wrote" in res.output
