#!/usr/bin/env bash
# One pretraining, several edge sizes, on the bundled demo images (about 4 minutes on 2 CPU cores):
#   pretrain --widths -> per-width report -> slim one width -> export it (fp32 + fp16) -> device check
#   -> the other route: prune a single-width run and recover it.
# Run from the repository root after `pip install -e ".[all]"`:  bash examples/widths.sh [run dir]
set -euo pipefail
RUN=${1:-runs/widths}
DEMO=$(python -c "from edgessl.demo import demo_images; print(demo_images())")

echo "== 1. pretrain one weight-sharing network at widths 1, 0.5 and 0.25 (report: widths.json, widths.png)"
edgessl pretrain --backbone mobilenetv3_small --out "$RUN" --epochs 20 --widths 1.0,0.5,0.25 --quiet
python -c "import json; [print(f\"width {e['width']:g}: {e['params']/1e6:.2f} M params, {e['macs']/1e6:.1f} M MACs, {e['latency_ms']:.2f} ms, kNN {e['knn_top1']:.3f}\") for e in json.load(open('$RUN/widths.json'))]"

echo "== 2. the width-0.5 sub-network as a standalone, physically smaller timm model"
edgessl slim "$RUN" --width 0.5

echo "== 3. export it to ONNX (fp32 + fp16) with the parity check, then the on-device check"
edgessl export "$RUN" --width 0.5 --fp16
python export/device_check.py "$RUN/width-0.5/export/encoder.onnx" --manifest "$RUN/width-0.5/export/manifest.json" \
    --images "$DEMO" --json "$RUN/width-0.5/export/device_check.json"

echo "== 4. the other route: prune the full width by half, recover for 5 epochs (report: pruned-0.5/widths.json)"
edgessl prune "$RUN" --ratio 0.5 --epochs 5 --quiet
