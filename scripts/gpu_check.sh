#!/usr/bin/env bash
# One-shot GPU check for fmnist-lightning: run it once, from a copy of the repo, on a machine with one
# NVIDIA GPU. Expected to take about 5 minutes (not measured yet); every step has a hard time limit,
# so one hung step cannot eat the rest of a rented machine's time, and --budget caps the whole run.
# Everything measured lands in OUT_DIR/gpu_check.json, plus one log per step (OUT_DIR/STEP.log).
#
#   scripts/gpu_check.sh OUT_DIR [--dry-run] [--data-dir DIR] [--budget S] [--strong [--seeds N]]
#
# Steps, each under `timeout` (limit in seconds):
#   env      nvidia-smi; use the interpreter if it imports torch, torchvision, lightning and the other
#            dependencies, else make OUT_DIR/venv (--system-site-packages: keeps the machine's torch,
#            which matches its driver) and `pip install -e .` there; record the torch, CUDA and
#            lightning versions. Stops here when torch sees no GPU.
#   data     fmnist data: finds the data (--data-dir, default REPO/data, then Debian's copy) or
#            downloads it. With no internet, carry the four IDX files in REPO/data. Stops here on failure.
#   fit      fmnist fit --config configs/default.yaml --gpus 1, 3 epochs, --precision auto  (180)
#   test     fmnist test of fit's best.ckpt (skipped when fit made none)                      (60)
#   bench-b128, bench-b512   scripts/benchmark.py, bf16-mixed, channels_last, 200 steps, eager:
#            raw, fmnist, typical, fmnist-fast                                                (150 each)
#   bench-compiled-b512      the same with --compile, raw and fmnist (compilation is in the time) (240)
#   strong-S (--strong only) fmnist fit --config configs/strong.yaml --test, seeds 1..N      (900 each)
# The limits add up to 15 minutes without --strong. --budget S: no step runs past S seconds from the
# start (its limit shrinks to fit); a step with under 20 s left is skipped (and recorded so). Every
# step after data runs --offline. A step that times out records exit code 124 (137 when it had to be
# killed) and the next step runs. Ctrl-C or SIGTERM stops the running step and still writes the summary.
# Exit status: 0 when every step passed, 1 otherwise (130/143 when interrupted), 2 for bad usage.
# OUT_DIR must be new or empty, so old results cannot pass for new ones.
# --dry-run runs only the import check, then prints each step's exact command line, with the
# interpreter the steps will use and its time limit; it creates nothing, not even OUT_DIR.
#
# Hooks (for tests and odd machines):
#   GPU_CHECK_PYTHON=PATH     the interpreter to try first (default: $PYTHON, else python3)
#   GPU_CHECK_STEP_TIMEOUT=S  one time limit for every step after env (the tests make a stub time out)
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Arguments. Relative paths mean the caller's folder: resolve them before the cd below.

usage() {
  echo "usage: $0 OUT_DIR [--dry-run] [--data-dir DIR] [--budget S] [--strong [--seeds N]] (-h for help)" >&2
  exit 2
}
die() { echo "gpu_check: $*" >&2; exit 2; }
absolute() { if [[ $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi; }

OUT="" DRY_RUN=0 DATA_DIR="" STRONG=0 SEEDS="" BUDGET=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --strong) STRONG=1 ;;
    --data-dir) [[ $# -ge 2 ]] || usage; DATA_DIR="$2"; shift ;;
    --seeds) [[ $# -ge 2 ]] || usage; SEEDS="$2"; shift ;;
    --budget) [[ $# -ge 2 ]] || usage; BUDGET="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) usage ;;
    *) [[ -z "$OUT" ]] || usage; OUT="$1" ;;
  esac
  shift
done
[[ -n "$OUT" ]] || usage
if [[ -n "$SEEDS" ]]; then
  [[ $STRONG == 1 ]] || die "--seeds only applies with --strong"
  [[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || die "--seeds must be a whole number of at least 1, got '$SEEDS'"
fi
SEEDS="${SEEDS:-1}"
if [[ -n "$BUDGET" && ! "$BUDGET" =~ ^[1-9][0-9]*$ ]]; then die "--budget must be whole seconds, got '$BUDGET'"; fi
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-}"
if [[ -n "$STEP_TIMEOUT" && ! "$STEP_TIMEOUT" =~ ^[1-9][0-9]*$ ]]; then
  die "GPU_CHECK_STEP_TIMEOUT must be whole seconds, got '$STEP_TIMEOUT'"
fi
command -v timeout >/dev/null || die "needs coreutils' timeout"

OUT="$(absolute "$OUT")"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# The default is the repo's data/ folder (where the data can be carried to a machine with no internet).
DATA_DIR="$(absolute "${DATA_DIR:-$REPO/data}")"
if [[ -e "$OUT" && ! -d "$OUT" ]]; then die "OUT_DIR $OUT is a file"; fi
if [[ -d "$OUT" && -n "$(ls -A "$OUT")" ]]; then die "OUT_DIR $OUT is not empty; give a new folder"; fi
cd "$REPO"
# The console, kept as fds 3 and 4: a signal trap runs inside a step's redirection to its log, and its
# messages belong on the console.
exec 3>&1 4>&2
# The package comes from this checkout, with or without the venv's editable install.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=160

PYTHON="${GPU_CHECK_PYTHON:-${PYTHON:-python3}}"
PYTHON="$(command -v "$PYTHON" || printf '%s\n' "$PYTHON")"  # name the real file in the plan and JSON

# ---------------------------------------------------------------------------------------------
# Steps. run_step prints the step (dry run) or runs it under its time limit, logging to OUT/NAME.log
# and appending "name, exit code, seconds, limit, command" to OUT/steps.tsv for the summary.

quoted() {  # the command line as a shell would read it back (printf %q would also escape commas)
  local arg words=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./,:=@+%-]+$ ]]; then words+=("$arg"); else words+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  printf '%s\n' "${words[*]}"
}

# `timeout` moves its command into a process group of its own, where neither Ctrl-C nor a signal to
# this script's group reaches it. So it runs in the background, and the INT/TERM trap (below) passes
# the signal on: an interrupted check leaves nothing running on the GPU.
CURRENT_PID="" CURRENT_STEP=""
bounded() {  # LIMIT COMMAND...: the command's exit code; 124 when it ran out of time, 137 when killed
  # --kill-after: a command that ignores SIGTERM is killed 15 s later.
  timeout --kill-after=15 "$@" 3>&- 4>&- &
  CURRENT_PID=$!
  local rc=0
  wait "$CURRENT_PID" || rc=$?
  CURRENT_PID=""
  return "$rc"
}

record() {  # NAME RC SECONDS LIMIT COMMAND
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$OUT/steps.tsv"
}

run_step() {  # NAME LIMIT COMMAND...; sets STEP_RC
  local name="$1" limit="${STEP_TIMEOUT:-$2}" start left
  shift 2
  if [[ $DRY_RUN == 1 ]]; then
    printf '  %-20s (timeout %ss) %s\n' "$name" "$limit" "$(quoted "$@")"
    STEP_RC=0
    return
  fi
  if [[ -n "$BUDGET" ]]; then  # SECONDS counts from the script's start
    left=$((BUDGET - SECONDS))
    # Under 20 s left (or under the limit itself, when that is shorter) is too little for any step.
    if ((left < (limit < 20 ? limit : 20))); then
      skip_step "$name" "out of --budget $BUDGET (${left}s left)"
      STEP_RC=skipped
      return
    fi
    if ((left < limit)); then limit=$left; fi
  fi
  echo "== $name (timeout ${limit}s): $(quoted "$@")"
  start=$SECONDS CURRENT_STEP="$name"
  if bounded "$limit" "$@" >"$OUT/$name.log" 2>&1; then STEP_RC=0; else STEP_RC=$?; fi
  CURRENT_STEP=""
  record "$name" "$STEP_RC" "$((SECONDS - start))" "$limit" "$(quoted "$@")"
  if [[ $STEP_RC == 124 || $STEP_RC == 137 ]]; then echo "!! $name ran out of its ${limit}s (exit $STEP_RC)"; fi
  tail -n 15 "$OUT/$name.log"
}

skip_step() {  # NAME REASON
  if [[ $DRY_RUN == 0 ]]; then
    echo "== $1: skipped, $2"
    record "$1" "skipped" 0 0 "$2"
  fi
}

stop() {  # REASON [EXIT_CODE]: the summary is still written (EXIT trap)
  echo "gpu_check: stopping early: $1" >&4
  printf '%s\n' "$1" >"$OUT/stopped.txt"
  exit "${2:-1}"
}

write_summary() {
  # Standard library only, and each file read on its own: a step's broken output costs only its entry.
  # python3 when PYTHON is not there (a venv that could not be made).
  local python="$PYTHON"
  [[ -x "$python" ]] || python=python3
  "$python" - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def read(name):
    path = out / name
    return path.read_text(errors="replace") if path.is_file() else None


def load_json(name):
    try:
        return json.loads(read(name) or "null")
    except ValueError:
        return None


def report(name):
    data = load_json(name)
    return {k: data.get(k) for k in ("accuracy", "loss", "num_samples")} if isinstance(data, dict) else None


summary = {"steps": {}}
for line in (read("steps.tsv") or "").splitlines():
    name, rc, seconds, limit, command = line.split("\t", 4)
    if rc == "skipped":
        summary["steps"][name] = {"exit_code": None, "skipped": command}
        continue
    summary["steps"][name] = {
        "exit_code": int(rc), "seconds": float(seconds), "timeout_s": float(limit) or None,
        "timed_out": int(rc) in (124, 137) and float(seconds) >= float(limit),
        "command": command, "log": f"{name}.log" if (out / f"{name}.log").is_file() else None,
    }
summary["stopped_early"] = (read("stopped.txt") or "").strip() or None
summary["ok"] = not summary["stopped_early"] and all(s["exit_code"] == 0 for s in summary["steps"].values())
summary["env"] = dict(line.split("\t", 1) for line in (read("env.tsv") or "").splitlines())
summary["nvidia_smi"] = read("nvidia-smi.txt")
summary["gpu"] = (read("nvidia-smi-query.txt") or "").strip() or None
summary["versions"] = load_json("versions.json")

config_yaml = read("run/config.yaml")
resolved = None
if config_yaml:
    try:
        import yaml

        provenance = (yaml.safe_load(config_yaml) or {}).get("provenance") or {}
        resolved = provenance.get("resolved_precision")
    except Exception:  # a summary must not die on one odd file
        pass
summary["fit"] = {
    "resolved_precision": resolved,  # null until the package records it in config.yaml's provenance
    "config_yaml": config_yaml,
    "metrics_csv": read("run/metrics.csv"),
}
summary["test_report"] = report("run/report.json")
summary["bench"] = {p.stem: load_json(p.name) for p in sorted(out.glob("bench-*.json"))}
summary["strong"] = {p.parent.name: report(f"{p.parent.name}/report.json") for p in sorted(out.glob("strong-*/report.json"))}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
brief = {k: summary[k] for k in ("ok", "stopped_early", "gpu", "versions", "test_report", "strong")}
brief["steps"] = {k: v["exit_code"] for k, v in summary["steps"].items()}
brief["resolved_precision"] = resolved
print(json.dumps(brief, indent=2))
print(f"wrote {out / 'gpu_check.json'}")
PY
}

on_signal() {  # SIGNAL_NAME EXIT_CODE
  if [[ -n "$CURRENT_PID" ]]; then
    kill -TERM "$CURRENT_PID" 2>/dev/null || true
    wait "$CURRENT_PID" 2>/dev/null || true
  fi
  if [[ -n "$CURRENT_STEP" ]]; then record "$CURRENT_STEP" "$2" 0 0 "interrupted by SIG$1"; fi
  stop "interrupted by SIG$1" "$2"
}

on_exit() {
  local rc=$?
  trap - EXIT
  write_summary >&3 2>&4 || echo "gpu_check: could not write $OUT/gpu_check.json" >&4
  exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# Step 1, the environment: settle the interpreter before any step's command line is built.

IMPORTS="import torch, torchvision, lightning, torchmetrics, typer, rich, matplotlib, yaml, PIL, numpy"
VENV="$OUT/venv"
if [[ $DRY_RUN == 1 ]]; then
  echo "gpu_check plan (dry run: nothing is created; only the import check ran):"
  echo "  env: nvidia-smi; versions of torch, CUDA, lightning -> $OUT/gpu_check.json"
  if timeout 120 "$PYTHON" -c "$IMPORTS" >/dev/null 2>&1; then
    echo "  env: $PYTHON imports torch, torchvision, lightning and the rest: the steps use it"
  else
    echo "  env: $PYTHON lacks some of: ${IMPORTS#import }"
    echo "       would run: $(quoted "$PYTHON" -m venv --system-site-packages "$VENV")"
    echo "       would run: $(quoted "$VENV/bin/python" -m pip install -e "$REPO")"
    PYTHON="$VENV/bin/python"
  fi
  echo "  python for every step: $PYTHON"
  if [[ -n "$BUDGET" ]]; then echo "  budget: ${BUDGET}s in all; a step's limit shrinks to what is left"; fi
else
  mkdir -p "$OUT"
  : >"$OUT/steps.tsv"
  trap on_exit EXIT
  trap 'on_signal INT 130' INT
  trap 'on_signal TERM 143' TERM
  env_start=$SECONDS
  if command -v nvidia-smi >/dev/null; then
    bounded 30 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
    bounded 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
      >"$OUT/nvidia-smi-query.txt" 2>&1 || true
    cat "$OUT/nvidia-smi-query.txt"
  else
    echo "nvidia-smi: not found" | tee "$OUT/nvidia-smi.txt"
  fi
  venv_made=false
  if ! bounded 120 "$PYTHON" -c "$IMPORTS" >"$OUT/import-check.log" 2>&1; then
    echo "== $PYTHON lacks a dependency (see import-check.log): making $VENV"
    bounded 120 "$PYTHON" -m venv --system-site-packages "$VENV" >"$OUT/venv.log" 2>&1 \
      || stop "could not create $VENV with $PYTHON (see $OUT/venv.log)"
    bounded 600 "$VENV/bin/python" -m pip install -q -e "$REPO" >>"$OUT/venv.log" 2>&1 \
      || stop "pip install -e $REPO failed in $VENV (see $OUT/venv.log)"
    PYTHON="$VENV/bin/python"
    venv_made=true
  fi
  printf 'python\t%s\nvenv\t%s\nrepo\t%s\ndata_dir\t%s\n' "$PYTHON" "$venv_made" "$REPO" "$DATA_DIR" >"$OUT/env.tsv"
  bounded 120 "$PYTHON" -c '
import json, sys
import lightning, torch, torchvision
gpu = torch.cuda.is_available()
print(json.dumps({
    "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(), "lightning": lightning.__version__,
    "torchvision": torchvision.__version__, "cuda_available": gpu, "device_count": torch.cuda.device_count(),
    "device_name": torch.cuda.get_device_name(0) if gpu else None,
    "bf16_supported": torch.cuda.is_bf16_supported() if gpu else None,
}))' >"$OUT/versions.json" 2>"$OUT/versions.log" || stop "$PYTHON could not report its versions (see $OUT/versions.log)"
  record env 0 "$((SECONDS - env_start))" 0 "nvidia-smi; import check; versions"
  cat "$OUT/versions.json"
  echo "== python for every step: $PYTHON"
  # Every later step needs the GPU: without one they would only fail, one after another.
  grep -q '"cuda_available": true' "$OUT/versions.json" \
    || stop "torch sees no GPU (see $OUT/nvidia-smi.txt and $OUT/versions.json)"
fi

# ---------------------------------------------------------------------------------------------
# The steps, built now that PYTHON is final.

FMNIST=("$PYTHON" -m fmnist_lightning)
OFFLINE=(--offline --data-dir "$DATA_DIR")

run_step data 120 "${FMNIST[@]}" data --data-dir "$DATA_DIR" --out "$OUT/data"
if [[ $STEP_RC == skipped ]]; then stop "out of --budget before the data step"; fi
if [[ $STEP_RC != 0 ]]; then
  stop "no Fashion-MNIST data (see $OUT/data.log): copy the four IDX files into $REPO/data or pass --data-dir"
fi

run_step fit 180 "${FMNIST[@]}" fit --config configs/default.yaml --gpus 1 --precision auto --max-epochs 3 \
  --no-progress "${OFFLINE[@]}" --out "$OUT/run"
if [[ $DRY_RUN == 1 || -f "$OUT/run/checkpoints/best.ckpt" ]]; then
  run_step test 60 "${FMNIST[@]}" test --ckpt "$OUT/run/checkpoints/best.ckpt" --gpus 1 "${OFFLINE[@]}" \
    --out "$OUT/run"
else
  skip_step test "fit wrote no $OUT/run/checkpoints/best.ckpt"
fi

# The benchmark reads the data offline already; it takes only --data-dir.
BENCH=("$PYTHON" scripts/benchmark.py --accelerator gpu --precision bf16-mixed --channels-last --steps 200
  --data-dir "$DATA_DIR")
for batch in 128 512; do
  run_step "bench-b$batch" 150 "${BENCH[@]}" --paths raw,fmnist,typical,fmnist-fast --batch-size "$batch" \
    --json "$OUT/bench-b$batch.json"
done
run_step bench-compiled-b512 240 "${BENCH[@]}" --compile --paths raw,fmnist --batch-size 512 \
  --json "$OUT/bench-compiled-b512.json"

if [[ $STRONG == 1 ]]; then
  for seed in $(seq 1 "$SEEDS"); do
    run_step "strong-$seed" 900 "${FMNIST[@]}" fit --config configs/strong.yaml --gpus 1 --no-progress \
      "${OFFLINE[@]}" --test --seed "$seed" --out "$OUT/strong-$seed"
  done
fi

if [[ $DRY_RUN == 1 ]]; then
  echo "  summary: $OUT/gpu_check.json (steps' exit codes and seconds, nvidia-smi, versions, test report,"
  echo "           bench JSONs, metrics.csv, strong reports); logs: $OUT/STEP.log"
  exit 0
fi
# The EXIT trap writes the summary; the exit status says whether every step passed.
awk -F '\t' '$2 != "0" { failed = 1 } END { exit failed }' "$OUT/steps.tsv"
