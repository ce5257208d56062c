#!/usr/bin/env bash
# Run N seeds of a config and print its row for docs/RESULTS.md.
#
#   scripts/reproduce.sh CONFIG N [extra fmnist fit options]
#
# Each seed trains into runs/repro/<config>-seed<S> (resumed if it was interrupted) and is tested;
# the row gives test accuracy mean +- std over the seeds, best validation accuracy, epochs, training
# wall time, the machine, torch and lightning versions, and the command.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 CONFIG N [fmnist fit options]" >&2; exit 2; }
config="$1" n="$2"; shift 2
name="$(basename "$config" .yaml)"
fmnist="${FMNIST:-fmnist}"  # PYTHON (below) should be the interpreter of that fmnist's environment
runs=()
for seed in $(seq 1 "$n"); do
  out="runs/repro/${name}-seed${seed}"
  runs+=("$out")
  if [[ -f "$out/report.json" ]]; then continue; fi
  if [[ -f "$out/checkpoints/last.ckpt" ]]; then resume=(--resume); else resume=(); fi
  $fmnist fit --config "$config" --seed "$seed" --out "$out" --no-progress "${resume[@]}" "$@"
  $fmnist test --ckpt "$out/checkpoints/best.ckpt" --out "$out" >/dev/null
done
"${PYTHON:-python3}" - "$config" "$*" "${runs[@]}" <<'PY'
import csv, json, platform, statistics, sys
from pathlib import Path

import yaml

config, extra, runs = sys.argv[1], sys.argv[2], [Path(p) for p in sys.argv[3:]]
acc = [json.loads((r / "report.json").read_text())["accuracy"] * 100 for r in runs]
rows = [list(csv.DictReader((r / "metrics.csv").open())) for r in runs]
best_val = [max(float(x["val/acc"]) for x in rs) * 100 for rs in rows]
wall = [sum(float(x["train_time_s"]) for x in rs) / 60 for rs in rows]
prov = yaml.safe_load((runs[0] / "config.yaml").read_text())["provenance"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
std = statistics.stdev(acc) if len(acc) > 1 else 0.0
command = f"scripts/reproduce.sh {config} {len(runs)} {extra}".strip()
print(f"| {Path(config).stem} | {statistics.mean(acc):.2f} +- {std:.2f} (n={len(acc)}) | {statistics.mean(best_val):.2f} "
      f"| {len(rows[0])} | {statistics.mean(wall):.1f} min | {cpu} | torch {prov['torch']}, lightning {prov['lightning']} "
      f"| `{command}` |")
PY
