"""Every process × solver pair with nothing but the defaults, as a newcomer runs it.

    python benchmarks/pairs.py                       # all 3 × 5 pairs, ≈ 45 min at one thread
    python benchmarks/pairs.py --processes ddpm --solvers nabla-db adjoint-matching
    python benchmarks/pairs.py --keep --processes fm-memoryless --solvers adjoint-matching --set process.kernel=euler

Each pair is one fresh `soctune finetune --process P --solver S --reward digit:3 --out DIR` (the CLI,
in its own process, OMP_NUM_THREADS=1, no other flag: the shared defaults of soctune.config and the
solvers' constructors; ``--set KEY=VALUE`` adds that one override to every pair and the row records it)
on the shipped digits model of the process. Recorded per pair (appended to
results/pairs.jsonl, one JSON row each; `benchmarks/report.py` renders the RESULTS.md section): the
command's wall time (training + the run's own before/after evaluation) with the machine's load average
when it ended (other jobs inflate it), the training time, the share
of the target class among 256 samples judged by the independent pixel classifier (not the reward's
CNN) before → after, the pixel spread among the target-class samples before → after (the diversity the
tilt p_base(x | 3) keeps), the reward mean before → after and, for a solver that claims the tilt, the
SOC gap J − J*_K with the step that carries the largest share of the control cost (summary.json's soc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS

PROCESSES = ("ddpm", "dpmpp-sde", "fm-memoryless")
SOLVERS = ("adjoint-matching", "nabla-db", "draft", "ddpo", "db")
REWARD = "digit:3"


def run_pair(process: str, solver: str, workdir: Path, overrides: tuple[str, ...] = ()) -> dict[str, object]:
    """One CLI run with defaults (plus ``overrides``, each a ``--set KEY=VALUE``); its summary.json
    reduced to the table's numbers."""
    out = workdir / f"{process}-{solver}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["soctune", "finetune", "--process", process, "--solver", solver, "--reward", REWARD,
           *[a for o in overrides for a in ("--set", o)], "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row: dict[str, object] = {"process": process, "solver": solver, "reward": REWARD, "command": " ".join(cmd[:-2]),
                              "wall_s": wall, "rc": proc.returncode, "load": round(os.getloadavg()[0], 2)}
    if overrides:
        row["set"] = list(overrides)
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return row
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    report_b, report_a = before.get("class_report", before), after.get("class_report", after)
    row.update(train_s=summary["train_seconds"], iterations=summary["iterations"],
               share_before=report_b["target_share"], share_after=report_a["target_share"],
               spread_before=report_b["target_spread_pixels"], spread_after=report_a["target_spread_pixels"],
               reward_before=before["reward_mean"], reward_after=after["reward_mean"])
    soc = summary.get("soc")
    if soc:  # a solver that claims the tilt: J − J*_K and the step that carries most of it
        row.update(soc_gap=soc["soc_gap"], soc_gap_se=soc["soc_gap_se"], soc_lower_bound=soc["soc_lower_bound"],
                   costliest_step=soc["costliest_step"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", nargs="+", default=list(PROCESSES))
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    ap.add_argument("--keep", action="store_true", help="append to results/pairs.jsonl instead of starting it afresh")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="one config override for every pair (repeatable), e.g. process.kernel=euler")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "pairs.jsonl"
    if not args.keep:
        path.write_text("")
    with tempfile.TemporaryDirectory() as tmp:
        for process in args.processes:
            for solver in args.solvers:
                row = run_pair(process, solver, Path(tmp), tuple(args.overrides))
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
