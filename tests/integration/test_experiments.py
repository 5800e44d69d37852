"""Every experiment runner in its smoke mode (a few steps), so the studies never rot.

The studies' real results (docs/results/) come from their default runs; see each runner's docstring. Studies that
are `peftlab compare` study files (experiments/*/study*.yaml) are tested in tests/unit/test_compare.py and tests/integration/test_compare_runs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

STUDIES = [
    ["experiments/inference_overhead/run.py", "--smoke"],
    # the multi-LoRA runner trains several adapters: minutes on 2 cores, so behind `-m slow`
    pytest.param(["experiments/multi_lora/run.py", "--smoke"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("study", STUDIES, ids=["inference_overhead", "multi_lora"])
def test_study_smoke(study):
    proc = subprocess.run([sys.executable, *study], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])


REPORTS = {  # report -> the runner that writes it from its committed results
    "inference_overhead": "experiments/inference_overhead/run.py",
    "multi_lora": "experiments/multi_lora/run.py",
}


@pytest.mark.parametrize("name", REPORTS)
def test_committed_report_is_what_its_results_give(name, tmp_path):
    """docs/results/<name>.md is regenerated from the committed raw results, unchanged (no hand edits, no stale
    page after a rerun)."""
    proc = subprocess.run([sys.executable, REPORTS[name], "--report"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore", PEFTLAB_RESULTS_DIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / f"{name}.png").is_file()
    expected = (ROOT / "docs" / "results" / f"{name}.md").read_text()
    assert (tmp_path / f"{name}.md").read_text() == expected, f"rerun: python {REPORTS[name]} --report"
