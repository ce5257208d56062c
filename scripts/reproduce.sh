#!/usr/bin/env bash
# Run N seeds of a config and print its row for docs/RESULTS.md.
#
#   scripts/reproduce.sh CONFIG N [fmnist fit options] [-- fmnist test options]
#
# e.g. scripts/reproduce.sh configs/improved-long.yaml 3 --offline -- --tta
#
# Each seed trains into runs/repro/<config>-seed<S> (resumed if it was interrupted) and its
# best.ckpt is tested (again, with the test options, each time the script runs);
# the row gives test accuracy mean +- std over the seeds, best validation accuracy, epochs, training
# wall time, the machine, torch and lightning versions, and the command.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 CONFIG N [fmnist fit options] [-- fmnist test options]" >&2; exit 2; }
config="$1" n="$2"; shift 2
options="$*"
fit_options=() test_options=()
while [[ $# -gt 0 && "$1" != "--" ]]; do fit_options+=("$1"); shift; done
if [[ $# -gt 0 ]]; then shift; test_options=("$@"); fi
# The test reads the data as the fit did: offline too, if the fit was told so.
for option in "${fit_options[@]}"; do [[ "$option" == "--offline" ]] && test_options+=(--offline); done
name="$(basename "$config" .yaml)"
fmnist="${FMNIST:-fmnist}"  # PYTHON (below) should be the interpreter of that fmnist's environment

finished() {  # the run reached its config.yaml's max_epochs, or its --stop-at-val-acc target
  [[ -f "$1/metrics.csv" && -f "$1/config.yaml" ]] || return 1
  "${PYTHON:-python3}" - "$1" <<'PY'
import csv, sys
from pathlib import Path

import yaml

run = Path(sys.argv[1])
rows = list(csv.DictReader((run / "metrics.csv").open()))
config = yaml.safe_load((run / "config.yaml").read_text())
target = config.get("stop_at_val_acc") or 0
done = rows and max(float(row["epoch"]) for row in rows) >= config["max_epochs"]
reached = target and any(row["val/acc"] and float(row["val/acc"]) >= target for row in rows)
sys.exit(0 if done or reached else 1)
PY
}

runs=()
for seed in $(seq 1 "$n"); do
  out="runs/repro/${name}-seed${seed}"
  runs+=("$out")
  if ! finished "$out"; then
    if [[ -f "$out/checkpoints/last.ckpt" ]]; then resume=(--resume); else resume=(); fi
    $fmnist fit --config "$config" --seed "$seed" --out "$out" --no-progress "${resume[@]}" "${fit_options[@]}"
  fi
  $fmnist test --ckpt "$out/checkpoints/best.ckpt" --out "$out" "${test_options[@]}" >/dev/null
done
"${PYTHON:-python3}" - "$config" "$options" "${runs[@]}" <<'PY'
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
