#!/usr/bin/env bash
# The main job, end to end: set up, then (1) the model tools on real models and images,
# (2) the device agent on the kite video with the SSD detector, publishing to a local
# Mosquitto started from the generated config, watched with `edgefleet watch`, stopped
# with SIGTERM as systemd does, (3) an over-the-air model update: a fleet key, a signed
# manifest, a model served over HTTP, deployed through the retained desired state, the
# device validating it, swapping it in and reporting, then a command answered over MQTT.
# Models, images and the video come from $EDGEFLEET_ASSETS (default ../shared/assets
# beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh run
assets=$(cd "${EDGEFLEET_ASSETS:-../shared/assets}" 2>/dev/null && pwd) || {
  echo "demo.sh: no assets at ${EDGEFLEET_ASSETS:-../shared/assets}; set EDGEFLEET_ASSETS" >&2
  exit 1
}
m=$assets/models i=$assets/images
bin=$PWD/.venv/bin
say() { printf '\n== %s\n' "$*" >&2; }
ef() { echo "+ edgefleet $*" >&2; "$bin/edgefleet" "$@"; }

say "1. the model tools"
ef model run "$m/ssd_mobilenet_v1_coco_quant_postprocess.tflite" "$i/grace_hopper.bmp" "$i/cat.bmp" \
  --labels "$m/ssd_mobilenet_v1_coco_labels.txt"
ef model run "$m/mobilenet_v2_1.0_224_quant.tflite" "$i/parrot.jpg" --labels "$m/imagenet_labels.txt" --top-k 3
ef model inspect "$m/mobilenet_v1_0.25_128_quant_edgetpu.tflite"
ef model bench "$m/ssd_mobilenet_v1_coco_quant_postprocess.tflite" --threads 2 --runs 50

say "2. the agent: kite video -> SSD -> events over MQTT"
work=$(mktemp -d)
port=$("$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
# A throwaway broker: memory only (a fleet's keeps retained state in /var/lib/mosquitto),
# plain and anonymous, so the operator commands below pass --insecure (a fleet's broker has
# TLS and client certificates: `edgefleet provision init`, then the operator profile).
ef broker config --port "$port" --allow-anonymous --no-persistence > "$work/mosquitto.conf"
"$mosquitto" -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
broker_pid=$!
agent_pid= http_pid=
cleanup() {
  [ -z "$agent_pid" ] || kill "$agent_pid" 2>/dev/null || true
  [ -z "$http_pid" ] || kill "$http_pid" 2>/dev/null || true
  kill "$broker_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/agent.yaml" <<YAML
device_id: demo-pi
broker: {host: 127.0.0.1, port: $port}
streams:
  - name: yard
    source: {type: file, path: $i/kite_pan_640x480_30fps.mp4, loop: true, realtime: true}
    model:
      path: $m/ssd_mobilenet_v1_coco_quant_postprocess.tflite
      labels: $m/ssd_mobilenet_v1_coco_labels.txt
      threads: 2
    events:
      labels: [person, kite]
      min_score: 0.6
  - name: shelf
    source: {type: file, path: $i/kite_pan_640x480_30fps.mp4, loop: true, realtime: true}
    model:
      path: $m/mobilenet_v1_0.25_128_quant.tflite
      labels: $m/imagenet_labels.txt
      threads: 1
    events: {min_score: 0.5, min_interval_s: 5}
outbox: {path: $work/outbox.sqlite3}
updates: {store_dir: $work/store, trusted_keys: [$work/keys], probation_s: 5}
health: {interval_s: 3}
YAML
ef keys generate "$work/keys"
"$bin/edgefleet-agent" check-config "$work/agent.yaml"
"$bin/edgefleet-agent" run --config "$work/agent.yaml" 2> "$work/agent.log" &
agent_pid=$!
echo "(each event line: stream, model, then what it saw; '#N' is the track id, one per object followed across frames)" >&2
ef watch --insecure --host 127.0.0.1 --port "$port" --seconds 10

say "3. an over-the-air update of the shelf stream: mobilenet_v1 0.25 -> mobilenet_v2"
http_port=$("$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/python" -m http.server --bind 127.0.0.1 --directory "$m" "$http_port" > "$work/http.log" 2>&1 &
http_pid=$!
ef manifest create "$m/mobilenet_v2_1.0_224_quant.tflite" --model-id shelf-classifier --version 2 \
  --url "http://127.0.0.1:$http_port/mobilenet_v2_1.0_224_quant.tflite" --key "$work/keys/fleet.key" \
  --allow-slower --out "$work/shelf-v2.json"  # a deliberate upgrade to a 16x bigger model
ef deploy demo-pi shelf "$work/shelf-v2.json" --insecure --host 127.0.0.1 --port "$port"
echo "(the update's states: verifying, downloading, validating, activating, probation, then committed, refused or rolled_back)" >&2
ef watch --insecure --host 127.0.0.1 --port "$port" --seconds 12 | grep -E 'reported:|/shelf event' || true
ef cmd demo-pi list_models --insecure --host 127.0.0.1 --port "$port"
kill -TERM "$agent_pid"
wait "$agent_pid" && echo "agent stopped cleanly (SIGTERM, exit 0)" >&2
agent_pid=
say "agent log"
cat "$work/agent.log" >&2
