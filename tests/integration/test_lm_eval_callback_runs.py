"""peftlab.callbacks.LMEval: lm-eval tasks on the model being trained (after validations, on test), the same scores
`peftlab evaluate` gives the exported run, without touching the run's random streams.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_lm_eval_callback.py."""

from __future__ import annotations

import csv

import pytest

from conftest import run_main, write_config

MC = "peftlab_rotten_tomatoes_mc"
GEN = "peftlab_rotten_tomatoes_gen"


def _config(tmp_path, tiny_llama, generation_jsonl, **trainer):
    return write_config(tmp_path, tiny_llama, generation_jsonl, model={"target_modules": ["q_proj", "v_proj"]},
                        data={"task": "causal_lm", "max_length": 48, "max_eval_samples": 8},
                        trainer={"max_steps": 4, "val_check_interval": 1, "limit_val_batches": 1,
                                 "limit_test_batches": 1, "log_every_n_steps": 1, **trainer}, run_name="lmeval")


def _metrics(tmp_path, version=0):
    return list(csv.DictReader(open(tmp_path / f"runs/lmeval/version_{version}/metrics.csv")))


LMEVAL = ["--trainer.callbacks+=peftlab.callbacks.LMEval", f"--trainer.callbacks.tasks=[{MC},{GEN}]",
          "--trainer.callbacks.limit=6", "--trainer.callbacks.batch_size=4", "--trainer.callbacks.max_gen_toks=3"]


def test_lm_eval_every_second_validation_and_on_test_equals_peftlab_evaluate(tmp_path, tiny_llama,
                                                                             generation_jsonl, capsys):
    from peftlab.evaluate import evaluate_command

    cfg = _config(tmp_path, tiny_llama, generation_jsonl)
    code, out, err = run_main(["fit", "--config", cfg, *LMEVAL, "--trainer.callbacks.stages=[val,test]",
                               "--trainer.callbacks.every_n_validations=2"], capsys)
    assert code == 0, err[-3000:]
    rows = _metrics(tmp_path)
    losses = [r for r in rows if r.get("val/loss")]
    scored = [r for r in rows if r.get(f"val/{MC}/acc")]
    assert len(losses) == 4 and [r["step"] for r in scored] == [losses[0]["step"], losses[2]["step"]]
    assert all(r.get(f"val/{GEN}/exact_match_extract") for r in scored)
    test = next(r for r in rows if r.get(f"test/{MC}/acc"))
    # the exported run, scored alone by `peftlab evaluate`, gets the same numbers as the callback did in the fit
    alone = evaluate_command(str(tmp_path / "runs/lmeval/version_0"), tasks=[MC, GEN], limit=6, batch_size=4,
                             max_gen_toks=3)["results"]
    assert float(test[f"test/{MC}/acc"]) == pytest.approx(alone[MC]["acc,none"], abs=1e-6)
    assert float(test[f"test/{GEN}/exact_match_extract"]) == pytest.approx(alone[GEN]["exact_match,extract"],
                                                                           abs=1e-6)


def test_scoring_during_fit_leaves_the_training_random_streams_alone(tmp_path, tiny_llama, generation_jsonl, capsys):
    """lm-eval seeds python/numpy/torch when it starts: the callback restores them, so with LoRA dropout on, a run
    evaluated at every validation trains exactly as one that is not."""
    cfg = _config(tmp_path, tiny_llama, generation_jsonl)
    common = ["fit", "--config", cfg, "--test_after_fit", "false", "--model.dropout", "0.3"]
    assert run_main(common, capsys)[0] == 0
    assert run_main([*common, *LMEVAL, "--trainer.callbacks.stages=[val]", "--trainer.callbacks.seed=123"],
                    capsys)[0] == 0
    plain, scored = _metrics(tmp_path, 0), _metrics(tmp_path, 1)
    train = [[r["train/loss"] for r in rows if r.get("train/loss")] for rows in (plain, scored)]
    val = [[r["val/loss"] for r in rows if r.get("val/loss")] for rows in (plain, scored)]
    assert len(train[0]) == 4 and train[0] == train[1] and val[0] == val[1]
    assert sum(1 for r in scored if r.get(f"val/{MC}/acc")) == 4


def test_per_document_scores_average_to_the_logged_metric(tmp_path, tiny_llama, generation_jsonl, capsys):
    from lightning.pytorch import Trainer

    from peftlab.callbacks import LMEval
    from peftlab.data import PeftDataModule
    from peftlab.methods import LoRA

    callback = LMEval([MC, GEN], limit=5, batch_size=4, max_gen_toks=3)
    module = LoRA(backbone=tiny_llama, task="causal_lm", target_modules=["q_proj", "v_proj"])
    data = PeftDataModule(source=generation_jsonl, task="causal_lm", tokenizer=tiny_llama, max_length=48,
                          max_eval_samples=4)
    trainer = Trainer(max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_test_batches=1)
    trainer.fit(module, data)
    (logged,) = trainer.test(module, data, verbose=False)
    per_doc = callback.outcomes["test"]
    assert set(per_doc) == {MC, GEN} and len(per_doc[MC]["acc"]) == 5 and per_doc[MC]["n"] == [1.0] * 5
    assert sum(per_doc[MC]["acc"]) / 5 == pytest.approx(logged[f"test/{MC}/acc"], abs=1e-6)
    assert sum(per_doc[GEN]["exact_match_extract"]) / 5 == pytest.approx(logged[f"test/{GEN}/exact_match_extract"],
                                                                          abs=1e-6)
    assert callback.metrics["test"][f"{MC}/acc"] == pytest.approx(logged[f"test/{MC}/acc"], abs=1e-6)
