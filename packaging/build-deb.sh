#!/usr/bin/env bash
# Build the edgefleet Debian package for one architecture with dpkg-deb:
#
#   packaging/build-deb.sh amd64|arm64 [--revision N] [--python 3.11] [--out DIR]
#
# It carries every wheel it needs for that architecture and Python (fetched here, at build
# time, with `pip download --platform`), and its postinst builds /opt/edgefleet from them
# on Debian's python3 with no network. --python is the target's Python (3.11: Debian 12 and
# Raspberry Pi OS bookworm; 3.13: trixie): the wheels are built for one. --revision makes a
# newer build of the same version (0.1.0-2 after 0.1.0-1). The .deb lands in --out
# (default build/deb). Needs dpkg-deb, and the checkout's .venv (scripts/bootstrap.sh run).
set -euo pipefail
cd "$(dirname "$0")/.."

arch= revision=1 python=3.11 out=build/deb
while [ $# -gt 0 ]; do
  case $1 in
    amd64|arm64) arch=$1 ;;
    --revision) revision=${2:?--revision N}; shift ;;
    --python) python=${2:?--python 3.X}; shift ;;
    --out) out=${2:?--out DIR}; shift ;;
    *) echo "build-deb.sh: unknown argument '$1' (amd64|arm64 [--revision N] [--python 3.X] [--out DIR])" >&2; exit 2 ;;
  esac
  shift
done
case $arch in
  amd64) machine=x86_64 ;;
  arm64) machine=aarch64 ;;
  *) echo "build-deb.sh: name the architecture: amd64 or arm64" >&2; exit 2 ;;
esac
command -v dpkg-deb >/dev/null || { echo "build-deb.sh: dpkg-deb is missing (apt install dpkg)" >&2; exit 1; }
[ -x .venv/bin/python ] || scripts/bootstrap.sh run

py=.venv/bin/python
version=$(sed -n 's/^version *= *//p' setup.cfg)
minor=${python#3.}
tag=cp3$minor
deb_version=$version-$revision
work=build/deb-$arch
root=$work/root
rm -rf "$work" && mkdir -p "$root/DEBIAN" "$root/usr/share/edgefleet/wheels" "$out"

echo "build-deb.sh: edgefleet $deb_version for $arch, Python $python" >&2
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$work" . 2>&1 | grep -v "^WARNING: Location" >&2 || true
wheel=$(ls "$work"/edgefleet-"$version"-py3-none-any.whl)
# Every manylinux tag a Debian 12 glibc (2.36) runs: pip takes the --platform list as given.
platforms=(--platform "manylinux2014_$machine")
for glibc in $(seq 17 36); do platforms+=(--platform "manylinux_2_${glibc}_$machine"); done
"$py" -m pip download --quiet --dest "$root/usr/share/edgefleet/wheels" --only-binary=:all: \
  --python-version "$python" --implementation cp --abi "$tag" --abi abi3 --abi none \
  "${platforms[@]}" "$wheel[litert,controller]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
ls "$root/usr/share/edgefleet/wheels"/ai_edge_litert-*"$machine"*.whl >/dev/null 2>&1 || {
  echo "build-deb.sh: pip could not fetch the wheels for $arch, Python $python (see above)" >&2
  exit 1
}

install -D -m 0644 packaging/systemd/edgefleet-agent.service "$root/lib/systemd/system/edgefleet-agent.service"
install -D -m 0644 packaging/systemd/edgefleet-controller.service "$root/lib/systemd/system/edgefleet-controller.service"
install -D -m 0644 packaging/udev/60-edgefleet.rules "$root/lib/udev/rules.d/60-edgefleet.rules"
install -m 0644 packaging/agent.example.yaml packaging/controller.example.yaml "$root/usr/share/edgefleet/"
install -d "$root/usr/bin"
for command in edgefleet edgefleet-agent; do ln -s "/opt/edgefleet/bin/$command" "$root/usr/bin/$command"; done
install -D -m 0644 /dev/stdin "$root/usr/share/doc/edgefleet/copyright" <<TEXT
edgefleet $version: see https://pypi.org/project/edgefleet/ for the licence. The wheels in
/usr/share/edgefleet/wheels carry their own licences in their metadata.
TEXT

size_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$deb_version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE_KB@/$size_kb/" \
    -e "s/@PY@/$python/" -e "s/@PY_NEXT@/3.$((minor + 1))/" \
    packaging/debian/control.in > "$root/DEBIAN/control"
for script in postinst prerm postrm; do
  sed "s/@WHEEL_VERSION@/$version/" "packaging/debian/$script" > "$root/DEBIAN/$script"
  chmod 0755 "$root/DEBIAN/$script"
done
deb="$out/edgefleet_${deb_version}_$arch.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
echo "$deb"
