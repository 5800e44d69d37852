"""peftlab.callbacks.GenerationEval: generated-text metrics every N validations during fit, and the generations
file `peftlab test` writes on a generative run."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import run_main, write_config
from peftlab.errors import PeftLabError


def _config(tmp_path, tiny_llama, generation_jsonl, **trainer):
    return write_config(tmp_path, tiny_llama, generation_jsonl, model={"target_modules": ["q_proj", "v_proj"],
                                                                       "max_new_tokens": 3},
                        data={"task": "causal_lm", "max_length": 48, "max_eval_samples": 12},
                        trainer={"max_steps": 4, "val_check_interval": 1, "limit_val_batches": 1,
                                 "limit_test_batches": 2, **trainer}, run_name="gen")


def test_generation_metrics_every_second_validation_beside_the_loss(tmp_path, tiny_llama, generation_jsonl, capsys):
    cfg = _config(tmp_path, tiny_llama, generation_jsonl)
    code, out, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false",
                               "--trainer.callbacks+=peftlab.callbacks.GenerationEval",
                               "--trainer.callbacks.max_new_tokens=3", "--trainer.callbacks.stages=[val]",
                               "--trainer.callbacks.every_n_validations=2", "--trainer.callbacks.max_batches=1"],
                              capsys)
    assert code == 0, err[-3000:]
    rows = list(csv.DictReader(open(next((tmp_path / "runs").rglob("metrics.csv")))))
    losses = [r for r in rows if r.get("val/loss")]
    generated = [r for r in rows if r.get("val/rougeL")]
    assert len(losses) == 4 and len(generated) == 2  # validations 1 and 3 of 4
    assert [r["step"] for r in generated] == [losses[0]["step"], losses[2]["step"]]
    assert all(0 <= float(r["val/gen_exact_match"]) <= 1 and 0 <= float(r["val/bleu"]) <= 1 for r in generated)


def test_peftlab_test_writes_the_generations_file(tmp_path, tiny_llama, generation_jsonl, capsys):
    cfg = _config(tmp_path, tiny_llama, generation_jsonl)
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    ckpt = str(next((tmp_path / "runs/gen/version_0/checkpoints").glob("*.ckpt")))
    code, out, err = run_main(["test", "--config", cfg, "--ckpt_path", ckpt], capsys)
    assert code == 0, err[-3000:]
    (path,) = (tmp_path / "runs" / "gen").rglob("generations.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12  # every test example (max_eval_samples), in order
    assert set(rows[0]) == {"input", "reference", "generated", "gen_exact_match", "rougeL"}
    sources = [json.loads(line) for line in open(generation_jsonl)]
    assert {r["reference"].strip() for r in rows} <= {"fresh", "rotten"}
    assert all(any(s["prompt"].strip().endswith(r["input"].strip()[-30:]) for s in sources) for r in rows)
    metrics = list(csv.DictReader(open(path.parent / "metrics.csv")))
    logged = float(next(r for r in metrics if r.get("test/gen_exact_match"))["test/gen_exact_match"])
    assert logged == pytest.approx(sum(r["gen_exact_match"] for r in rows) / len(rows))


def test_classification_test_writes_no_generations(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="cls", trainer={"max_steps": 1})
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    ckpt = str(next((tmp_path / "runs/cls/version_0/checkpoints").glob("*.ckpt")))
    code, out, err = run_main(["test", "--config", cfg, "--ckpt_path", ckpt], capsys)
    assert code == 0 and "test/acc" in out, err[-3000:]
    assert not list((tmp_path / "runs").rglob("generations.jsonl"))


def test_bad_settings_are_refused():
    from peftlab.callbacks import GenerationEval

    with pytest.raises(PeftLabError, match="stages"):
        GenerationEval(stages=["train"])
    with pytest.raises(PeftLabError, match="every_n_validations"):
        GenerationEval(every_n_validations=0)
