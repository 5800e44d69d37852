"""peftlab.callbacks.LMEval: lm-eval tasks on the model being trained (after validations, on test), the same scores
`peftlab evaluate` gives the exported run, without touching the run's random streams.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_lm_eval_callback_runs.py."""

from __future__ import annotations

import json

import pytest

from conftest import run_main, write_config
from peftlab.errors import PeftLabError

MC = "peftlab_rotten_tomatoes_mc"
GEN = "peftlab_rotten_tomatoes_gen"


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ["peftlab_rotten_tomatoes_mcq"]}, "unknown task 'peftlab_rotten_tomatoes_mcq'. Did you mean"),
    ({"tasks": []}, "LMEval needs at least one task"),
    ({"tasks": [MC], "stages": ["train"]}, "LMEval stages ['train'] are unknown"),
    ({"tasks": [MC], "limit": 0}, "--limit must be positive"),
])
def test_bad_settings_fail_in_one_line_when_built(kwargs, message):
    from peftlab.callbacks import LMEval

    with pytest.raises(PeftLabError) as err:
        LMEval(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_classification_run_is_refused_in_one_line(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, trainer={"max_steps": 1})
    code, out, err = run_main(["fit", "--config", cfg, "--trainer.callbacks+=peftlab.callbacks.LMEval",
                               f"--trainer.callbacks.tasks=[{MC}]"], capsys)
    assert code != 0 and "LMEval scores a causal LM's text; this run's task is classification" in err
    assert "Traceback" not in err


def test_metric_names_from_results_and_from_task_files():
    from peftlab.callbacks.harness import declared_metrics, metric_name
    from peftlab.evaluate import shipped_tasks, task_config

    assert metric_name("t", "acc,none") == "t/acc" and metric_name("t", "exact_match,strict-match") == \
        "t/exact_match_strict-match"
    assert metric_name("t", "acc_stderr,none") is None and metric_name("t", "alias") is None
    assert declared_metrics(task_config(shipped_tasks()[MC])) == [f"{MC}/acc"]
    assert declared_metrics(task_config(shipped_tasks()[GEN])) == [f"{GEN}/exact_match_extract"]
    assert json.dumps(declared_metrics({"task": "x", "output_type": "multiple_choice"})) == '["x/acc", "x/acc_norm"]'
