#!/usr/bin/env bash
# Install, upgrade and purge the edgefleet package in a clean Debian root, as root:
#
#   packaging/check-deb.sh OLD.deb NEW.deb [ROOT]
#
# ROOT (default build/debian-root) is made with `debootstrap --variant=minbase bookworm`
# when it does not exist (Debian package debootstrap; it downloads Debian's packages) and
# is copied first, so every run starts clean. In a chroot there is no systemd as PID 1:
# the maintainer scripts must work without it (the services are enabled, not started).
# It prints each step, `edgefleet-agent --version` and `check-config` run from the
# installed tree, that the upgrade kept /etc/edgefleet and the model store, and the files
# purge left behind against the root before the install. Exit 0 when every check holds.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "check-deb.sh: run as root (dpkg and chroot)" >&2; exit 1; }
old=$(realpath "${1:?usage: check-deb.sh OLD.deb NEW.deb [ROOT]}")
new=$(realpath "${2:?usage: check-deb.sh OLD.deb NEW.deb [ROOT]}")
cd "$(dirname "$0")/.."
base=${3:-build/debian-root}
assets=$(cd "${EDGEFLEET_ASSETS:-../shared/assets}" && pwd)
if [ ! -d "$base" ]; then
  command -v debootstrap >/dev/null || { echo "check-deb.sh: apt install debootstrap" >&2; exit 1; }
  debootstrap --variant=minbase --include=python3,python3-venv,adduser,init-system-helpers \
    bookworm "$base" http://deb.debian.org/debian
fi
scratch=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-deb.XXXXXX")
root=$scratch/root
cleanup() { umount "$root/proc" 2>/dev/null || true; rm -rf "$scratch"; }
trap cleanup EXIT
mkdir "$root" && cp -a "$base/." "$root/"
mount -t proc proc "$root/proc"
# A clean environment: nothing of this machine's (pip settings, PATH) reaches the root.
in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$root" "$@"; }
step() { printf '\n== %s\n' "$*"; }
fail() { echo "check-deb.sh: FAILED: $*" >&2; exit 1; }
snapshot() {  # every file outside dpkg's own records, with its sha256
  (cd "$root" && find etc opt usr var lib -xdev \( -path var/lib/dpkg -o -path var/log \
     -o -path var/cache -o -path var/lib/apt \) -prune -o -type f -print0 | sort -z |
     xargs -0 sha256sum; find etc opt usr var lib -xdev -type l -printf '%p -> %l\n' | sort)
}

snapshot > "$scratch/before"
mkdir -p "$root/tmp/check/frames"
cp "$old" "$new" "$root/tmp/check/"
cp "$assets/models/mobilenet_v1_0.25_128_quant.tflite" "$assets/models/imagenet_labels.txt" "$root/tmp/check/"
cp "$assets/images/parrot.jpg" "$root/tmp/check/frames/"
cat > "$root/tmp/check/agent.yaml" <<YAML
device_id: check-deb
broker: {host: 127.0.0.1, port: 1883}
streams:
  - name: shelf
    source: {type: images, folder: /tmp/check/frames}
    model: {path: /tmp/check/mobilenet_v1_0.25_128_quant.tflite, labels: /tmp/check/imagenet_labels.txt}
outbox: {path: /var/lib/edgefleet/outbox.sqlite3}
updates: {store_dir: /var/lib/edgefleet/store, trusted_keys: [/etc/edgefleet/fleet-keys]}
YAML

step "install $(basename "$old")"
in_root dpkg -i "/tmp/check/$(basename "$old")"
step "from the installed tree"
in_root /usr/bin/edgefleet-agent --version
in_root /opt/edgefleet/bin/edgefleet --version
in_root /opt/edgefleet/bin/edgefleet-agent check-config /etc/edgefleet/agent/agent.yaml \
  && fail "the example config passed check-config: it names a broker and camera no one has" \
  || echo "(the example config is refused, as it should be until it is edited: exit $?)"
in_root install -m 0640 -o edgefleet -g edgefleet /tmp/check/agent.yaml /etc/edgefleet/agent/agent.yaml
in_root mkdir -p /etc/edgefleet/fleet-keys
in_root /opt/edgefleet/bin/edgefleet-agent check-config /etc/edgefleet/agent/agent.yaml
in_root /opt/edgefleet/bin/edgefleet model run /tmp/check/mobilenet_v1_0.25_128_quant.tflite \
  /tmp/check/frames/parrot.jpg --labels /tmp/check/imagenet_labels.txt --top-k 1
in_root id edgefleet
in_root ls -ld /etc/edgefleet /etc/edgefleet/agent /etc/edgefleet/agent/agent.yaml

step "state before the upgrade: a model in the store, an edited config"
in_root install -d -o edgefleet -g edgefleet /var/lib/edgefleet/store/models/kept
echo "a stored model" > "$root/var/lib/edgefleet/store/models/kept/model.tflite"
echo "# edited by the operator" >> "$root/etc/edgefleet/agent/agent.yaml"
kept=$( (cd "$root" && find etc/edgefleet var/lib/edgefleet -type f -print0 | sort -z | xargs -0 sha256sum) )
echo "$kept"

step "upgrade to $(basename "$new")"
in_root dpkg -i "/tmp/check/$(basename "$new")"
in_root dpkg-query -W edgefleet
after=$( (cd "$root" && find etc/edgefleet var/lib/edgefleet -type f -print0 | sort -z | xargs -0 sha256sum) )
[ "$kept" = "$after" ] || { diff <(echo "$kept") <(echo "$after") || true; fail "the upgrade changed /etc/edgefleet or the state"; }
echo "kept: /etc/edgefleet and /var/lib/edgefleet unchanged ($(echo "$after" | wc -l) files)"
in_root /opt/edgefleet/bin/edgefleet-agent check-config /etc/edgefleet/agent/agent.yaml

step "remove (configuration and state stay)"
in_root dpkg --remove edgefleet
[ ! -e "$root/opt/edgefleet" ] || fail "/opt/edgefleet is still there after remove"
[ -e "$root/etc/edgefleet/agent/agent.yaml" ] || fail "remove took the config"
step "purge"
in_root dpkg --purge edgefleet
umount "$root/proc"
snapshot > "$scratch/after"
echo "what purge left behind, against the root before the install:"
{ diff "$scratch/before" "$scratch/after" || true; } | awk '/^[<>]/ {seen[$NF] = seen[$NF] $1}
  END {for (p in seen) print (seen[p] == "<" ? "removed " : seen[p] == ">" ? "added   " : "changed ") p}' \
  | sort -k2
for path in opt/edgefleet etc/edgefleet var/lib/edgefleet var/lib/edgefleet-controller \
    lib/systemd/system/edgefleet-agent.service lib/udev/rules.d/60-edgefleet.rules usr/bin/edgefleet; do
  [ ! -e "$root/$path" ] && [ ! -L "$root/$path" ] || fail "/$path is still there after purge"
done
echo "check-deb.sh: install, upgrade, remove and purge all hold"
