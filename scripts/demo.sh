#!/usr/bin/env bash
# The main job, end to end, on one machine:
#
#   scripts/demo.sh [--for SECONDS]
#
# Set up; (1) the model tools on real models and images; (2) a fleet: a Mosquitto started
# from the generated config, the fleet controller (registry, releases, rollouts, HTTP API),
# three device agents on the kite video, their live events; (3) a staged rollout: two
# releases signed on the operator's side, the new one rolled out in waves 1 then the rest,
# each wave's decision and the devices' models printed as they change; then everything
# stopped (SIGTERM, as systemd does). --for SECONDS keeps the fleet running that long
# after the rollout (default 0); Ctrl-C stops it at any point, cleaning up. Models, images
# and the video come from $EDGEFLEET_ASSETS (default ../shared/assets beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
linger=0
while [ $# -gt 0 ]; do
  case $1 in
    --for) linger=${2:?--for SECONDS}; shift ;;
    *) echo "demo.sh: unknown argument '$1' (usage: scripts/demo.sh [--for SECONDS])" >&2; exit 2 ;;
  esac
  shift
done
scripts/bootstrap.sh run
assets=$(cd "${EDGEFLEET_ASSETS:-../shared/assets}" 2>/dev/null && pwd) || {
  echo "demo.sh: no assets at ${EDGEFLEET_ASSETS:-../shared/assets}; set EDGEFLEET_ASSETS" >&2
  exit 1
}
m=$assets/models i=$assets/images
bin=$PWD/.venv/bin
say() { printf '\n== %s\n' "$*" >&2; }
ef() { echo "+ edgefleet $*" >&2; "$bin/edgefleet" "$@"; }
free_port() { "$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

say "1. the model tools"
ef model run "$m/ssd_mobilenet_v1_coco_quant_postprocess.tflite" "$i/grace_hopper.bmp" "$i/cat.bmp" \
  --labels "$m/ssd_mobilenet_v1_coco_labels.txt"
ef model run "$m/mobilenet_v2_1.0_224_quant.tflite" "$i/parrot.jpg" --labels "$m/imagenet_labels.txt" --top-k 3
ef model run "$m/yolov8n_coco_float.tflite" "$i/kite_and_cold.jpg" --labels "$m/coco80_labels.txt"
ef model run "$m/deeplabv3_mnv2_pascal_quant.tflite" "$i/dog_segmentation.bmp" \
  --labels "$m/pascal_voc_segmentation_labels.txt"
ef model run "$m/mediapipe_face_detection_short_range.tflite" "$i/astronaut.png"
ef model inspect "$m/mobilenet_v1_0.25_128_quant_edgetpu.tflite"
ef model bench "$m/ssd_mobilenet_v1_coco_quant_postprocess.tflite" --threads 2 --runs 50

say "2. a fleet: a broker, the controller, three agents on the kite video"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "demo.sh: interrupted, stopping the fleet" >&2; exit 130' INT TERM
port=$(free_port) api_port=$(free_port)
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
# A throwaway broker: memory only, plain and anonymous, so the operator commands pass
# --insecure and the controller reads it without a certificate (a fleet's broker has TLS
# and client certificates: `edgefleet provision init`, then the operator profile).
ef broker config --port "$port" --allow-anonymous --no-persistence > "$work/mosquitto.conf"
"$mosquitto" -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
pids+=($!)
mkdir -p "$work/controller"
token=$("$bin/edgefleet" controller token demo --tokens-file "$work/controller/tokens.txt")
export EDGEFLEET_CONTROLLER=http://127.0.0.1:$api_port EDGEFLEET_TOKEN=$token
cat > "$work/controller/controller.yaml" <<YAML
database: controller.sqlite3
broker: {host: 127.0.0.1, port: $port, insecure: true}
releases_dir: releases
http: {host: 127.0.0.1, port: $api_port, tokens_file: tokens.txt}
rollout_interval_s: 1
YAML
"$bin/edgefleet" controller run --config "$work/controller/controller.yaml" \
  > "$work/controller.out" 2> "$work/controller.log" &
pids+=($!)
ef keys generate "$work/keys"
for device in shop-1 shop-2 shop-3; do
  mkdir -p "$work/$device"
  cat > "$work/$device/agent.yaml" <<YAML
device_id: $device
broker: {host: 127.0.0.1, port: $port}
streams:
  - name: shelf
    source: {type: file, path: $i/kite_pan_640x480_30fps.mp4, loop: true, realtime: true}
    model:
      path: $m/mobilenet_v1_0.25_128_quant.tflite
      labels: $m/imagenet_labels.txt
      threads: 1
    events: {min_score: 0.3, min_interval_s: 4}
outbox: {path: $work/$device/outbox.sqlite3}
updates: {store_dir: $work/$device/store, trusted_keys: [$work/keys], probation_s: 5}
health: {interval_s: 2}
YAML
  "$bin/edgefleet-agent" check-config "$work/$device/agent.yaml"
  "$bin/edgefleet-agent" run --config "$work/$device/agent.yaml" 2> "$work/$device/agent.log" &
  pids+=($!)
done
echo "(each event line: device/stream, model, what it saw)" >&2
ef watch --insecure --host 127.0.0.1 --port "$port" --seconds 8 | grep -E ' event[ :]' || true
ef devices list

say "3. a staged rollout: mobilenet_v1 0.25 -> mobilenet_v2 on the shelf streams"
# Both releases signed here, on the operator's side: v1 is what the devices run (the way
# back), v2 a deliberate upgrade to a 16x bigger model (--allow-slower, and a latency gate
# that allows it); the controller serves their bytes and never holds the key.
ef release create "$m/mobilenet_v1_0.25_128_quant.tflite" --model-id shelf --version 1 \
  --store "$work/controller/releases" --key "$work/keys/fleet.key" --url-base "$EDGEFLEET_CONTROLLER"
ef release create "$m/mobilenet_v2_1.0_224_quant.tflite" --model-id shelf --version 2 --allow-slower \
  --store "$work/controller/releases" --key "$work/keys/fleet.key" --url-base "$EDGEFLEET_CONTROLLER"
rollout=$(ef rollout start shelf@2 --to all --stream shelf --waves 1,100% --soak 5s \
  --gate 'latency_p99<=+5000%' --release-key "$work/keys/fleet.key" --json | "$bin/python" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "(the controller steps the rollout every second: wave 1 is one device; the rest follow once it commits and its gates pass)" >&2
shown=0 status=running
for _ in $(seq 180); do
  report=$("$bin/edgefleet" rollout status "$rollout")
  decisions=$(printf '%s\n' "$report" | sed -n '/^decisions/,/^devices/p' | grep '^  ' || true)
  count=$(printf '%s' "$decisions" | grep -c . || true)
  if [ "$count" -gt "$shown" ]; then
    printf '%s\n' "$decisions" | tail -n +"$((shown + 1))"
    shown=$count
  fi
  status=$(printf '%s\n' "$report" | sed -n '1s/.*(\(.*\))$/\1/p')
  case $status in running|paused) sleep 1 ;; *) break ;; esac
done
ef rollout status "$rollout"
ef devices list
ef audit
echo "the controller's API: $EDGEFLEET_CONTROLLER (docs/openapi.json; the token is in EDGEFLEET_TOKEN above)" >&2
if [ "$linger" -gt 0 ]; then
  say "the fleet keeps running for $linger s (Ctrl-C stops it)"
  ef watch --insecure --host 127.0.0.1 --port "$port" --seconds "$linger" | grep -E ' event[ :]' || true
fi
say "stopping the fleet (SIGTERM, as systemd does)"
cleanup
trap - EXIT
[ "$status" = completed ] || { echo "demo.sh: the rollout ended $status" >&2; exit 1; }
echo "demo.sh: done" >&2
