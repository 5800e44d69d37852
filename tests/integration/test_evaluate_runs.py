"""peftlab evaluate: the lm-eval LM wrapper (exact log-likelihoods for every kind of method), the shipped tasks,
the standard-task path on a local copy of a standard task's YAML, results on disk, and the one-line refusals.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_evaluate.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, exported_perturbed, perturbed_trainables
from peftlab.errors import PeftLabError

pytest.importorskip("lm_eval")


DATA = ROOT / "tests" / "data" / "eval"


# ---------------------------------------------------------------------------------------------- the command
def test_evaluate_a_p_tuning_v2_run_writes_results_and_samples(tmp_path, tiny_llama, capsys):
    from peftlab.evaluate import evaluate_command
    from peftlab.methods import PTuningV2

    _, run_dir = exported_perturbed(tmp_path, tiny_llama, PTuningV2, num_virtual_tokens=3, prefix_hidden_size=8)
    out = evaluate_command(str(run_dir), tasks=["peftlab_rotten_tomatoes_mc", "peftlab_rotten_tomatoes_gen"],
                           limit=4, batch_size=3, log_samples=True)
    directory = Path(out["directory"])
    assert directory.parent == run_dir / "eval"
    record = json.loads((directory / "results.json").read_text())
    mc, gen = record["results"]["peftlab_rotten_tomatoes_mc"], record["results"]["peftlab_rotten_tomatoes_gen"]
    assert 0 <= mc["acc,none"] <= 1 and "acc_stderr,none" in mc
    assert "exact_match,extract" in gen and "exact_match_stderr,extract" in gen
    assert record["n-samples"]["peftlab_rotten_tomatoes_mc"]["effective"] == 4
    assert record["versions_of_libraries"]["lm_eval"] and record["arguments"]["limit"] == 4
    samples = [json.loads(line) for line in (directory / "samples_peftlab_rotten_tomatoes_mc.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"doc", "resps", "acc"} <= set(samples[0])
    table = capsys.readouterr().out.splitlines()
    assert "| Task | Filter | n-shot | Metric | Value | Stderr | Docs |" in table  # (lm-eval's own prints A, B, C)
    assert f"| peftlab_rotten_tomatoes_mc | none | 0 | acc | {mc['acc,none']:.4f} | " \
           f"{mc['acc_stderr,none']:.4f} | 4 |" in table


def test_a_local_copy_of_a_standard_task_reads_its_own_format(tmp_path, tiny_llama, tokenizer_dir):
    """arc_easy's YAML from lm-eval, unchanged except that it reads a tiny local file in ARC's own format."""
    from peftlab.evaluate import evaluate_command

    out = evaluate_command(backbone=tiny_llama, tasks=[str(DATA / "arc_easy_local.yaml")], batch_size=4,
                           output_dir=str(tmp_path / "out"))
    result = out["results"]["arc_easy_local"]
    assert result["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)  # three questions
    assert {"acc_norm,none", "acc_stderr,none"} <= set(result)


@pytest.mark.parametrize("kwargs, message", [
    # an unknown name is looked up in lm-eval's index of ~15,000 tasks, which takes 15-35 s to build here
    pytest.param({"tasks": ["peftlab_rotten_tomatoes_mcq"]}, "unknown task 'peftlab_rotten_tomatoes_mcq'. Did you "
                 "mean 'peftlab_rotten_tomatoes_mc'", marks=pytest.mark.slow),
    pytest.param({"tasks": ["helaswag"]}, "Did you mean 'hellaswag'", marks=pytest.mark.slow),
    ({"tasks": ["peftlab_rotten_tomatoes_mc"], "limit": 0}, "--limit must be positive"),
    ({"tasks": ["peftlab_rotten_tomatoes_mc"], "limit": 2.5}, "whole number"),
    ({"tasks": []}, "name at least one task"),
    ({"tasks": ["peftlab_rotten_tomatoes_mc"], "backbone": None}, "name a run"),
])
def test_bad_requests_fail_in_one_line_before_loading(kwargs, message, monkeypatch):
    from peftlab import evaluate

    monkeypatch.setattr("peftlab.backbones.load_backbone", lambda *a, **k: pytest.fail("loaded a model"))
    kwargs = {"backbone": "packaged:SmolLM2-135M-Instruct", **kwargs}
    with pytest.raises(PeftLabError, match=None) as err:
        evaluate.evaluate_command(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # two loads of SmolLM2 (~45 s on a shared CPU)
def test_cli_evaluates_a_smollm2_lora_run_offline(tmp_path, capsys):
    """The issue's smoke run: `peftlab evaluate RUN --tasks <shipped> --limit` on a packaged SmolLM2 LoRA run (the
    base-model row, --backbone alone, is the same path with the tiny Llama in the arc_easy test)."""
    from peftlab.cli import main
    from peftlab.export import export_adapter
    from peftlab.methods import LoRA

    module = perturbed_trainables(LoRA(backbone="packaged:SmolLM2-135M-Instruct", task="causal_lm", r=2, target_modules=["q_proj"])
                        .build())
    export_adapter(module, tmp_path / "run" / "adapter" / "best")
    tasks = ["--tasks", "peftlab_rotten_tomatoes_mc", "peftlab_rotten_tomatoes_gen", "--limit", "3"]
    main(["evaluate", str(tmp_path / "run"), *tasks, "--batch_size", "3", "--log_samples"])
    out = capsys.readouterr().out
    assert "peftlab_rotten_tomatoes_mc" in out and "exact_match" in out
    (run_dir,) = (tmp_path / "run" / "eval").iterdir()
    tuned = json.loads((run_dir / "results.json").read_text())
    assert tuned["arguments"]["run"] == str(tmp_path / "run") and tuned["arguments"]["limit"] == 3
    rows = [json.loads(line) for line in (run_dir / "samples_peftlab_rotten_tomatoes_gen.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 3 and all(r["target"] in ("fresh", "rotten") for r in rows)
    assert 0 <= tuned["results"]["peftlab_rotten_tomatoes_gen"]["exact_match,extract"] <= 1


def test_a_chat_run_is_evaluated_in_its_recorded_chat_template(tmp_path, tiny_llama):
    """A run whose peftlab_meta.json records a chat prompt format gets lm-eval's chat path by default, with the
    template it was trained with (not the tokenizer's, which the tiny tokenizer does not even have)."""
    from peftlab.adapters import rewrite_meta
    from peftlab.api import load_run
    from peftlab.eval_lm import PeftLabLM
    from peftlab.evaluate import evaluate_command
    from peftlab.methods import LoRA

    _, run_dir = exported_perturbed(tmp_path, tiny_llama, LoRA, r=2, target_modules=["q_proj"])
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    rewrite_meta(run_dir, prompt_format={"kind": "chat", "chat_template": template})
    lm = PeftLabLM.from_run(load_run(str(run_dir)))
    assert lm.chat and lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant]"
    out = evaluate_command(str(run_dir), tasks=["peftlab_rotten_tomatoes_mc"], limit=2, log_samples=True)
    record = json.loads((Path(out["directory"]) / "results.json").read_text())
    assert record["arguments"]["apply_chat_template"] is True
    (sample, _) = [json.loads(line) for line in
                   (Path(out["directory"]) / "samples_peftlab_rotten_tomatoes_mc.jsonl").read_text().splitlines()]
    assert sample["arguments"][0][0].startswith("[user] Movie review:")  # (context, continuation) pairs
    # the run's training system prompt leads every prompt (unless the task's history brings its own)
    rewrite_meta(run_dir, prompt_format={"kind": "chat", "chat_template": template, "system_prompt": "Be brief."})
    lm = PeftLabLM.from_run(load_run(str(run_dir)))
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "[system] Be brief.\n[user] hi\n[assistant]"
    assert lm.apply_chat_template([{"role": "system", "content": "Task."}, {"role": "user", "content": "hi"}]) \
        == "[system] Task.\n[user] hi\n[assistant]"
    plain = evaluate_command(str(run_dir), tasks=["peftlab_rotten_tomatoes_mc"], limit=2, apply_chat_template=False)
    assert json.loads((Path(plain["directory"]) / "results.json").read_text())["arguments"]["apply_chat_template"] \
        is False
