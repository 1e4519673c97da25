"""The typer app behind ``soctune``: parses, builds objects from the registries, calls the
library, renders with rich. No maths lives here."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import MutableMapping
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from soctune.registry import SoctuneError

try:  # typer ≥ 0.25 vendors click
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exceptions  # type: ignore[no-redef]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune diffusion and flow-matching models on a reward, as stochastic optimal control.")
console = Console()
err_console = Console(stderr=True)


class ListWhat(str, Enum):
    processes = "processes"
    solvers = "solvers"
    rewards = "rewards"
    presets = "presets"
    prompts = "prompts"


_KIND = {ListWhat.processes: "process", ListWhat.solvers: "solver", ListWhat.rewards: "reward"}


def _rows(what: ListWhat) -> list[tuple[str, str]]:
    if what in _KIND:
        # read from the registration calls in the source: no torch import, so `soctune list`
        # answers at once (tests/test_cli_startup.py keeps it equal to the import-based lists)
        from soctune.registry import list_builtin

        rows = list_builtin(_KIND[what])
        if rows is not None:
            return rows
    if what is ListWhat.processes:
        from soctune.sde import list_processes

        return list_processes()
    if what is ListWhat.solvers:
        from soctune.solvers import list_solvers

        return list_solvers()
    if what is ListWhat.presets:
        from soctune.config import list_presets

        return list(list_presets().items())
    if what is ListWhat.prompts:
        from soctune.prompts import shipped_prompt_sets

        return list(shipped_prompt_sets().items())
    from soctune.rewards import list_rewards

    return list_rewards()


@app.callback()
def _root() -> None:
    """soctune: every fine-tuning method on every sampler, with numbers you can trust."""


@app.command("list")
def list_cmd(what: ListWhat = typer.Argument(None, help="processes, solvers, rewards, presets or prompts (default: all)")) -> None:
    """List the registered processes, solvers, rewards and the shipped presets with one-line descriptions."""
    for w in [what] if what is not None else list(ListWhat):
        table = Table(title=w.value, title_justify="left")
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("description")
        for name, desc in _rows(w):
            table.add_row(name, desc)
        console.print(table)


# ------------------------------------------------------------------------------- progress
class Reporter:
    """Renders library events: a rich progress bar with ETA and a live metrics line on a TTY,
    plain log lines otherwise (CI, files), nothing but errors with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = console.is_terminal
        self.progress = None
        self.task = None
        self.t0 = 0.0

    def __call__(self, kind: str, p: dict) -> None:
        import time

        if self.quiet:
            return
        if kind == "start":
            self.t0 = time.perf_counter()
            if p.get("resumed_from"):
                console.print(f"resuming at iteration {p['resumed_from']}")
            if self.tty:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.progress = Progress(TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
                                         TimeRemainingColumn(), TextColumn("{task.fields[line]}"), console=console)
                self.progress.start()
                self.task = self.progress.add_task("finetune", total=p["iters"], completed=p.get("resumed_from", 0),
                                                   line="")
            self.total = p["iters"]
        elif kind == "iteration":
            line = (f"reward {p.get('reward_mean', float('nan')):+.4f} ± {p.get('reward_std', float('nan')):.3f}  "
                    f"loss {p.get('loss', float('nan')):.4g}  |g| {p.get('grad_norm', float('nan')):.3g}")
            if self.progress is not None:
                self.progress.update(self.task, completed=p["step"], line=line)
            else:
                el = time.perf_counter() - self.t0
                console.print(f"iter {p['step']}/{self.total}  {line}  ({el:.0f}s)", highlight=False)
        elif kind in ("phase", "warning"):
            self._stop()
            console.print(("[yellow]warning:[/] " if kind == "warning" else "") + p["message"], highlight=False)
        elif kind == "done":
            self._stop()

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _summary_table(s: dict, tilt_target: bool = True) -> Table:
    """The before/after table; ``tilt_target`` says whether the run's method samples the tilt
    p_base·e^{λr} that the distance row measures against (see :func:`_tilt_target`)."""
    t = Table(title="before → after (same seeds)", title_justify="left")
    t.add_column("metric")
    t.add_column("base", justify="right")
    t.add_column("fine-tuned", justify="right")
    b, a = s["before"], s["after"]
    t.add_row("reward", f"{b['reward_mean']:.4f} ± {b['reward_se']:.4f}", f"{a['reward_mean']:.4f} ± {a['reward_se']:.4f}")
    t.add_row("diversity (features)", f"{b['diversity']:.3f}", f"{a['diversity']:.3f}")
    if "target_share" in b:
        t.add_row("share of target digit", f"{b['target_share']:.1%}", f"{a['target_share']:.1%}")
        t.add_row("pixel spread of target digit", f"{b['target_spread_pixels']:.3f}", f"{a['target_spread_pixels']:.3f}")
    t.add_row("prior preservation (Fréchet)", "0", f"{s['prior_preservation_frechet']:.3f}")
    fid = s.get("target_fidelity") or {}
    if "sw_to_target" in fid:
        label = "distance to exact tilt (SW)" if tilt_target else "distance to p_base·e^{λr} (SW; not this method's target)"
        t.add_row(label, f"{fid['sw_base_to_target']:.3f}", f"{fid['sw_to_target']:.3f}")
    soc = s.get("soc")
    if soc:  # a solver that minimises the SOC cost: J against its K-step lower bound
        t.add_row("SOC cost J = E[Σ½‖u‖² − λr] (nats)", f"{soc['base_soc_cost']:.4f} ± {soc['base_soc_cost_se']:.4f}",
                  f"{soc['soc_cost']:.4f} ± {soc['soc_cost_se']:.4f}")
        t.add_row("J − J*_K (J*_K = −log E_base e^{λr} = "
                  f"{soc['soc_lower_bound']:.4f} ± {soc['soc_lower_bound_se']:.4f})",
                  f"{soc['base_soc_cost'] - soc['soc_lower_bound']:.4f}", f"{soc['soc_gap']:.4f} ± {soc['soc_gap_se']:.4f}")
    return t


def _costliest_step_note(s: dict) -> str | None:
    """One line when a single step of the chain carries more than half of a significant J − J*_K
    (soctune.soc.StepCosts.summary), else None: typically the kernel's last stochastic step into the
    schedule's smallest noise level, where a mean shift too small to see costs ½‖Δm‖²/s_k²."""
    soc = s.get("soc") or {}
    step = soc.get("costliest_step")
    gap = soc.get("soc_gap", 0.0)
    if not step or gap <= 2 * soc.get("soc_gap_se", 0.0) or step["control_cost"] <= 0.5 * gap:
        return None
    k, (t0, t1) = step["step"], step["t"]
    return (f"note: step {k} (t {t0:.4g} → {t1:.4g}, noise s = {step['noise_std']:.3g}) alone costs "
            f"{step['control_cost']:.4g} nats (J − J*_K = {gap:.4g}): the fine-tuned mean moves there by "
            f"{step['mean_shift_rms']:.2g} rms per number, at ½‖Δm/s‖² (per step: soc.control_cost_by_step); "
            "a kernel whose steps all carry noise, --set process.kernel=euler (ddpm, fm-memoryless), has no such step")


def _tilt_target(b) -> bool:
    """Whether the built run (soctune.run.Built) targets the tilt: its solver and options, its process."""
    from soctune.metrics import tilt_is_target

    options = {k: v for k, v in b.cfg["solver"].items() if k != "name"}
    return tilt_is_target(b.cfg["solver"]["name"], options, b.process)


# ------------------------------------------------------------------------------- commands
@app.command()
def finetune(
    process: str = typer.Option(None, "--process", "-p", help="generative process (soctune list processes); default fm-memoryless"),
    solver: str = typer.Option(None, "--solver", "-s", help="fine-tuning method (soctune list solvers); default adjoint-matching"),
    model: str = typer.Option(None, "--model", "-m", help="diffusers folder or hub id; default: the shipped digits model for the process"),
    reward: str = typer.Option(None, "--reward", "-r", help="reward spec NAME[:ARG] or a weighted sum like \"aesthetic:PATH+0.5*hpsv2:PATH\" (soctune list rewards); default digit:3"),
    reward_scale: float = typer.Option(None, "--reward-scale", help="λ: target ∝ p_base·exp(λ·reward)"),
    iters: int = typer.Option(None, "--iters", help="training iterations"),
    num_steps: int = typer.Option(None, "--num-steps", help="sampling steps K of the process"),
    batch_size: int = typer.Option(None, "--batch-size", help="trajectories per iteration"),
    lr: float = typer.Option(None, "--lr", help="learning rate"),
    seed: int = typer.Option(None, "--seed", help="random seed"),
    config: str = typer.Option(None, "--config", "-c", help="YAML file or shipped preset name (soctune list presets); flags and --set override it"),
    set_: list[str] = typer.Option([], "--set", help="override any config key, e.g. solver.lambda=2 or train.iters=50"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its newest valid checkpoint"),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="iterations between checkpoints (0 = only at the end; default 10)"),
    max_nonfinite: int = typer.Option(None, "--max-nonfinite", help="non-finite updates in a row (each skipped) before the run stops with a checkpoint"),
    grad_clip: float = typer.Option(None, "--grad-clip", help="max global gradient norm (0 = off; default 1)"),
    grad_accum: int = typer.Option(None, "--grad-accum", help="micro-batches per update (gradient accumulation; same update, less memory)"),
    device: str = typer.Option(None, "--device", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps"),
    precision: str = typer.Option(None, "--precision", help="fp32, bf16 or fp16 (autocast; LoRA, optimiser and reward stay float32)"),
    log: str = typer.Option(None, "--log", help="experiment tracker: none, tensorboard or wandb (offline unless WANDB_MODE=online)"),
    prompts: str = typer.Option(None, "--prompts", help="prompt set: a .txt (one per line) or .jsonl file, or a shipped set (soctune list prompts)"),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="unconditional branch of classifier-free guidance"),
    guidance_scale: float = typer.Option(None, "--guidance-scale", help="classifier-free guidance scale of the rollouts (1 = off)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the final summary path"),
) -> None:
    """Fine-tune a model on a reward. Writes config.yaml, metrics.jsonl, before/after sample
    grids, reward.png, lora/, checkpoints/ and summary.json into --out. Under
    `accelerate launch -m soctune_cli.app finetune ...` or `torchrun --nproc-per-node N
    --no-python soctune finetune ...` it trains data-parallel (--batch-size is the global batch;
    process 0 writes everything)."""
    from soctune import config as cfgmod
    from soctune.run import finetune_config

    flags = {"process.name": process, "solver.name": solver, "model.path": model, "reward": reward,
             "solver.reward_scale": reward_scale, "train.iters": iters, "process.num_steps": num_steps,
             "train.batch_size": batch_size, "train.lr": lr, "train.seed": seed,
             "train.checkpoint_every": checkpoint_every, "train.max_nonfinite": max_nonfinite,
             "train.grad_clip": grad_clip, "train.grad_accum": grad_accum, "train.device": device,
             "train.precision": precision, "train.log": log, "model.prompt_file": prompts,
             "model.negative_prompt": negative_prompt, "model.guidance_scale": guidance_scale}
    cfg = cfgmod.resolve(config, flags, set_)
    result = finetune_config(cfg, out, resume=resume, on_event=Reporter(quiet))
    summary = result.summary
    if not summary:  # a data-parallel process other than 0: process 0 reports
        return
    if not quiet:
        console.print(_summary_table(summary, _tilt_target(result.built)))
        if (note := _costliest_step_note(summary)) is not None:
            console.print(note, highlight=False)
    console.print(f"wrote {out}/ (summary.json, samples_compare.png, lora/)")


def _parse_lora(spec: str) -> tuple[str, float]:
    folder, sep, scale = spec.rpartition(":")
    if sep and folder:
        try:
            return folder, float(scale)
        except ValueError:
            pass
    return spec, 1.0


@app.command()
def sample(
    model: str = typer.Option(None, "--model", "-m", help="diffusers folder or hub id; default the shipped digits model"),
    lora: list[str] = typer.Option([], "--lora", help="LoRA folder[:SCALE]; repeat to mix several"),
    process: str = typer.Option(None, "--process", "-p", help="process to sample with (default: the LoRA's run, else fm-memoryless)"),
    num_steps: int = typer.Option(None, "--num-steps", help="sampling steps (default: the LoRA's run, else 50)"),
    noise_scale: float = typer.Option(None, "--noise-scale", help="σ multiplier (1 = the process's SDE, 0 = probability-flow ODE)"),
    n: int = typer.Option(64, "--n", help="number of samples"),
    seed: int = typer.Option(0, "--seed"),
    prompt: list[str] = typer.Option([], "--prompt", help="prompt(s) for text-conditional models"),
    prompts: str = typer.Option(None, "--prompts", help="a prompt set file (.txt/.jsonl) or shipped set, instead of --prompt"),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="unconditional branch of classifier-free guidance"),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="classifier-free guidance scale"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (the network's weights and autocast)"),
    out: Path = typer.Option(..., "--out", "-o"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Sample a model (optionally with LoRAs) into samples.npz (x: float32 [N,C,H,W] in [-1,1]) and grid.png."""
    from soctune.run import sample_run

    if n < 1:
        raise SoctuneError(f"--n must be ≥ 1, got {n}")
    if prompts and prompt:
        raise SoctuneError("pass either --prompt or --prompts, not both")
    if prompts:
        from soctune.prompts import prompt_list

        prompt = prompt_list(prompts)
    loras = [_parse_lora(s) for s in lora]
    model, process, num_steps = _run_defaults(loras, model, process, num_steps)
    if quiet or not console.is_terminal:
        path = sample_run(model=model, process=process, loras=loras, num_steps=num_steps, noise_scale=noise_scale,
                          n=n, seed=seed, out=out, prompts=prompt or None, guidance_scale=guidance_scale,
                          device=device, precision=precision, negative_prompt=negative_prompt)
    else:
        from rich.progress import Progress

        with Progress(console=console) as prog:
            task = prog.add_task("sample", total=n)
            path = sample_run(model=model, process=process, loras=loras, num_steps=num_steps, noise_scale=noise_scale,
                              n=n, seed=seed, out=out, prompts=prompt or None, guidance_scale=guidance_scale,
                              device=device, precision=precision, negative_prompt=negative_prompt, on_event=lambda k, p: prog.update(task, completed=p["done"]) if k == "batch" else None)
    if not quiet:
        report = path / "summary.json"
        if report.exists():
            rep = json.loads(report.read_text())
            if "class_shares" in rep:
                shares = "  ".join(f"{c}: {100 * p:.0f}%" for c, p in enumerate(rep["class_shares"]))
                console.print(f"classes ({rep.get('evaluator')} evaluator): {shares}", highlight=False)
        console.print(f"wrote {path}/samples.npz and {path}/grid.png")


def _run_defaults(loras: list[tuple[str, float]], model: str | None, process: str | None,
                  num_steps: int | None) -> tuple[str | None, str, int]:
    """Model, process and step count default to those of the finetune run that wrote the
    first LoRA (its config.yaml next to lora/), so a LoRA is sampled as it was trained."""
    run_cfg: dict = {}
    if loras and (Path(loras[0][0]).parent / "config.yaml").is_file():
        import yaml

        run_cfg = yaml.safe_load((Path(loras[0][0]).parent / "config.yaml").read_text()) or {}
    proc = run_cfg.get("process") or {}
    return (model or (run_cfg.get("model") or {}).get("path"), process or proc.get("name") or "fm-memoryless",
            num_steps or proc.get("num_steps") or 50)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="a finetune output folder (uses its config.yaml and lora/, or model/ after full fine-tuning)"),
    n: int = typer.Option(256, "--n", help="samples per model"),
    seed: int = typer.Option(1234, "--seed"),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: the run's)"),
    precision: str = typer.Option(None, "--precision", help="fp32, bf16 or fp16 (default: the run's)"),
) -> None:
    """Metrics of a fine-tuned run vs its base model on the same seeds (reward, diversity,
    prior preservation, distance to the exact tilt), with the run's lora/ (or model/ for a full
    fine-tuning run)."""
    from soctune.run import evaluate_run

    summary, b = evaluate_run(run, n=n, seed=seed, device=device, precision=precision)
    console.print(_summary_table(summary, _tilt_target(b)))
    if (note := _costliest_step_note(summary)) is not None:
        console.print(note, highlight=False)
    console.print(f"wrote {run}/evaluation.json")


@app.command("pretrain-digits")
def pretrain_digits(
    out: Path = typer.Option(None, "--out", "-o", help="where to write the models (default: the package's shipped assets)"),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(2500, "--steps", help="training steps of each UNet"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the written paths"),
) -> None:
    """Reproduce the shipped digits models (DDPM ε-model, flow velocity model, classifier)."""
    import logging

    from soctune.examples.digits import ASSETS_DIR
    from soctune.examples.digits.pretrain import logger, pretrain_all

    if not quiet:  # the library logs its progress; show it
        from rich.logging import RichHandler

        logger.addHandler(RichHandler(console=err_console, show_path=False, show_level=False))
        logger.setLevel(logging.INFO)
    paths = pretrain_all(out or ASSETS_DIR, seed=seed, steps=steps)
    for kind, p in paths.items():
        console.print(f"{kind}: {p}")


app.command("pretrain", hidden=True, help="Old name of pretrain-digits.")(pretrain_digits)


@app.command("export")
def export_cmd(
    source: Path = typer.Argument(..., metavar="RUN_OR_LORA_DIR",
                                  help="a finetune output folder (uses its lora/), a LoRA folder or its .safetensors file"),
    fmt: str = typer.Option("kohya", "--format", "-f", help="kohya (sd-scripts / A1111), comfyui or diffusers"),
    out: Path = typer.Option(..., "--out", "-o", help="the .safetensors file to write"),
) -> None:
    """Convert a run's diffusers-format LoRA for other tools: kohya (kohya-ss keys lora_unet_*.lora_down,
    .lora_up, .alpha for UNet LoRAs; ComfyUI loads them for SD1.5/SDXL, A1111 for SD1.x), comfyui (the
    kohya file for UNets, diffusers keys with α folded in for SD3/Flux) or diffusers."""
    from soctune.models.export import export_lora

    path = export_lora(source, fmt, out)
    console.print(f"wrote {path}")


def _thread_defaults(env: MutableMapping[str, str]) -> None:
    """OpenMP default for a machine shared with other jobs, set before torch is imported (the
    OpenMP runtime reads it once, when torch loads it); a setting of the user's wins.

    GOMP_SPINCOUNT=1000: between parallel regions, libgomp's workers (the OpenMP runtime of
    torch's Linux wheels) spin for 300 000 iterations by default before they sleep. Next to one
    busy process on a small machine that spinning fights the neighbour for the cores and a
    digits iteration became two orders of magnitude slower; OMP_WAIT_POLICY=PASSIVE (no spin)
    cures that but slows an idle machine down, and OMP_NUM_THREADS=1 gives up the other cores.
    A short spin keeps most of both (benchmarks/threads.py measures every option idle and with
    a busy neighbour: benchmarks/RESULTS.md, "Shared machine"). Nothing is set when the user set
    OMP_WAIT_POLICY or GOMP_SPINCOUNT; their OMP_NUM_THREADS is never touched."""
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = "1000"


def main() -> None:
    """Console-script entry point: user mistakes end with one line and exit code 2; the full
    traceback only with SOCTUNE_DEBUG=1 or ``--debug``."""
    debug = os.environ.get("SOCTUNE_DEBUG") == "1" or "--debug" in sys.argv
    _thread_defaults(os.environ)
    # transformers warns about optional image back-ends when diffusers' pipelines import it;
    # the command's output is the progress and the summary, so keep only its errors
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        app(standalone_mode=False)
    except SoctuneError as exc:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says it once
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _click_exceptions.NoArgsIsHelpError:  # help was already printed
        sys.exit(0)
    except _click_exceptions.ClickException as exc:  # usage errors: one line, no box
        if debug:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
        msg = " ".join(exc.format_message().split())
        err_console.print(f"[bold red]error:[/] {msg}{hint}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
