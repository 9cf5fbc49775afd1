#!/usr/bin/env bash
# Issue 13 item 6: the GPU figures in one run, for a machine with an NVIDIA GPU.
#   (a) per-example statistics on CUDA against a plain step (bench/per_example.py),
#   (b) trials per hour with 4 trials per GPU (resources.gpu 0.25) against one (gpu 1)
#       on the default study's models (bench/parallel.py, target >= 3x),
#   (c) the input pipeline's share of a step with the data on the device
#       (bench/input_pipeline.py, target <= 5%).
# Each part has its own time limit so one slow part cannot eat the others' time; figures go
# to $OUT (or bench-gpu/) as JSON beside a log.
#     bash bench/gpu.sh            # from the repository root, after `make install`
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.__version__, torch.version.cuda)" \
    | tee -a "$OUT/gpu.txt" || exit 1
part() {   # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: rc ${PIPESTATUS[0]}"
}
part input_pipeline 120 "$PY" bench/input_pipeline.py --device cuda --json "$OUT/input_pipeline.json"
part per_example 240 "$PY" bench/per_example.py --device cuda --repeats 7 --json "$OUT/per_example.json"
part parallel 420 "$PY" bench/parallel.py --trial-seconds 20 --json "$OUT/parallel.json"
