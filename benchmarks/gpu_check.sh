#!/usr/bin/env bash
# The GPU checks in one prepared script: every solver × process pair for 2 iterations on CUDA in
# bf16 and fp16, and (with ≥ 2 GPUs) 2-process data parallel vs 1 process; prints a table.
#
#   bash benchmarks/gpu_check.sh              # from the repository root, on a machine with CUDA
#   WHEELS=wheels bash benchmarks/gpu_check.sh   # install diffusers/torchsde/... from local wheels first
#
# The table is also written to ${OUT:-benchmarks/out}/gpu_check.md, one JSON line per pair to gpu.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then  # machines without network: wheels downloaded elsewhere (pip download --no-deps)
  python -m pip install --quiet --no-deps "$WHEELS"/*.whl
  python -m pip install --quiet --no-deps --no-build-isolation -e .
fi
python - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(f"torch {torch.__version__}, {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}")
PY
export SOCTUNE_GPU_REPORT="$OUT/gpu.jsonl"
rm -f "$SOCTUNE_GPU_REPORT"
set +e
python -m pytest -q -p no:cacheprovider -m gpu tests/
status=$?
set -e
python - "$SOCTUNE_GPU_REPORT" "$OUT/gpu_check.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
lines = ["| solver | process | precision | s/iter | updates | fp16 overflow skips | reward first → last | peak MB |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    if "refused" in r:
        lines.append(f"| {r['solver']} | {r['process']} | {r['precision']} | refused: {r['refused']} | | | | |")
        continue
    lines.append(f"| {r['solver']} | {r['process']} | {r['precision']} | {r['s_per_iter']:.2f} | {r['updates']:.0f} | "
                 f"{r['fp16_overflow_skips']:.0f} | {r['reward_first']:.3f} → {r['reward_last']:.3f} | {r['peak_mb']:.0f} |")
text = "\n".join(lines)
print(text)
open(sys.argv[2], "w").write(text + "\n")
PY
exit $status
