"""Reproducible installs: the lock, the version checks that run before anything is loaded, the lock helpers.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_install_runs.py."""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))


import lockdiff  # noqa: E402

LOCK = ROOT / "requirements/lock.txt"


def _pyproject_requirements() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_the_lock_pins_every_dependency_within_pyproject_ranges():
    text = LOCK.read_text()
    assert "bash scripts/lock.sh" in text.split("\n\n")[0]  # the header names the command that regenerates it
    pins = lockdiff.pins(text)
    for requirement in _pyproject_requirements():
        name = lockdiff.canonical(requirement.name)
        assert name in pins, f"{name} is not in the lock; run bash scripts/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    assert pins["torch"].split("+")[0] == "2.13.0"  # the CPU wheel, not a multi-GB CUDA build
    assert all("--hash=sha256:" in block for block in re.split(r"\n(?=[a-z0-9])", text) if "==" in block)
    assert "/opt/" not in text and "/tmp/" not in text  # nothing of the machine that compiled it


@pytest.mark.skipif(os.environ.get("PEFTLAB_LOCK") == "none", reason="scripts/test.sh --latest: newest releases")
def test_the_environment_is_the_lock():
    """What scripts/setup.sh installed is exactly the lock (torch aside when a GPU build was kept), so CI runs the
    versions the lock names. Under `scripts/test.sh --latest` the point is to differ, so this is skipped there."""
    import setuptools  # noqa: F401 - as some libraries do: its vendored copies join sys.path (ignored below)

    installed = {}
    for d in metadata.distributions():
        # once something imports setuptools, its vendored copies (setuptools/_vendor: packaging, zipp, ...) are on
        # sys.path too: those are not what the environment installed
        if "_vendor" not in Path(str(d.locate_file(""))).parts:
            installed.setdefault(lockdiff.canonical(d.metadata["Name"]), d.version)
    if installed.get("peftlab") is None or installed.get("torch", "").split("+")[0] != "2.13.0":
        pytest.skip("not the locked environment (a source checkout, or a user's own torch)")
    differ = [f"{n}=={v} (installed {installed.get(n)})" for n, v in lockdiff.pins(LOCK.read_text()).items()
              if installed.get(n) != v and n != "torch"]
    assert differ == [], "run bash scripts/setup.sh"


def test_lockdiff_helpers():
    lock = ("# header\nfoo==1.0 \\\n    --hash=sha256:aa\n    # via bar\ntorch==2.13.0+cpu \\\n    --hash=sha256:bb\n"
            "    # via\n    #   x\nbar-baz==2.0 \\\n    --hash=sha256:cc\n")
    assert lockdiff.pins(lock) == {"foo": "1.0", "torch": "2.13.0+cpu", "bar-baz": "2.0"}
    stripped = lockdiff.without(lock, {"torch"})
    assert "torch" not in stripped and "sha256:bb" not in stripped and "sha256:cc" in stripped
    assert lockdiff.pins(stripped) == {"foo": "1.0", "bar-baz": "2.0"}
    # untested: pins of the lock that the passing run did not have (torch aside)
    assert lockdiff.untested(lock, "foo==1.0\nbar_baz==2.0\ntorch==2.14.0\n") == []
    assert lockdiff.untested(lock, "foo==1.1\n") == ["bar-baz==2.0 (tested: absent)", "foo==1.0 (tested: 1.1)"]


def test_a_library_outside_peftlabs_range_is_refused_in_one_line(monkeypatch, capsys):
    from peftlab import compat
    from peftlab.cli import main

    if compat.unmet_requirements() is not None:
        pytest.skip(f"this environment is already outside the ranges: {compat.unmet_requirements()}")
    real = compat._installed
    monkeypatch.setattr(compat, "_installed", lambda name: "4.40.0" if name == "transformers" else real(name))
    message = compat.unmet_requirements()
    assert message.startswith("transformers 4.40.0 is installed but peftlab needs transformers>=")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "transformers 4.40.0" in err and "setup.sh" in err
    monkeypatch.setattr(compat, "_installed", lambda name: None if name == "peft" else real(name))
    assert compat.unmet_requirements().startswith("peft is not installed")


def test_a_known_bad_combination_is_refused_before_anything_is_loaded(monkeypatch, tiny_bert):
    from peftlab import compat
    from peftlab.errors import PeftLabError
    from peftlab.methods import LoRA, PrefixTuning

    installed = compat._installed("transformers")
    monkeypatch.setattr(compat, "KNOWN_BAD", [((f"transformers=={installed}", "peft>=0.1"), ("PrefixTuning",),
                                               "install transformers<5.24 (bash scripts/setup.sh)")])
    with pytest.raises(PeftLabError, match=rf"transformers {re.escape(installed)} with peft .* is known to break "
                                           r"PrefixTuning; install transformers<5.24"):
        PrefixTuning(backbone="/does/not/exist", num_labels=2).build()  # refused before the backbone is looked at
    with pytest.raises(PeftLabError, match="no such directory"):  # other methods are not affected
        LoRA(backbone="/does/not/exist", num_labels=2).build()
    assert compat.known_bad_versions(("LoRA",)) is None

    class MyPrefix(PrefixTuning):  # a subclass of an affected method is affected too
        pass

    with pytest.raises(PeftLabError, match="known to break PrefixTuning"):
        MyPrefix(backbone="/does/not/exist", num_labels=2).build()
    monkeypatch.setattr(compat, "KNOWN_BAD", [(("transformers<1",), ("*",), "unreachable")])
    assert compat.known_bad_versions() is None
    assert LoRA(backbone=tiny_bert, num_labels=2).build().trainable_count > 0
