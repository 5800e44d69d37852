"""Helpers for the lock file (standard library only, so they run before anything is installed).

    python scripts/lockdiff.py LOCK FREEZE      # pins of LOCK that FREEZE (pip freeze output) does not have
    python scripts/lockdiff.py --without torch LOCK > OUT   # LOCK without the named packages' entries
    python scripts/lockdiff.py --version torch LOCK         # the version LOCK pins for a package
"""

from __future__ import annotations

import re
import sys

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """``{package: version}`` of the ``name==version`` lines of a lock or ``pip freeze`` output."""
    return {canonical(m.group(1)): m.group(2) for line in text.splitlines() if (m := PIN.match(line.strip()))}


def untested(lock: str, freeze: str) -> list[str]:
    """``name==version`` pins of ``lock`` (torch aside) that the environment ``freeze`` did not have."""
    have = pins(freeze)
    return [f"{name}=={version} (tested: {have.get(name, 'absent')})" for name, version in sorted(pins(lock).items())
            if name != "torch" and have.get(name) != version]


def without(lock: str, names: set[str]) -> str:
    """``lock`` with the entries (pin line, its hash lines and comments) of ``names`` removed."""
    out, skipping = [], False
    for line in lock.splitlines():
        m = PIN.match(line)
        if m or (line and not line[0].isspace()):
            skipping = bool(m) and canonical(m.group(1)) in names
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--without"]:
        sys.stdout.write(without(open(argv[2], encoding="utf-8").read(), {canonical(argv[1])}))
        return 0
    if argv[:1] == ["--version"]:
        print(pins(open(argv[2], encoding="utf-8").read()).get(canonical(argv[1]), ""))
        return 0
    lock, freeze = (open(p, encoding="utf-8").read() for p in argv[:2])
    print("\n".join(untested(lock, freeze)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
