#!/usr/bin/env bash
# mypy cannot follow setup.cfg's package_dir mapping (agent/ -> edgefleet.agent),
# so lay the folders out as the import tree in build/typecheck with symlinks and check that.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/edgefleet
rm -rf build/typecheck && mkdir -p "$tree"
for pkg in agent runtime ops provisioning; do ln -s "../../../$pkg" "$tree/$pkg"; done
exec "${PYTHON:-.venv/bin/python}" -m mypy -p edgefleet "$@"
