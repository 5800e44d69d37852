"""The documentation: generated reference up to date, site builds with no broken links or missing pages,
the Python snippets run, README links resolve.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_docs_runs.py."""

from __future__ import annotations

import re

import yaml

from conftest import ROOT, python_blocks

DOCS = ROOT / "docs"


def test_configuration_reference_is_generated_from_the_code():
    from peftlab import docgen

    assert docgen.main(["--check"]) == 0, "docs/reference.md is out of date: run python -m peftlab.docgen"
    text = (DOCS / "reference.md").read_text()
    for key in ("`model.init_args.r`", "`data.few_shot_k`", "`model.init_args.gradient_checkpointing`",
                "`model.init_args.prefix_projection`", "`trainer.max_steps`", "`adapter_export.enabled`"):
        assert key in text


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        for value in item.values():
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_navigation_and_every_nav_entry_exists():
    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)]+)\)", text) if "://" not in link]
    assert links
    missing = [link for link in links if link and not (ROOT / link).exists()]
    assert not missing


def test_extending_page_shows_the_shipped_examples():
    """The code on docs/extending.md is the code in examples/ and peftlab/methods/ia3.py (run by test_examples.py
    and test_ia3.py)."""
    blocks = python_blocks("extending.md")
    bitfit = (ROOT / "examples" / "bitfit.py").read_text()
    assert blocks[0].strip() in bitfit
    ia3 = (ROOT / "peftlab" / "methods" / "ia3.py").read_text()
    for line in blocks[1].strip().splitlines():
        assert line.strip() in ia3, line
    assert (ROOT / "examples" / "bitfit.yaml").read_text().count("examples.bitfit.BitFit") == 1
