#!/usr/bin/env bash
# One-shot GPU check for fmnist-lightning: run once on a machine with one NVIDIA GPU, from a fresh
# copy of the repo, in at most ~8 minutes. Everything measured lands in OUT_DIR/gpu_check.json.
#
#   scripts/gpu_check.sh OUT_DIR [--dry-run] [--data-dir DIR] [--strong]
#
# Steps: (1) environment: the system Python when it already has torch + lightning (GPU images often
# do), else a virtualenv with `pip install -e .`; (2) `fmnist fit` for 3 epochs, bf16-mixed,
# channels_last, batch 512, then `fmnist test`; (3) the benchmark: raw loop vs `fmnist fit`'s path vs a
# typical tutorial pipeline, eager, then raw vs fmnist compiled; (4) optionally (--strong) the
# residual network of configs/strong.yaml; (5) one JSON with GPU name, versions and all results.
# --dry-run prints this plan and exits, on any machine.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run] [--data-dir DIR] [--strong]" >&2; exit 2; }
OUT="" DRY_RUN=0 DATA_DIR="data" STRONG=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --strong) STRONG=1 ;;
    --data-dir) [[ $# -ge 2 ]] || usage; DATA_DIR="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [[ -z "$OUT" ]] || usage; OUT="$1" ;;
  esac
  shift
done
[[ -n "$OUT" ]] || usage
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
FMNIST=("$PYTHON" -m fmnist_lightning)
COMMON=(--data-dir "$DATA_DIR" --offline)

STEPS=(
  "fit|${FMNIST[*]} fit --gpus 1 --precision bf16-mixed --channels-last --batch-size 512 --max-epochs 3 --no-progress ${COMMON[*]} --out $OUT/run"
  "test|${FMNIST[*]} test --ckpt $OUT/run/checkpoints/best.ckpt --gpus 1 --precision bf16-mixed ${COMMON[*]} --out $OUT/run"
  "bench|$PYTHON scripts/benchmark.py --device cuda --precision bf16-mixed --batch-size 512 --eval-batch-size 2000 --channels-last --steps 300 --paths raw,fmnist,typical --data-dir $DATA_DIR --json $OUT/bench.json"
  "bench_compiled|$PYTHON scripts/benchmark.py --device cuda --precision bf16-mixed --batch-size 512 --eval-batch-size 2000 --channels-last --compile --steps 300 --paths raw,fmnist --data-dir $DATA_DIR --json $OUT/bench-compiled.json"
)
if [[ $STRONG == 1 ]]; then
  STEPS+=("strong|${FMNIST[*]} fit --config configs/strong.yaml --gpus 1 --no-progress ${COMMON[*]} --out $OUT/strong --test")
fi

if [[ $DRY_RUN == 1 ]]; then
  echo "gpu_check plan (dry run; nothing is executed):"
  echo "  env: use $PYTHON if it imports torch and lightning, else python3 -m venv $OUT/venv && pip install -e ."
  for step in "${STEPS[@]}"; do echo "  ${step%%|*}: ${step#*|}"; done
  echo "  summary: $OUT/gpu_check.json"
  exit 0
fi

mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
if ! "$PYTHON" -c "import torch, lightning, torchmetrics, typer, rich, matplotlib, yaml" 2>/dev/null; then
  "$PYTHON" -m venv "$OUT/venv" && "$OUT/venv/bin/pip" install -q -e . && PYTHON="$OUT/venv/bin/python"
  FMNIST=("$PYTHON" -m fmnist_lightning)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=160

status_file="$OUT/steps.tsv"
: >"$status_file"
for step in "${STEPS[@]}"; do
  name="${step%%|*}" cmd="${step#*|}"
  echo "== $name: $cmd"
  start=$SECONDS
  if bash -c "$cmd" >"$OUT/$name.log" 2>&1; then rc=0; else rc=$?; fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$status_file"
  tail -n 25 "$OUT/$name.log"
done

"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {"steps": {}}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    summary["steps"][name] = {"exit_code": int(rc), "seconds": float(seconds)}
if (out / "nvidia-smi.txt").exists():
    summary["gpu"] = (out / "nvidia-smi.txt").read_text().strip()
for name, path in {"test_report": "run/report.json", "bench": "bench.json", "bench_compiled": "bench-compiled.json",
                   "strong_report": "strong/report.json"}.items():
    if (out / path).exists():
        data = json.loads((out / path).read_text())
        summary[name] = {k: data[k] for k in ("accuracy", "loss", "num_samples")} if "report" in name else data
if (out / "run" / "metrics.csv").exists():
    summary["fit_metrics_csv"] = (out / "run" / "metrics.csv").read_text()
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k not in ("bench", "bench_compiled", "fit_metrics_csv")}, indent=2))
PY
