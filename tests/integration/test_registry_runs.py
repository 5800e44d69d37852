"""Methods own their capabilities: a new method is one .py file plus one YAML, and every peftlab tool lists,
counts and treats it correctly without an edit in peftlab/. Building happens in configure_model, never at
construction.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_registry.py."""

from __future__ import annotations

import sys

from conftest import ROOT


def test_every_shipped_method_class_is_importable_from_the_package():
    """Every class in peftlab/methods/*.py that registers a name (found by reading the files, not through the
    package) is importable as ``from peftlab import X`` in a fresh interpreter, and listed in ``peftlab.__all__``;
    ``import peftlab`` alone stays light (no torch)."""
    import ast
    import subprocess

    methods_dir = ROOT / "peftlab" / "methods"
    named = sorted(
        node.name for f in methods_dir.glob("*.py") for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.ClassDef) and any(
            isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "name" for t in stmt.targets)
            for stmt in node.body))
    assert {"IA3", "VeRA", "LoRA", "PTuningV2"} <= set(named)
    probe = ("import sys, peftlab; light = 'torch' not in sys.modules; "
             f"from peftlab import {', '.join(named)}; "
             f"print(light, all(n in peftlab.__all__ for n in {named!r}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
