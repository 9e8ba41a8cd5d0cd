#!/usr/bin/env bash
# The embedded default, end to end: set up, generate synthetic metaphases, train, validate, predict.
# Outputs go under ./demo (or $DEMO_DIR). Uses the GPU when there is one, else a short CPU run (~5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${DEMO_DIR:-demo}
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    NUM_TRAIN=200 NUM_VAL=20 EPOCHS=24 BATCH=4 SIZE=(--min-size 576 --max-size 768)
    echo "demo: GPU found: $NUM_TRAIN synthetic images, $EPOCHS epochs"
else
    NUM_TRAIN=12 NUM_VAL=2 EPOCHS=3 BATCH=2 SIZE=(--min-size 256 --max-size 342)
    echo "demo: no GPU: a short CPU run ($NUM_TRAIN small images, $EPOCHS epochs from scratch); expect AP near 0"
fi
rm -rf "$OUT"
echo "== 1/5 synthetic metaphase spreads -> $OUT/data"
$PY tools/synth_metaphase.py --out "$OUT/data" --split train --num-images $NUM_TRAIN --seed 1
$PY tools/synth_metaphase.py --out "$OUT/data" --split val --num-images $NUM_VAL --seed 2
echo "== 2/5 a look at the ground truth -> $OUT/show"
$PY tools/show_dataset.py --data-path "$OUT/data" --split val --out "$OUT/show" --num 1 --no-stats
echo "== 3/5 training Mask R-CNN -> $OUT/train"
$PY train.py --data-path "$OUT/data" --epochs $EPOCHS -b $BATCH "${SIZE[@]}" \
    --output-dir "$OUT/train" --seed 0
echo "== 4/5 validation of the last checkpoint -> $OUT/train/record_mAP.txt"
$PY validation.py --weights-path "$OUT/train/model_$((EPOCHS - 1)).pth" --data-path "$OUT/data" --split val --output-dir "$OUT/train"
echo "== 5/5 prediction on one image -> $OUT/predictions"
$PY predict.py --weights-path "$OUT/train/model_$((EPOCHS - 1)).pth" "$OUT/data/images/val_000000.png" --output-dir "$OUT/predictions"
cat <<DONE

demo finished. Look at:
  $OUT/show/                         ground truth drawn on a synthetic spread
  $OUT/train/det_results.txt         per-epoch COCO box metrics (seg_results.txt: masks)
  $OUT/train/loss_and_lr.png, mAP.png training curves
  $OUT/train/record_mAP.txt          full validation record (also record_mAP.json)
  $OUT/predictions/                  overlay PNG and predictions.json
DONE
