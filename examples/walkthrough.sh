#!/usr/bin/env bash
# End to end on the bundled demo images (360 emoji, 9 categories), about 5 minutes on 2 CPU cores:
#   pretrain -> eval (vs random init) -> finetune -> export (fp32 + int8) -> device check.
# Run from the repository root after `pip install -e ".[all]"`:  bash examples/walkthrough.sh [run dir]
set -euo pipefail
RUN=${1:-runs/walkthrough}
DEMO=$(python -c "from edgessl.demo import demo_images; print(demo_images())")

echo "== 1. pretrain (no --data: the bundled demo images)"
edgessl pretrain --backbone mobilenetv3_small --out "$RUN" --epochs 20 --quiet

echo "== 2. few-label evaluation against a random-init encoder (30% of each class held out as test)"
edgessl eval "$RUN" --train "$DEMO" --test-fraction 0.3 --labels-per-class 1,5,10,all --seeds 3 --baseline random

echo "== 3. fine-tune a classifier on 10 labels per class"
edgessl finetune "$RUN" --train "$DEMO" --test-fraction 0.3 --labels-per-class 10 --quiet
cat "$RUN/finetune-lpc10/metrics.json" | python -c "import json,sys; m=json.load(sys.stdin); print(f\"fine-tuned test top-1 {m['top1']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}\")"

echo "== 4. export encoder and classifier to ONNX, fp32 and int8 (calibrated on the demo images)"
edgessl export "$RUN" --int8
edgessl export "$RUN" --classifier "$RUN/finetune-lpc10" --int8

echo "== 5. on-device check (needs only onnxruntime, numpy, Pillow): latency, size, memory, agreement"
python export/device_check.py "$RUN/export/encoder.int8.onnx" --manifest "$RUN/export/manifest.json" \
    --images "$DEMO" --json "$RUN/export/device_check.json"
