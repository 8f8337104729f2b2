#!/usr/bin/env bash
# The train stage's GPU checks in one command, on a box with only torch, transformers, accelerate,
# peft and pytest installed (prepare .device/ first with benchmarks/prepare_device.sh):
#   1. tests/test_gpu.py: bf16, flex attention forward and backward, fused AdamW, compile;
#   2. bench_train on the SmolLM2-135M shape, then on the 1.7B Llama shape: ours (defaults) vs
#      TRL defaults and TRL's best flags, side by side, each with and without compilation.
# Writes logs and the benchmark tables to $OUT (or the folder given).
#
#   bash benchmarks/device_check.sh [out-folder]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/device-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if ! python3 -c "import trl, datasets" 2>/dev/null && ls .device/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$out/versions.txt"

python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/test_gpu.log"

# shape:steps pairs; BENCH="tiny:3" tries the script on a CPU.
for run in ${BENCH:-smollm2-135m:60 llama-1.7b:40}; do
  for compile in off on; do
    python3 -m benchmarks.bench_train --shape "${run%%:*}" --steps "${run##*:}" --compile "$compile" ${BENCH_ARGS:-} \
      --tokenizer .device/tokenizer --data .device/alpaca_en_demo.json 2>&1 | tee "$out/bench-${run%%:*}-compile-$compile.log"
  done
done
