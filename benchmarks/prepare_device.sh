#!/usr/bin/env bash
# Gathers into .device/ (git-ignored) what benchmarks/device_check.sh needs on a bare GPU box that
# cannot download anything: SmolLM2's tokenizer, the benchmark data, and wheels of what that box
# lacks (TRL, and datasets with what it needs that the image misses or has too old). Run it here,
# then carry .device (under the device tool's 64 MiB a call).
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

# The GPU image runs Python 3.12 (DEVICE_PYTHON); pins are the versions this venv resolved. pyarrow
# travels too: datasets needs a newer one than the image may have.
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
for name in trl datasets dill multiprocess pyarrow; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels "$name==$(version $name)"
done
du -sh .device
