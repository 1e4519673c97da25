"""Shared machine: the OpenMP wait policy of `soctune finetune`, and the CLI's start-up time.

(a) Wall time per training iteration of the digits default
``soctune finetune --process ddpm --solver nabla-db --reward digit:3`` (its preset's batch and K),
run through the installed command, so the CLI's own environment defaults apply, on an idle machine
and next to a busy neighbour (one process spinning ``while True: pass``), under each setting:

    cli-default      nothing set: what the CLI chooses (soctune_cli.app._thread_defaults)
    runtime-default  nothing set and the CLI's default bypassed: libgomp's own behaviour, i.e.
                     soctune before it set a default
    active           OMP_WAIT_POLICY=ACTIVE (workers always spin)
    passive          OMP_WAIT_POLICY=PASSIVE (workers sleep)
    threads-1        OMP_NUM_THREADS=1 (no worker threads)
    spin-1e3 / -1e4 / -1e5   GOMP_SPINCOUNT=N: libgomp's workers spin N iterations, then sleep
                     (libgomp's default is 300 000; PASSIVE is 0)
    passive+spin-1e3 both

Seconds per iteration are read from the run's metrics.jsonl ("time" of each iteration); the median
of the iterations after the first (which includes warm-up), or the first when only one ran. A run
that passes --timeout is stopped and recorded with the iterations it finished (possibly none).

(b) Start-up: wall time of ``soctune --help`` and ``soctune list`` (median of --repeats runs).

Every row is appended to results/threads.jsonl; benchmarks/report.py renders the section
"Shared machine: OpenMP wait policy and CLI start-up". OMP_* variables of the calling shell (run_all
sets OMP_NUM_THREADS=1) are removed for the measured commands: the settings above are the point.

    python benchmarks/threads.py                          # ≈ 5–10 min on 2 cores
    python benchmarks/threads.py --iters 1 --settings passive --loads idle --only train
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "threads.jsonl"
sys.path.insert(0, str(HERE.parent))

FINETUNE = ["finetune", "--process", "ddpm", "--solver", "nabla-db", "--reward", "digit:3"]
#: setting -> environment overrides of the measured command
SETTINGS: dict[str, dict[str, str]] = {
    "cli-default": {},
    "runtime-default": {},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads-1": {"OMP_NUM_THREADS": "1"},
    "spin-1e3": {"GOMP_SPINCOUNT": "1000"},
    "passive+spin-1e3": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"},
    "spin-1e4": {"GOMP_SPINCOUNT": "10000"},
    "spin-1e5": {"GOMP_SPINCOUNT": "100000"},
}
STRIP = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME")


def cli_default_env() -> dict[str, str]:
    """The variables the CLI's main() sets when the user set none (no torch import)."""
    from soctune_cli.app import _thread_defaults

    env: dict[str, str] = {}
    _thread_defaults(env)
    return env


def label(setting: str) -> str:
    if setting == "cli-default":
        chosen = " ".join(f"{k}={v}" for k, v in cli_default_env().items()) or "nothing"
        return f"unset: the CLI's default ({chosen})"
    if setting == "runtime-default":
        return "unset, no CLI default (libgomp's own; soctune before this default)"
    return " ".join(f"{k}={v}" for k, v in SETTINGS[setting].items())


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STRIP}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def soctune_cmd(bypass_main: bool = False) -> list[str]:
    """The installed console script (next to this interpreter, else on PATH, else ``-m``);
    ``bypass_main`` calls the typer app directly, skipping main()'s environment defaults."""
    if bypass_main:
        return [sys.executable, "-c", "from soctune_cli.app import app; app(prog_name='soctune')"]
    exe = Path(sys.executable).parent / "soctune"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("soctune")
    return [found] if found else [sys.executable, "-m", "soctune_cli.app"]


class BusyNeighbour:
    """One single-threaded process spinning on a core while the block runs."""

    def __enter__(self) -> "BusyNeighbour":
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], env=base_env())
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.kill()
        self.proc.wait()


def _iter_times(metrics: Path) -> list[float]:
    if not metrics.exists():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            out.append(float(json.loads(line)["time"]))
        except (ValueError, KeyError):
            pass  # a partial last line of a stopped run
    return out


def train_row(setting: str, load: str, iters: int, timeout: float, batch: int | None, eval_n: int) -> dict[str, Any]:
    env = {**base_env(), **SETTINGS[setting]}
    with tempfile.TemporaryDirectory(prefix="soctune-threads-") as tmp:
        out = Path(tmp) / "run"
        args = [*FINETUNE, "--iters", str(iters), "--out", str(out), "--quiet", "--checkpoint-every", "0",
                "--set", f"eval.n_samples={eval_n}", "--set", f"eval.grid={eval_n}"]
        if batch:
            args += ["--batch-size", str(batch)]
        cmd = [*soctune_cmd(bypass_main=setting == "runtime-default"), *args]
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        # own session: on a timeout the whole command (and anything it started) is stopped
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        timed_out = False
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        wall = time.perf_counter() - t0
        times = _iter_times(out / "metrics.jsonl")
        used_batch = batch
        if (out / "config.yaml").exists():
            import yaml

            used_batch = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("train", {}).get("batch_size")
    steady = times[1:] if len(times) > 1 else times
    row: dict[str, Any] = {
        "kind": "train", "setting": setting, "label": label(setting), "env": SETTINGS[setting], "load": load,
        "iters": iters, "iters_done": len(times), "iter_times": times,
        "s_per_iter": statistics.median(steady) if steady else None,
        "first_iter_s": times[0] if times else None, "wall_s": wall, "timed_out": timed_out,
        "returncode": None if timed_out else proc.returncode, "batch": used_batch, "cpus": os.cpu_count(),
        "loadavg_before": load_before, "cmd": " ".join(["soctune", *args[:7], "--iters", str(iters)]),
    }
    if not timed_out and proc.returncode != 0:
        row["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    return row


def startup_rows(repeats: int) -> list[dict[str, Any]]:
    env = base_env()
    rows = []
    for name, cmd in (("python -c pass (interpreter alone)", [sys.executable, "-c", "pass"]),
                      ("soctune --help", [*soctune_cmd(), "--help"]), ("soctune list", [*soctune_cmd(), "list"])):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times.append(time.perf_counter() - t0)
        rows.append({"kind": "startup", "command": name, "times": times, "median_s": statistics.median(times),
                     "repeats": repeats, "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()[0]})
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2, help="training iterations per run")
    ap.add_argument("--batch", type=int, default=None, help="trajectories per iteration (default: the preset's)")
    ap.add_argument("--eval-n", type=int, default=16, help="samples of the run's closing before/after evaluation")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--loads", nargs="+", choices=["idle", "busy"], default=["idle", "busy"])
    ap.add_argument("--repeats", type=int, default=5, help="runs of each start-up command (median)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a training run is stopped")
    ap.add_argument("--only", choices=["train", "startup"], help="measure only one part")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (rows are appended)")
    args = ap.parse_args()

    done = {(r.get("kind"), r.get("setting"), r.get("load"), r.get("iters"), r.get("command"))
            for r in read_rows(args.out)}
    if args.only != "train":
        if not any(k[0] == "startup" for k in done):
            for row in startup_rows(args.repeats):
                append(args.out, row)
                print(f"{row['command']}: {row['median_s']:.3f}s (median of {row['repeats']})", flush=True)
    if args.only == "startup":
        return
    for load in args.loads:
        for setting in args.settings:
            if ("train", setting, load, args.iters, None) in done:
                continue
            if load == "busy":
                with BusyNeighbour():
                    row = train_row(setting, load, args.iters, args.timeout, args.batch, args.eval_n)
            else:
                row = train_row(setting, load, args.iters, args.timeout, args.batch, args.eval_n)
            append(args.out, row)
            per = f"{row['s_per_iter']:.2f} s/iter" if row["s_per_iter"] is not None else "no iteration finished"
            print(f"{load:5s} {setting:16s} {per}  ({row['iters_done']}/{row['iters']} iterations, wall "
                  f"{row['wall_s']:.0f}s{', timed out' if row['timed_out'] else ''}"
                  f"{', error: ' + row['error'] if 'error' in row else ''})", flush=True)


if __name__ == "__main__":
    main()
