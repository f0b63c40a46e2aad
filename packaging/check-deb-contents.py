#!/usr/bin/env python3
"""Check what an edgefleet .deb carries for its architecture: every wheel is pure Python
or built for it, and every ELF file in every wheel is for its machine (no x86 binary in an
arm64 package, and no arm binary in an amd64 one).

    packaging/check-deb-contents.py build/deb/edgefleet_0.1.0-1_arm64.deb

Prints a line per wheel with a binary in it and a summary; exit 1 on the first mismatch
class found (all are listed), 0 when it all fits. Standard library and dpkg-deb only.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

MACHINES = {"amd64": ("x86_64", 62), "arm64": ("aarch64", 183)}  # ELF e_machine values
ELF_NAMES = {62: "x86-64", 183: "aarch64", 40: "arm", 3: "x86"}


def elf_machine(header: bytes) -> int | None:
    """The e_machine of an ELF header (little-endian), None when it is not ELF."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little")


def main(deb: Path) -> int:
    fields = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Architecture", "Version"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    arch = fields.split("Architecture:")[1].split()[0]
    machine, e_machine = MACHINES[arch]
    problems: list[str] = []
    binaries: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        wheels = sorted(Path(tmp, "usr/share/edgefleet/wheels").glob("*.whl"))
        for wheel in wheels:
            platform = wheel.stem.split("-")[-1]
            if platform != "any" and machine not in platform:
                problems.append(f"{wheel.name}: platform {platform}, not {machine}")
            count = 0
            with zipfile.ZipFile(wheel) as zipped:
                for info in zipped.infolist():
                    with zipped.open(info) as member:
                        found = elf_machine(member.read(20))
                    if found is None:
                        continue
                    count += 1
                    binaries[ELF_NAMES.get(found, str(found))] += 1
                    if found != e_machine:
                        name = ELF_NAMES.get(found, f"machine {found}")
                        problems.append(f"{wheel.name}: {info.filename} is {name}")
            if count:
                print(f"{wheel.name}: {count} ELF files")
        loose = [
            p for p in Path(tmp).rglob("*")
            if p.is_file() and p.suffix != ".whl" and elf_machine(p.read_bytes()[:20]) is not None
        ]  # fmt: skip
        problems += [f"{p.relative_to(tmp)}: a binary outside the wheels" for p in loose]
    kinds = ", ".join(f"{n} {kind}" for kind, n in binaries.items())
    print(f"{deb.name}: {arch}, {len(wheels)} wheels, ELF files: {kinds or 'none'}")
    for problem in problems:
        print(f"MISMATCH {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: check-deb-contents.py PACKAGE.deb")
    sys.exit(main(Path(sys.argv[1])))
