#!/usr/bin/env bash
# Set up everything edgefleet needs on a Debian / Raspberry Pi OS machine, idempotently.
#   scripts/bootstrap.sh [run|test]
# run:  Debian packages for Python virtualenvs and mosquitto, .venv with edgefleet and the
#       interpreter backend this python3 can install (runtime/platforms.py decides: LiteRT on
#       64-bit, tflite-runtime on 32-bit bookworm, a message where neither exists).
# test: also a C compiler (one test builds a stub delegate library), openssl (test
#       certificates), faketime (a stepped clock for the agent process), the dev tools,
#       and .venv-tflite (tflite-runtime with numpy<2) to test the second backend.
# Debian packages are installed when running as root; otherwise the script says which
# ones are missing and stops.
set -euo pipefail
mode=${1:-run}
cd "$(dirname "$0")/.."

say() { printf 'bootstrap: %s\n' "$*" >&2; }

# need_packages [DEBIAN_PACKAGE...]: the base packages, and the named ones, installed.
need_packages() {
  local missing=() package
  command -v python3 >/dev/null || missing+=(python3)
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  # The MQTT broker: the demo runs one, the tests start their own on free ports.
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  if [ "$mode" = test ]; then
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    command -v openssl >/dev/null || missing+=(openssl)
    # libfaketime: tests/test_clock_step.py steps the agent process's wall clock.
    command -v faketime >/dev/null || missing+=(faketime)
  fi
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q ' installed$' || missing+=("$package")
  done
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
  python3 - <<'PY' || { say "edgefleet needs Python 3.10 or newer (found $(python3 --version 2>&1); Raspberry Pi OS bullseye has 3.9: upgrade to bookworm)"; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
}

# choose_backend: set $backend (the setup.cfg extra) and $system_packages (Debian packages for
# dependencies PyPI has no wheel for here) from what this python3 can install. A pip marker
# cannot tell: a Pi 4/5 on 32-bit Raspberry Pi OS reports an aarch64 kernel. The module is
# standard library only, so it runs before edgefleet is installed.
choose_backend() {
  local choice
  if ! choice=$(python3 -I runtime/platforms.py 2>&1); then
    say "$choice"
    exit 1
  fi
  read -r backend system_packages <<<"$choice"
}

# pip_install PYTHON ARGS...: pip, quiet, errors shown. setuptools reports every editable
# install of a package_dir layout (ours maps agent/ to edgefleet.agent) with a banner about
# folders that "may take precedence during imports"; no folder here is named edgefleet, so
# that one warning is filtered and every other stays.
pip_install() {
  local python=$1
  shift
  PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation:UserWarning" \
    "$python" -m pip install --quiet "$@"
}

# has_extras INSTALLED WANTED: every extra in the comma list WANTED is in INSTALLED.
has_extras() {
  local extra wanted
  IFS=, read -ra wanted <<<"$2"
  for extra in "${wanted[@]}"; do
    case ",$1," in *",$extra,"*) ;; *) return 1 ;; esac
  done
}

# make_venv DIR EXTRAS: create DIR and install edgefleet[EXTRAS] into it, unless an install
# from this setup.cfg with those extras (or more) is there already. Where Debian provides
# dependencies ($system_packages), the virtualenv sees the system's site-packages. Every step
# returns on failure itself: callers use it in `if`, where `set -e` is off.
make_venv() {
  local dir=$1 extras=$2 hash current venv_options=()
  hash="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
  current=$(cat "$dir/.edgefleet-stamp" 2>/dev/null || true)
  if [ "${current%% *}" = "$hash" ] && has_extras "${current#* }" "$extras"; then
    return 0
  fi
  say "installing edgefleet[$extras] into $dir"
  [ -z "$system_packages" ] || venv_options+=(--system-site-packages)
  [ -x "$dir/bin/python" ] || python3 -m venv "${venv_options[@]}" "$dir" || return 1
  pip_install "$dir/bin/python" --upgrade pip || return 1
  if ! pip_install "$dir/bin/python" -e ".[$extras]"; then
    say "pip could not install edgefleet[$extras] for $(python3 --version) on $(uname -m) (its message is above)"
    return 1
  fi
  echo "$hash $extras" > "$dir/.edgefleet-stamp"
}

need_packages
check_python
choose_backend
# shellcheck disable=SC2086  # a list of Debian package names
need_packages $system_packages
if [ "$mode" = test ]; then
  if [ "$backend" != litert ]; then
    # tests/tflite_builder.py builds its models with the flatbuffer schema LiteRT ships.
    say "the tests need LiteRT, which this machine cannot install: run them on a 64-bit machine"
    exit 1
  fi
  make_venv .venv "dev,litert,controller" || exit 1
  # tflite-runtime publishes wheels for fewer Pythons and boards than LiteRT.
  if ! make_venv .venv-tflite "dev,litert,controller,tflite-runtime"; then
    rm -rf .venv-tflite
    say "tflite-runtime cannot be installed for $(python3 --version) on $(uname -m)"
    [ -z "${CI:-}" ] || exit 1
  fi
else
  # The controller's wheels (pydantic-core, psycopg) are missing on some boards (32-bit
  # Raspberry Pi OS): the agent and the model tools still install, the demo's fleet part not.
  if ! make_venv .venv "$backend,controller"; then
    say "the controller cannot be installed here: installing the agent and the model tools only"
    make_venv .venv "$backend" || exit 1
  fi
fi
