#!/usr/bin/env bash
# Gathers into .device/ (git-ignored) what benchmarks/device_check.sh needs on a bare GPU box that
# cannot download anything: SmolLM2's tokenizer, the benchmark data, and wheels of what that box
# lacks (TRL and datasets with the two datasets needs it misses). Run it here, then carry .device.
#
#   bash benchmarks/prepare_device.sh [path/to/alpaca_en_demo.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:-../shared/data/alpaca_en_demo.json}
rm -rf .device && mkdir -p .device/wheels

# The tokenizer of the embedded model (converted once, cached under .sft-cache).
"$PY" - <<'PY'
from transformers import AutoTokenizer
from tasks.model import import_model
model = import_model("embedded:smollm2-135m-instruct", ".sft-cache")
AutoTokenizer.from_pretrained(model.uri).save_pretrained(".device/tokenizer")
PY
cp "$DATA" .device/alpaca_en_demo.json

# The GPU image runs Python 3.12; pins are the versions this venv resolved.
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
for name in trl datasets dill multiprocess; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels "$name==$(version $name)"
done
du -sh .device
