#!/usr/bin/env bash
# The main job, end to end, until the agent exists: inspect and run the real models
# on real images, then benchmark. Models and images come from $EDGEFLEET_ASSETS
# (default ../shared/assets beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh run
assets=${EDGEFLEET_ASSETS:-../shared/assets}
if [ ! -d "$assets/models" ]; then
  echo "demo.sh: no models at $assets; set EDGEFLEET_ASSETS to the shared assets folder" >&2
  exit 1
fi
m=$assets/models i=$assets/images
ef() { echo "+ edgefleet $*" >&2; .venv/bin/edgefleet "$@"; }

ef model inspect "$m/ssd_mobilenet_v1_coco_quant_postprocess.tflite"
ef model run "$m/ssd_mobilenet_v1_coco_quant_postprocess.tflite" \
  "$i/grace_hopper.bmp" "$i/cat.bmp" "$i/kite_and_cold.jpg" \
  --labels "$m/ssd_mobilenet_v1_coco_labels.txt"
ef model run "$m/mobilenet_v2_1.0_224_quant.tflite" "$i/parrot.jpg" --labels "$m/imagenet_labels.txt" --top-k 3
ef model run "$m/movenet_single_pose_lightning_ptq.tflite" "$i/grace_hopper.bmp"
ef model inspect "$m/mobilenet_v1_0.25_128_quant_edgetpu.tflite"
ef model bench "$m/mobilenet_v2_1.0_224_quant.tflite" --threads 2
