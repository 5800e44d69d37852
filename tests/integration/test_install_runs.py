"""Reproducible installs: the lock, the version checks that run before anything is loaded, the lock helpers.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_install.py."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))



LOCK = ROOT / "requirements/lock.txt"


def test_lockdiff_reads_the_locked_torch_version():
    result = subprocess.run([sys.executable, str(ROOT / "scripts/lockdiff.py"), "--version", "torch", str(LOCK)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip().split("+")[0] == "2.13.0"  # what setup.sh installs when no torch is present
