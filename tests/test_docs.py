"""The documentation: generated reference up to date, site builds with no broken links or missing pages,
the Python snippets run, README links resolve."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

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


def test_site_builds_strictly(tmp_path):
    """mkdocs --strict fails on links to missing pages or anchors and on pages left out of the nav."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "reference" / "index.html").is_file()


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)]+)\)", text) if "://" not in link]
    assert links
    missing = [link for link in links if link and not (ROOT / link).exists()]
    assert not missing


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_python_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every snippet of docs/python-api.md, in order, in one namespace, from a fresh directory."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    blocks = _python_blocks("python-api.md")
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, "docs/python-api.md", "exec"), namespace)  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    assert "trained 74,498 of 22,788,484 parameters" in out
    assert (tmp_path / "runs" / "api" / "lightning_logs" / "version_0" / "adapter" / "last").is_dir()


def test_extending_page_shows_the_shipped_examples():
    """The code on docs/extending.md is the code in examples/ and peftlab/methods/ia3.py (run by test_examples.py
    and test_ia3.py)."""
    blocks = _python_blocks("extending.md")
    bitfit = (ROOT / "examples" / "bitfit.py").read_text()
    assert blocks[0].strip() in bitfit
    ia3 = (ROOT / "peftlab" / "methods" / "ia3.py").read_text()
    for line in blocks[1].strip().splitlines():
        assert line.strip() in ia3, line
    assert (ROOT / "examples" / "bitfit.yaml").read_text().count("examples.bitfit.BitFit") == 1


@pytest.mark.parametrize("logger", ["lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.CSVLogger"])
def test_loggers_work_out_of_the_box(tmp_path, tiny_bert, sentiment_csv, capsys, logger):
    from conftest import run_main, write_config

    cfg = write_config(tmp_path, tiny_bert, sentiment_csv)
    code, out, err = run_main(["fit", "--config", cfg, "--trainer.logger", logger,
                               "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")], capsys)
    assert code == 0, err
    files = [p.name for p in (tmp_path / "logs").rglob("*") if p.is_file()]
    if "TensorBoard" in logger:
        assert any(name.startswith("events.out.tfevents") for name in files), files
    else:
        assert "metrics.csv" in files
    assert "fit summary" in out and "trainable" in out
