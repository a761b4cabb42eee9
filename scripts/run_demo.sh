#!/usr/bin/env bash
# The README's main job on embedded demo data, end to end on CPU (4-7 min on 2 cores):
# generate SegPath-layout tiles -> train the demo ViT-Adapter + Mask2Former with dense and with
# windowed sparse attention -> test each saved checkpoint -> print the MPA / IoU / Dice table ->
# segment a generated whole-slide image with the sparse checkpoint (docs/whole_slide.md).
#   usage: scripts/run_demo.sh [WORK_DIR]   (default work_dirs/demo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK_DIR="${1:-work_dirs/demo}"
PY="${PY:-$ROOT/.venv/bin/python}"
DATA_ROOT=data/segpath_demo   # the path the demo configs read

echo "==> [demo] generating SegPath-layout demo tiles in $DATA_ROOT"
"$PY" tools/make_demo_data.py "$DATA_ROOT"

for mode in dense sparse; do
  config="configs/demo/mask2former_tiny-${mode}-adapter_1xb4-300_segpath-demo-112x112.py"
  run_dir="$WORK_DIR/$mode"
  echo "==> [demo] training $config"
  "$PY" tools/train.py "$config" --work-dir "$run_dir"
  checkpoint="$(cat "$run_dir/last_checkpoint")"
  echo "==> [demo] testing $checkpoint"
  "$PY" tools/test.py "$config" "$checkpoint" --work-dir "$run_dir" --show-dir "$run_dir/vis" --tag "$mode"
done

echo "==> [demo] summary (percent; prediction overlays under $WORK_DIR/*/vis)"
"$PY" tools/summarize_segpath.py "$WORK_DIR" --md "$WORK_DIR/summary.md" --csv "$WORK_DIR/summary.csv"

slide="data/demo_slide/demo_panCK.tiff"
slide_dir="$WORK_DIR/slide"
sparse_config="configs/demo/mask2former_tiny-sparse-adapter_1xb4-300_segpath-demo-112x112.py"
echo "==> [demo] whole-slide inference: generating $slide, segmenting it into $slide_dir"
"$PY" tools/make_demo_slide.py "$slide" --mask-png "${slide%.tiff}_mask.png"
"$PY" tools/infer_slide.py "$sparse_config" "$(cat "$WORK_DIR/sparse/last_checkpoint")" "$slide" \
  --out-dir "$slide_dir" --tile-size 224 --overlap 28 --workers 2
stem="$(basename "${slide%.*}")"
echo "==> [demo] whole-slide outputs:"
echo "    overlay  $slide_dir/$stem.overlay.png"
echo "    TIFF     $slide_dir/$stem.classes.tiff   (pyramidal class map; OpenSlide / QuPath open it)"
echo "    GeoJSON  $slide_dir/$stem.geojson        (QuPath: File > Import objects)"
echo "    summary  $slide_dir/$stem.summary.json"
