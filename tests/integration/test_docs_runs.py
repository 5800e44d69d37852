"""The documentation: generated reference up to date, site builds with no broken links or missing pages,
the Python snippets run, README links resolve.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_docs.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, python_blocks


def test_site_builds_strictly(tmp_path):
    """mkdocs --strict fails on links to missing pages or anchors and on pages left out of the nav."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "reference" / "index.html").is_file()


def test_python_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every snippet of docs/python-api.md, in order, in one namespace, from a fresh directory."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    blocks = python_blocks("python-api.md")
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, "docs/python-api.md", "exec"), namespace)  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    assert "trained 74,498 of 22,788,484 parameters" in out
    assert (tmp_path / "runs" / "api" / "lightning_logs" / "version_0" / "adapter" / "last").is_dir()


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
