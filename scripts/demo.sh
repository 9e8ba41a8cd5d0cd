#!/usr/bin/env bash
# The embedded default, end to end: set up, generate synthetic metaphases, train, validate, predict on a spread the
# model never saw (and on a real BioImLab image when ../shared/data/bioimlab is there).
# Outputs go under ./demo (or $DEMO_DIR). Uses the GPU when there is one, else a CPU run of about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${DEMO_DIR:-demo}
REAL=../shared/data/bioimlab/labelme/val
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # whole 768x576 spreads (the scale of BioImLab), ResNet-50, 24 epochs of 200 images
    NUM_TRAIN=200 NUM_VAL=20 EPOCHS=24 BATCH=4 SYNTH_SIZE=768x576
    MODEL=(--backbone resnet50 --min-size 576 --max-size 768)
    echo "demo: GPU found: $NUM_TRAIN synthetic 768x576 spreads, ResNet-50, $EPOCHS epochs"
else
    # half-scale 384x288 spreads at their own size (no upscaling), a ResNet-18, anchors and sampled RoIs sized for
    # small chromosomes: ~160 steps of 2 images, about 8 of the 10 minutes
    NUM_TRAIN=32 NUM_VAL=4 EPOCHS=10 BATCH=2 SYNTH_SIZE=384x288
    MODEL=(--backbone resnet18 --min-size 288 --max-size 384 --anchor-sizes 8 16 32 64 128 --rois-per-image 32
           --lr 0.02 --warmup-iters 20 --workers 1)
    echo "demo: no GPU: a CPU run ($NUM_TRAIN synthetic 384x288 spreads, ResNet-18, $EPOCHS epochs; about 10 minutes on 2 cores)"
fi
LAST=$((EPOCHS - 1))
rm -rf "$OUT"
phase() { echo "== $1  (${SECONDS} s so far)"; }
phase "1/5 synthetic metaphase spreads -> $OUT/data"
$PY tools/synth_metaphase.py --out "$OUT/data" --split train --num-images $NUM_TRAIN --seed 1 --size $SYNTH_SIZE
$PY tools/synth_metaphase.py --out "$OUT/data" --split val --num-images $NUM_VAL --seed 2 --size $SYNTH_SIZE
phase "2/5 a look at the ground truth -> $OUT/show"
$PY tools/show_dataset.py --data-path "$OUT/data" --split val --out "$OUT/show" --num 1 --no-stats
phase "3/5 training Mask R-CNN -> $OUT/train"
$PY train.py --data-path "$OUT/data" --epochs $EPOCHS -b $BATCH "${MODEL[@]}" --eval-interval $EPOCHS \
    --output-dir "$OUT/train" --seed 0
phase "4/5 validation on the $NUM_VAL unseen synthetic spreads -> $OUT/train/record_mAP.txt"
$PY validation.py --weights-path "$OUT/train/model_$LAST.pth" --data-path "$OUT/data" --split val --output-dir "$OUT/train"
phase "5/5 prediction on an unseen spread -> $OUT/predictions"
$PY predict.py --weights-path "$OUT/train/model_$LAST.pth" "$OUT/data/images/val_000000.png" --output-dir "$OUT/predictions"
REAL_LINE=""
if [ -d "$REAL" ]; then
    FIRST_REAL=$(ls "$REAL"/*.json | head -n 1)
    phase "5b/5 a real BioImLab image ($(basename "$FIRST_REAL")), never trained on -> $OUT/real"
    $PY tools/labelme2coco.py "$FIRST_REAL" --out "$OUT/real/data" --split val
    $PY validation.py --weights-path "$OUT/train/model_$LAST.pth" --data-path "$OUT/real/data" --split val \
        --output-dir "$OUT/real"
    $PY predict.py --weights-path "$OUT/train/model_$LAST.pth" "$OUT/real/data/images" --output-dir "$OUT/real/predictions"
    REAL_LINE="  $OUT/real/predictions/              the same model on a real BioImLab metaphase (record_mAP.txt: its scores)"
fi
ap() { $PY -c "import json, sys; r = json.load(open(sys.argv[1])); s = r['segm']
print(f\"mask AP {s['AP']:.3f}  AP50 {s['AP50']:.3f}  F1 {s['f1']:.3f}  count error {r['count_mae']:.1f} per image\")" "$1"; }
cat <<DONE

demo finished in ${SECONDS} s.
  unseen synthetic spreads:  $(ap "$OUT/train/record_mAP.json")
$( [ -d "$REAL" ] && echo "  one real BioImLab image:   $(ap "$OUT/real/record_mAP.json")" )
Look at:
  $OUT/predictions/val_000000_pred.png   the model's chromosomes on a spread it never saw (masks, boxes, scores)
  $OUT/show/                         the ground truth of the same spread, drawn
  $OUT/train/det_results.txt         COCO box metrics (seg_results.txt: masks)
  $OUT/train/loss_and_lr.png, mAP.png training curves
  $OUT/train/record_mAP.txt          full validation record (also record_mAP.json)
$REAL_LINE
DONE
