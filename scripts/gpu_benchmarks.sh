#!/usr/bin/env bash
# One prepared GPU run for a session that is lent a device: the CUDA op tests, then the op and UNI-2
# backbone benchmarks next to the paper's table 1, and UNI-2 segmentor train steps next to its table 4.
# The op and backbone parts need torch, timm and mmengine (+ pytest); the segmentor part needs the OpenMMLab
# stack (mmcv with its CUDA ops, mmseg, mmdet; see README).
#   usage: OUT=results_dir scripts/gpu_benchmarks.sh      (about 15 min on one H200)
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
# Every pathology preset's own attention at 1344 px (docs/foundation_models.md, "op benchmark" column).
run "$PY" tools/benchmark_attention.py --device cuda --archs uni uni2-h virchow virchow2 h-optimus-0 gigapath \
    phikon phikon-v2 hibou-b --image-size 1344 --methods dense auto --json "$OUT/attention_presets.json"
# Full UNI-2 backbone, paper resolutions (table 1), bf16 autocast as in feature extraction.
run "$PY" tools/benchmark_backbone.py --arch uni2-h --device cuda --precision amp-bf16 --repeats 3 --warmup 1 \
    --sizes 224 448 896 1344 --modes vanilla dense sparse sparse+prune --out-dir "$OUT/uni2_backbone"
# Largest input that fits in 80 GB per mode (the paper: dense 1400 px, sparse + pruning 3430 px).
run "$PY" tools/benchmark_backbone.py --arch uni2-h --device cuda --precision amp-bf16 --repeats 1 --warmup 1 \
    --sizes 1344 --modes vanilla sparse+prune --max-memory 80 --search-max-size 3500 --out-dir "$OUT/uni2_max"
# Full UNI-2 segmentor (SegPath config, adapter + Mask2Former), one train step at batch 1: dense vs sparse vs sparse
# with the memory levers (checkpointing of ViT blocks, adapter interactions and pixel-decoder layers, bf16
# AmpOptimWrapper: the -cp-bf16 configs), next to
# the paper's table 4 (A100 80 GB, batch not stated; training memory at 560 px).
SEGPATH_CFG=configs/segpath/panCK/mask2former_uni2-h-sparse-w8-adapter_1xb4-20k_segpath-panCK-560x560.py
run "$PY" tools/benchmark_segmentor.py "$SEGPATH_CFG" --device cuda --sizes 560 1120 --phases train \
    --settings dense sparse sparse:vit-cp,adapter-cp,decoder-cp,bf16 --warmup 1 --repeats 2 --out-dir "$OUT/uni2_segmentor"
mkdir -p "$OUT/uni2_segmentor"
cat > "$OUT/uni2_segmentor/paper_table4.md" <<'TABLE'
Paper, table 4 (UNI-2 + ViT-Adapter + Mask2Former, A100 80 GB, training memory):

| px | dense (GB) | sparse w8 (GB) |
| --- | --- | --- |
| 560 | 60.03 | 52.55 |
TABLE
[ -f "$OUT/uni2_segmentor/segmentor.md" ] && cat "$OUT/uni2_segmentor/paper_table4.md" "$OUT/uni2_segmentor/segmentor.md"
exit $status
