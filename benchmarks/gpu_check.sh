#!/usr/bin/env bash
# The probe's and CoCA's GPU checks in one run: at most 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh             # from the repository root, on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps at tiny sizes on the CPU
#                                            # (DEVICE=cpu does the same)
#
# Steps, each under its own time limit (timeout), each run even if an earlier one failed:
#   1. environment: GPU, torch, CUDA, transformers;
#   2. the GPU tests: pytest -m gpu (tests/test_gpu.py: CUDA statistics and probe against
#      the CPU's; tests/test_probe_memory.py: the probe's memory above the forward on CUDA);
#   3. the probe on a random-weight LLaMA-7B-shaped model, bf16, 4096 tokens, beside a bare
#      forward with and without the LM head (benchmarks/probe_speed.py --random-llama-7b);
#   4. CoCA vs vanilla attention at 4K-32K tokens, forward and backward
#      (benchmarks/coca_speed.py --device cuda);
#   5. the ablation's gpu preset on the GPU: 300 steps of rope and of strict CoCA, one seed,
#      evaluated without scaling; its training tok/s sizes the full preset (3 variants ×
#      3 seeds × 2000 steps must fit 8 minutes).
# Then one table: step, status, seconds, headline; and each step's own table below it.
#
# Needs: python with torch (CUDA build), transformers, numpy, numba and pytest. The package
# is used from this checkout (PYTHONPATH); where that is not wanted, install it with
# `pip install --no-deps -e .`. PYTHON=/path/to/python picks the interpreter (default: the
# repository's .venv if it has a working torch, else python3). Logs go to $OUT when set
# (a device machine's collected folder), else to a new temporary folder; the path is printed.
# Copy the figures into benchmarks/README.md.

set -uo pipefail

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
  *) echo "error: unknown argument '$1'; use --dry-run or nothing" >&2; exit 2 ;;
esac
[[ "${DEVICE:-cuda}" == cpu ]] && DRY_RUN=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

if [[ -n "${PYTHON:-}" ]]; then
  :
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch' 2>/dev/null; then
  PYTHON=.venv/bin/python
else
  PYTHON=python3
fi

LOGS="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$LOGS"

if (( DRY_RUN )); then
  DEV=cpu
  export ANOMALY_GPU_TESTS_DEVICE=cpu  # the GPU tests run with the CPU standing in
  PROBE_ARGS=(--device cpu --random-llama-7b --layers 1 --tokens 128 --repeats 1 --no-details)
  COCA_ARGS=(--device cpu --lengths 256 512 --repeats 1 --backward-max 512)
  ABLATION_ARGS=(--preset smoke --device cpu --steps 6)
  LIMITS=(60 300 300 300 300)
else
  DEV=cuda
  PROBE_ARGS=(--device cuda --random-llama-7b --tokens 4096 --repeats 3 --no-details)
  COCA_ARGS=(--device cuda --lengths 4096 8192 16384 32768 --backward-max 32768)
  ABLATION_ARGS=(--preset gpu --device cuda --steps 300)
  LIMITS=(20 100 150 120 90)  # 480 s in all: within 8 minutes
fi

SUMMARY=()

# run NAME LIMIT_S HEADLINE_PATTERN COMMAND...: the command's output goes to $LOGS/NAME.log;
# its status, time and the last line matching the pattern go into the summary.
run() {
  local name=$1 limit=$2 pattern=$3
  shift 3
  local log="$LOGS/$name.log" start status verdict headline
  echo "== $name (limit ${limit} s): $*" >&2
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  status=$?
  case $status in
    0) verdict=ok ;;
    124|137) verdict="timed out" ;;
    *) verdict="failed ($status)" ;;
  esac
  headline=$(grep -E -- "$pattern" "$log" | tail -n 1 | tr '|' '/' | cut -c1-160)
  [[ $status -ne 0 && -z "$headline" ]] && headline=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '|' '/' | cut -c1-160)
  SUMMARY+=("| $name | $verdict | $((SECONDS - start)) | ${headline:-} |")
}

run environment "${LIMITS[0]}" 'device' "$PYTHON" - "$DEV" <<'EOF'
import sys

import torch
import transformers

dev = sys.argv[1]
name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}")
print(f"device: {name}")
if dev == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device is visible")
EOF

run gpu-tests "${LIMITS[1]}" '(passed|failed|error|skipped)' \
  "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_probe_memory.py

run probe-7b "${LIMITS[2]}" 'probe / forward' "$PYTHON" benchmarks/probe_speed.py "${PROBE_ARGS[@]}"

run coca "${LIMITS[3]}" '\| (strict|slack) \|' "$PYTHON" benchmarks/coca_speed.py "${COCA_ARGS[@]}"

run ablation "${LIMITS[4]}" 'tok/s' "$PYTHON" -m anomaly.ablation "${ABLATION_ARGS[@]}" \
  --variants rope coca_strict --seeds 1 --set eval.scalings=none --no-probe --no-figures \
  --out "$LOGS/ablation_run"

{
  echo "GPU check ($DEV$( (( DRY_RUN )) && echo ', dry run at tiny sizes')), logs in $LOGS"
  echo
  echo "| step | status | seconds | headline |"
  echo "| --- | --- | ---: | --- |"
  printf '%s\n' "${SUMMARY[@]}"
  for name in environment probe-7b coca ablation; do
    echo
    echo "### $name"
    grep -E '^(\||machine|model|device|torch|CoCA|[0-9]+ tokens|\[.*(/300 |/6 ).*tok/s)' "$LOGS/$name.log" || echo "(no table: see $LOGS/$name.log)"
  done
} | tee "$LOGS/summary.md"

# Non-zero when any step did not succeed, so a caller sees it.
! printf '%s\n' "${SUMMARY[@]}" | grep -qv '| ok |'
