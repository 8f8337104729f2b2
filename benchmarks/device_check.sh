#!/usr/bin/env bash
# The train stage's GPU checks, as two calls that each fit one device command (under 8 minutes),
# on a box with only torch, transformers, accelerate, peft and pytest installed (prepare .device/
# first with benchmarks/prepare_device.sh and carry it):
#
#   bash benchmarks/device_check.sh small [out]   # tests/test_gpu.py, then SmolLM2-135M: ours (defaults:
#                                                 # compile auto), ours compile on, TRL defaults, TRL best
#   bash benchmarks/device_check.sh large [out]   # Llama 1.7B: ours compile on vs TRL best compile on
#
# Every benchmark row is its own process under `timeout`, and the call stops starting rows once
# its deadline (DEADLINE seconds: 270 small, 330 large) is near, so a hang or a slow row still leaves the
# rows measured before it: each is printed as it ends and appended to $out/<call>-<shape>.jsonl, and the
# table of the call is printed last. Writes logs and tables to $out (default $OUT or /tmp/device-check).
#
# DRY_RUN=1 runs the same calls on a CPU with the tiny shape and a few steps (the timing check).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: device_check.sh small|large [out-folder]}
out=${2:-${OUT:-/tmp/device-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PY:-python3}
started=$(date +%s)
# Two calls plus the machine's start (minutes) fit a 15-minute device budget: 270 s for the small
# call, 330 s for the large one (the table and a killed row's 10 s grace come on top).
deadline=${DEADLINE:-$([ "$part" = large ] && echo 330 || echo 270)}
row_timeout=${ROW_TIMEOUT:-240}
status=0  # non-zero when the GPU tests or a row failed: the call says so

# The carried wheels (TRL, datasets, pyarrow) go under the interpreter's prefix when it is writable:
# dill, which datasets uses to fingerprint a dataset, pickles modules from anywhere else by value,
# and pyarrow's types cannot be (the TRL rows then fail in Dataset.from_dict).
if ! "$PY" -c "import trl, datasets" 2>/dev/null && ls .device/wheels/*.whl >/dev/null 2>&1; then
  site=$("$PY" -c "import sys; print(sys.prefix)")/sft-device-site
  mkdir -p "$site" 2>/dev/null && [ -w "$site" ] || { site=/tmp/site; echo "warning: $site is outside the prefix; TRL rows may fail"; }
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .device/wheels/*.whl; then
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "error: the carried wheels did not install (built for another Python? see DEVICE_PYTHON in prepare_device.sh): TRL rows will fail"
  fi
fi
tokenizer=() data=()
[ -d .device/tokenizer ] && tokenizer=(--tokenizer .device/tokenizer)
[ -f .device/alpaca_en_demo.json ] && data=(--data .device/alpaca_en_demo.json)

left() { echo $((deadline - ($(date +%s) - started))); }

# bench ROWS... : one process per row, each under the smaller of row_timeout and the time left.
bench() {
  local shape=$1 steps=$2; shift 2
  local table="$out/$part-$shape.jsonl"
  : >"$table"  # this call's rows only: the ratios compare with its own first row of ours
  for row in "$@"; do
    local run=${row%%:*} compile=${row#*:}
    local remaining=$(left)
    local budget=$(( remaining < row_timeout ? remaining : row_timeout ))
    if [ "$remaining" -lt 30 ]; then
      echo "skipped $shape $row: ${remaining}s left of the ${deadline}s deadline" | tee -a "$out/skipped.txt"
      status=1
      continue
    fi
    local flags=(--runs "$run")
    [ "$run" = ours ] && [ "$compile" != auto ] && flags+=(--compile "$compile")
    [ "$run" = trl-best ] && flags+=(--trl-compile "${compile/auto/on}")
    echo "== $shape $row (timeout ${budget}s)"
    timeout --kill-after=10 "$budget" "$PY" -m benchmarks.bench_train --shape "$shape" --steps "$steps" "${flags[@]}" \
      --model-dir "/tmp/bench-model-$shape" --out "$table" "${tokenizer[@]}" "${data[@]}" ${BENCH_ARGS:-} \
      >"$out/bench-$shape-$run-$compile.log" 2>&1
    local code=$?
    [ "$code" -eq 0 ] || status=1
    echo "   exit $code after $(( $(date +%s) - started ))s"
    grep '^| ours\|^| TRL' "$out/bench-$shape-$run-$compile.log" | tail -1
  done
  [ -s "$table" ] && "$PY" -m benchmarks.bench_train --table "$table" | tee "$out/$part-$shape.md"
}

if [ -n "${DRY_RUN:-}" ]; then
  small=(tiny 8) large=(tiny 8)
  BENCH_ARGS="--records 64 --micro-batch 2 --threads 2 ${BENCH_ARGS:-}"
else
  small=(smollm2-135m 60) large=(llama-1.7b 40)
fi

case "$part" in
  small)
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$out/versions.txt"
    timeout 150 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider >"$out/test_gpu.log" 2>&1 || status=1
    tail -3 "$out/test_gpu.log"
    bench "${small[@]}" ours:auto ours:on trl-defaults:auto trl-best:on
    ;;
  large)
    bench "${large[@]}" ours:on trl-best:on ours:auto
    ;;
  *) echo "usage: device_check.sh small|large [out-folder]" >&2; exit 2 ;;
esac
echo "call took $(( $(date +%s) - started ))s, status $status"
exit "$status"
