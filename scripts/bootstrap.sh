#!/usr/bin/env bash
# Set up everything edgefleet needs on a Debian / Raspberry Pi OS machine, idempotently.
#   scripts/bootstrap.sh [run|test]
# run:  Debian packages for Python virtualenvs and mosquitto, .venv with edgefleet installed.
# test: also a C compiler (one test builds a stub delegate library), openssl (test
#       certificates), the dev tools,
#       and .venv-tflite (tflite-runtime with numpy<2) to test the second backend.
# Debian packages are installed when running as root; otherwise the script says which
# ones are missing and stops.
set -euo pipefail
mode=${1:-run}
cd "$(dirname "$0")/.."

say() { printf 'bootstrap: %s\n' "$*" >&2; }

need_packages() {
  local missing=()
  command -v python3 >/dev/null || missing+=(python3)
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  # The MQTT broker: the demo runs one, the tests start their own on free ports.
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  if [ "$mode" = test ]; then
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    command -v openssl >/dev/null || missing+=(openssl)
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "missing Debian packages: ${missing[*]}"
    say "install them with: sudo apt-get install -y ${missing[*]}   (then run this again)"
    exit 1
  fi
}

check_python() {
  python3 - <<'PY' || { say "edgefleet needs Python 3.10 or newer (found $(python3 --version 2>&1))"; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
}

# make_venv DIR EXTRAS: create DIR and install edgefleet[EXTRAS] into it, unless
# setup.cfg is unchanged since the last successful install there. Every step
# returns on failure itself: callers use it in `if`, where `set -e` is off.
make_venv() {
  local dir=$1 extras=$2 hash current
  hash="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
  current=$(cat "$dir/.edgefleet-stamp" 2>/dev/null || true)
  # Any install from this setup.cfg serves the main job; tests need their extras.
  if [ "$current" = "$hash $extras" ] || { [ -z "$extras" ] && [ "${current%% *}" = "$hash" ]; }; then
    return 0
  fi
  say "installing edgefleet${extras:+[$extras]} into $dir"
  [ -x "$dir/bin/python" ] || python3 -m venv "$dir" || return 1
  "$dir/bin/python" -m pip install --quiet --upgrade pip || return 1
  "$dir/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}" || return 1
  echo "$hash $extras" > "$dir/.edgefleet-stamp"
}

need_packages
check_python
if [ "$mode" = test ]; then
  make_venv .venv dev
  # tflite-runtime publishes wheels for fewer Pythons and boards than LiteRT.
  if ! make_venv .venv-tflite "dev,tflite-runtime"; then
    rm -rf .venv-tflite
    say "tflite-runtime cannot be installed for $(python3 --version) on $(uname -m)"
    [ -z "${CI:-}" ] || exit 1
  fi
else
  make_venv .venv ""
fi
