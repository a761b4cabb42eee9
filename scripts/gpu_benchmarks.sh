#!/usr/bin/env bash
# One prepared GPU run for a session that is lent a device: the CUDA op tests, then the op and UNI-2
# backbone benchmarks next to the paper's table 1. Needs torch, timm and mmengine (+ pytest); the
# OpenMMLab stack is not needed for these (see README, "Without MMSegmentation").
#   usage: OUT=results_dir scripts/gpu_benchmarks.sh      (about 10 min on one H200)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-work_dirs/gpu}"
PY="${PY:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
run() { echo "==> $*"; "$@" || { echo "!!! failed ($?): $*"; status=1; }; }

run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run "$PY" -m pytest -q -rs tests/test_sparse_attention_cuda.py
# The op at UNI-2 shapes (24 heads x 64, 9 global tokens): 1344 px and 3430 px / patch 14.
run "$PY" tools/benchmark_attention.py --device cuda --heads 24 --head-dim 64 --num-global 9 \
    --grids 96x96 245x245 --methods dense gather flex --keep 1.0 0.4 --json "$OUT/attention.json"
# Full UNI-2 backbone, paper resolutions (table 1), bf16 autocast as in feature extraction.
run "$PY" tools/benchmark_backbone.py --arch uni2-h --device cuda --precision amp-bf16 --repeats 3 --warmup 1 \
    --sizes 224 448 896 1344 --modes vanilla dense sparse sparse+prune --out-dir "$OUT/uni2_backbone"
# Largest input that fits in 80 GB per mode (the paper: dense 1400 px, sparse + pruning 3430 px).
run "$PY" tools/benchmark_backbone.py --arch uni2-h --device cuda --precision amp-bf16 --repeats 1 --warmup 1 \
    --sizes 1344 --modes vanilla sparse+prune --max-memory 80 --search-max-size 3500 --out-dir "$OUT/uni2_max"
exit $status
