"""``peftlab compare``: study-file checks, a tiny study end to end (tuning with pruning, seeds, report), resuming,
two workers on one SQLite study, the bootstrap intervals on data with known answers, and generated-text metrics.

Everything runs on the tiny models of conftest.py with budgets of a few steps (each run is a real `peftlab fit`).

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_compare_runs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, run_main, starts, tiny_study, write_config
from peftlab.errors import PeftLabError

MC, GEN = "peftlab_rotten_tomatoes_mc", "peftlab_rotten_tomatoes_gen"


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, expected", [
    ({"methods": {"lora": {"config": "configs/methods/nope.yaml"}}}, "method layer configs/methods/nope.yaml does not exist"),
    ({"methods": {"lora": {"overrides": {"model": "peftlab.methods.NoSuchMethod"}}}}, "NoSuchMethod"),
    ({"methods": {"lora": {"search": {"num_virtual_tokens": [2, 8]}}}}, "LoRA has no argument 'num_virtual_tokens'"),
    ({"methods": {"lora": {"search": {"learning_rte": [1e-4, 1e-2]}}}}, "Did you mean 'learning_rate'"),
    ({"select": "val/accuracy"}, "select metric 'val/accuracy' is never logged for classification"),
    ({"report": ["test/bleu"]}, "report metric 'test/bleu' is never logged for classification"),
    ({"select": "test/acc"}, "uses the val split"),
    ({"baseline": "full"}, "baseline: 'full' is not one of the methods"),
    ({"search": {"learning_rate": [1e-2, 1e-4]}}, "low must be below high"),
    ({"budget": {"max_steps": 5, "val_check_interval": 2}}, "must be a multiple of val_check_interval"),
    ({"tuning": {"trials": 0}}, "tuning.trials: must be an integer >= 1"),
    ({"methdos": {}}, "unknown key 'methdos'"),
    ({"tuning": {"trials": 2, "overrides": {"data.max_eval_smples": 8}}}, "(tuning runs)"),
    ({"tuning": {"trials": 2, "reduction_factor": 1}}, "tuning.reduction_factor: must be an integer >= 2"),
    ({"budget": {"max_steps": 4, "val_check_interval": 0.5}}, "set tuning.min_resource"),
    # the typed sections (peftlab.compare.schema): each key's type, a choice's values
    ({"budget": {"max_steps": "4"}}, "budget.max_steps: must be an integer (got '4')"),
    ({"tuning": {"trials": 2, "sampler": "grid"}}, "tuning.sampler: must be tpe, random or qmc (got 'grid')"),
    ({"tuning": {"trials": 2, "pruner": "median"}}, "tuning.pruner: must be successive_halving or none"),
    ({"bootstrap": {"level": "high"}}, "bootstrap.level: must be a number (got 'high')"),
    ({"generation": {"max_new_tokens": 4, "during_validation": "yes"}},
     "generation.during_validation: must be true or false (got 'yes')"),
    ({"methods": {"lora": {"title": 3}}}, "methods.lora.title: must be a string (got 3)"),
    # null only where the key has a meaning for it (pruner: none); elsewhere it is refused, not read as the default
    ({"bootstrap": {"reps": None}}, "bootstrap.reps: must be an integer (got None)"),
])
def test_study_file_errors_are_one_line_before_any_run(tmp_path, tiny_bert, sentiment_csv, capsys, change, expected):
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, **change)
    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(tmp_path / "sd")], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftlab: error: "), err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "sd").exists()  # no study directory, no run directory


def test_head_learning_rate_search_needs_classification(tmp_path, tiny_llama, generation_jsonl, capsys):
    study = tiny_study(tmp_path, tiny_llama, generation_jsonl, task="causal_lm",
                       search={"learning_rate": [1e-3, 1e-1], "head_learning_rate": [1e-3, 1e-1]})
    code, _, err = run_main(["compare", "--config", str(study), "--study_dir", str(tmp_path / "sd")], capsys)
    assert code == 2 and "head_learning_rate only exists for classification" in err
    assert not (tmp_path / "sd").exists()


@pytest.mark.parametrize("url", ["nosuchdriver://x/y", "sqlite:////nonexistent-dir/x/study.db"])
def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path, tiny_bert, sentiment_csv, capsys, url):
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv)
    code, _, err = run_main(["compare", "--config", str(study), "--study_dir", str(tmp_path / "sd"),
                             "--storage", url], capsys)
    assert code == 2 and err.count("\n") == 1 and f"storage {url!r} cannot be opened" in err, err
    assert not (tmp_path / "sd").exists()


# ---------------------------------------------------------------------------------------------- end to end
def test_tiny_study_end_to_end_then_a_rerun_does_nothing(tmp_path, tiny_bert, sentiment_csv, capsys):
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv)
    sd = tmp_path / "sd"
    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 0, err[-3000:]
    assert "tuning trial 1/3" in out and "seed 1 (2/2)" in out  # progress is shown
    ran = starts(sd)
    # 2 methods x (3 trials + 2 seeds), each run once
    assert len(ran) == 10 and set(ran.values()) == {1}, ran
    results = json.loads((sd / "results.json").read_text())
    assert (sd / "report.md").is_file() and (sd / "pareto.png").is_file()
    report = (sd / "report.md").read_text()
    assert "test/acc mean [95% CI]" in report and "Δtest/acc vs lora" in report
    part = results["parts"][0]
    for m in part["methods"]:
        assert m["trainable"] > 0 and m["total"] > m["trainable"] and m["memory"]["total"] > 0
        assert m["best"] is not None and "learning_rate" in m["best"]["params"]
        assert len(m["trials"]) == 3
        assert [s["seed"] for s in m["seeds"]] == [0, 1] and all("metrics" in s for s in m["seeds"])
        for metric in ("test/acc", "test/f1", "test/loss"):
            iv = m["test"][metric]
            assert iv["seeds"] == 2 and iv["examples"] == 12
            assert iv["low"] <= iv["mean"] <= iv["high"], (metric, iv)
        # the per-example outcomes reproduce what the run logged
        for s, per_seed in zip(m["seeds"], m["test"]["test/acc"]["per_seed"]):
            assert per_seed == pytest.approx(s["metrics"]["test/acc"], abs=1e-6)
            assert m["test"]["test/f1"]["per_seed"][m["seeds"].index(s)] == pytest.approx(s["metrics"]["test/f1"],
                                                                                          abs=1e-5)
        if m["name"] == "lora":
            assert m["vs_baseline"] == {}
        else:
            d = m["vs_baseline"]["test/acc"]
            assert d["low"] <= d["mean"] <= d["high"]
    # the tuning runs never looked at the test split: no test metrics in their logs
    for metrics_csv in (sd / "runs").rglob("tune-*/metrics.csv"):
        assert "test/" not in metrics_csv.read_text()
    trial_runs = sorted(p.name for p in (sd / "runs" / "main" / "lora").iterdir())
    assert trial_runs == ["seed-0", "seed-1", "tune-000", "tune-001", "tune-002"]
    assert not list((sd / "runs").rglob("*.ckpt"))  # checkpoints cleaned once a run finished

    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 0, err
    assert starts(sd) == ran and "nothing was left to do" in out
    assert json.loads((sd / "results.json").read_text())["parts"] == results["parts"]


def test_successive_halving_stops_a_poor_trial(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Trial 0 at a rate too small to move the model, then a rate so large that the validation loss gets worse at
    once: the second is pruned at the first rung (successive halving keeps the better half)."""
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, seeds=[0], select="val/loss",
                       tuning={"trials": 2, "reduction_factor": 2, "sampler": "random"},
                       methods={"lora": {"search": {"learning_rate": {"choices": [1e-9, 0.3]}}}})
    import optuna

    sd = tmp_path / "sd"
    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd), "--check"], capsys)
    assert code == 0, err
    # fix the order of the two rates: enqueue them as the first trials
    storage = optuna.storages.RDBStorage(f"sqlite:///{sd / 'study.db'}")
    tune = optuna.create_study(storage=storage, study_name="tiny/main/lora/tune", direction="minimize",
                               load_if_exists=True)
    tune.enqueue_trial({"learning_rate": 1e-9})
    tune.enqueue_trial({"learning_rate": 0.3})
    del storage
    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 0, err[-3000:]
    trials = json.loads((sd / "results.json").read_text())["parts"][0]["methods"][0]["trials"]
    assert [t["state"] for t in trials] == ["complete", "pruned"], trials
    assert trials[1]["validations"] < 4 and "pruned (successive halving)" in out


def test_an_interrupted_study_continues_where_it_stopped(tmp_path, tiny_bert, sentiment_csv, capsys, monkeypatch):
    """Ctrl-C in the middle of the third run: the next invocation runs that one again and nothing finished."""
    import lightning as L

    from peftlab.compare import worker

    class Interrupt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    calls = []
    real = worker.run_fit

    def flaky(args, callbacks, log_path):
        calls.append(log_path.name)
        return real(args, [*callbacks, Interrupt()] if len(calls) == 3 else callbacks, log_path)

    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, methods={"lora": {}}, seeds=[0, 1])
    sd = tmp_path / "sd"
    monkeypatch.setattr(worker, "run_fit", flaky)
    code, out, _ = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 130 and "the same command continues the study" in out
    first = starts(sd)
    assert list(first) == ["main/lora/tune-000", "main/lora/tune-001", "main/lora/tune-002"]
    monkeypatch.setattr(worker, "run_fit", real)
    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 0, err[-3000:]
    ran = starts(sd)
    assert ran == {"main/lora/tune-000": 1, "main/lora/tune-001": 1, "main/lora/tune-002": 2,
                   "main/lora/seed-0": 1, "main/lora/seed-1": 1}, ran
    m = json.loads((sd / "results.json").read_text())["parts"][0]["methods"][0]
    assert [t["state"] for t in m["trials"]][-1] != "running" and len(m["seeds"]) == 2


# ---------------------------------------------------------------------------------------------- statistics
def test_bootstrap_interval_matches_the_known_answer():
    from peftlab.compare import stats

    rng = np.random.default_rng(0)
    n, p = 4000, 0.7
    correct = (rng.random(n) < p).astype(float)
    run = {"correct": correct, "n": np.ones(n)}
    iv = stats.bootstrap([run], stats.metric_function("test/acc", "classification"), ["correct", "n"], reps=2000)
    half = 1.96 * np.sqrt(correct.mean() * (1 - correct.mean()) / n)
    assert iv.mean == pytest.approx(correct.mean())
    assert iv.low == pytest.approx(iv.mean - half, abs=0.25 * half)
    assert iv.high == pytest.approx(iv.mean + half, abs=0.25 * half)
    # fixed RNG seed: the same interval every time
    again = stats.bootstrap([run], stats.metric_function("test/acc", "classification"), ["correct", "n"], reps=2000)
    assert (again.low, again.high) == (iv.low, iv.high)
    # everything right: no uncertainty left
    all_right = {"correct": np.ones(50), "n": np.ones(50)}
    iv = stats.bootstrap([all_right], stats.metric_function("test/acc", "classification"), ["correct", "n"])
    assert (iv.low, iv.mean, iv.high) == (1.0, 1.0, 1.0)


def test_bootstrap_over_seeds_widens_with_the_spread_between_seeds():
    from peftlab.compare import stats

    rng = np.random.default_rng(1)
    fn, cols = stats.metric_function("test/acc", "classification"), ["correct", "n"]
    n = 2000
    same = [{"correct": (rng.random(n) < 0.8).astype(float), "n": np.ones(n)} for _ in range(4)]
    spread = [{"correct": (rng.random(n) < p).astype(float), "n": np.ones(n)} for p in (0.6, 0.7, 0.8, 0.9)]
    a, b = stats.bootstrap(same, fn, cols), stats.bootstrap(spread, fn, cols)
    assert (b.high - b.low) > 3 * (a.high - a.low)
    assert b.low <= b.mean <= b.high and b.mean == pytest.approx(np.mean(b.per_seed))


def test_intervals_are_cut_to_the_metric_range():
    """Two seeds far apart near the top of [0, 1]: the t-interval (t = 12.7) would pass 1; the report's interval is
    cut at 1 (and a difference at +-1), while an unbounded metric keeps its whole interval."""
    from peftlab.compare import stats

    fn, cols = stats.metric_function("test/acc", "classification"), ["correct", "n"]
    n = 200
    right = {"correct": np.ones(n), "n": np.ones(n)}
    most = {"correct": (np.arange(n) % 5 != 0).astype(float), "n": np.ones(n)}  # 0.8
    wrong = {"correct": np.zeros(n), "n": np.ones(n)}
    uncut = stats.bootstrap([right, most], fn, cols)
    assert uncut.high > 1.0  # what the cut is for
    iv = stats.bootstrap([right, most], fn, cols, bounds=stats.metric_range("test/acc"))
    assert uncut.low < 0.0 and (iv.low, iv.high) == (0.0, 1.0) and iv.mean == pytest.approx(0.9)
    d = stats.paired_bootstrap([right, wrong], [wrong, right], fn, cols, bounds=stats.metric_range("test/acc"))
    assert d.mean == 0.0 and (d.low, d.high) == (-1.0, 1.0)
    assert stats.metric_range("test/loss") == (0.0, float("inf")) and stats.metric_range("test/f1") == (0.0, 1.0)


def test_seeds_that_agree_leave_only_the_examples_uncertainty():
    """Two seeds with the same outcomes: the seed part is 0, so the interval is the one-seed interval (the examples'
    bootstrap with the normal quantile), not 12.7 (t, 1 degree of freedom) times it."""
    from peftlab.compare import stats

    rng = np.random.default_rng(3)
    fn, cols = stats.metric_function("test/acc", "classification"), ["correct", "n"]
    run = {"correct": (rng.random(640) < 0.58).astype(float), "n": np.ones(640)}
    one, two = stats.bootstrap([run], fn, cols), stats.bootstrap([run, run], fn, cols)
    assert (two.low, two.high) == pytest.approx((one.low, one.high), abs=1e-12)
    assert two.high - two.low < 0.1  # 640 examples: about +-0.04


def test_paired_difference_cancels_what_both_methods_share():
    from peftlab.compare import stats

    rng = np.random.default_rng(2)
    fn, cols = stats.metric_function("test/acc", "classification"), ["correct", "n"]
    n = 1000
    base = (rng.random(n) < 0.5).astype(float)
    better = base.copy()
    flip = np.flatnonzero(base == 0)[:50]  # B gets 50 more examples right: +0.05 exactly, on every resample > 0
    better[flip] = 1.0
    a, b = [{"correct": better, "n": np.ones(n)}], [{"correct": base, "n": np.ones(n)}]
    d = stats.paired_bootstrap(a, b, fn, cols)
    assert d.mean == pytest.approx(0.05)
    assert 0 < d.low <= d.mean <= d.high < 0.08
    unpaired_width = stats.bootstrap(a, fn, cols).high - stats.bootstrap(a, fn, cols).low
    assert (d.high - d.low) < 0.5 * unpaired_width
    same = stats.paired_bootstrap(b, b, fn, cols)
    assert (same.low, same.mean, same.high) == (0.0, 0.0, 0.0)


def test_bootstrap_coverage_is_about_95_percent():
    from peftlab.compare import stats

    rng = np.random.default_rng(3)
    fn, cols = stats.metric_function("test/acc", "classification"), ["correct", "n"]
    hits = 0
    for i in range(120):
        c = (rng.random(300) < 0.6).astype(float)
        iv = stats.bootstrap([{"correct": c, "n": np.ones(300)}], fn, cols, reps=400, rng_seed=i)
        hits += iv.low <= 0.6 <= iv.high
    assert 0.88 <= hits / 120 <= 0.99


def test_student_t_quantiles_match_the_tables():
    from peftlab.compare import stats

    # two-sided 95% (p = 0.975) and 90% (p = 0.95) critical values from the standard t table
    table = {(0.975, 1): 12.7062, (0.975, 2): 4.3027, (0.975, 3): 3.1824, (0.975, 4): 2.7764, (0.975, 10): 2.2281,
             (0.975, 30): 2.0423, (0.95, 5): 2.0150, (0.995, 3): 5.8409}
    for (p, df), value in table.items():
        assert stats.student_t_quantile(p, df) == pytest.approx(value, abs=2e-4)
        assert stats.student_t_quantile(1 - p, df) == pytest.approx(-value, abs=2e-4)
    with pytest.raises(ValueError):
        stats.student_t_quantile(0.975, 0)


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_intervals_over_few_seeds_cover_the_truth(seeds):
    """Seeds that really differ (each seed's true accuracy drawn around 0.7, sd 0.05): the nominal 95% interval
    over 2, 3 or 5 seeds covers the mean over seeds and test data about 95% of the time, or more. Resampling the
    seeds instead (the first version) covered it 63% / 78% / 87% of the time."""
    from peftlab.compare import stats

    rng = np.random.default_rng(5)
    fn, cols = stats.metric_function("test/acc", "classification"), ["correct", "n"]
    hits, trials = 0, 150
    for i in range(trials):
        runs = [{"correct": (rng.random(400) < p).astype(float), "n": np.ones(400)}
                for p in np.clip(rng.normal(0.7, 0.05, seeds), 0, 1)]
        iv = stats.bootstrap(runs, fn, cols, reps=200, rng_seed=i)
        hits += iv.low <= 0.7 <= iv.high
    assert 0.9 <= hits / trials <= 1.0


def test_per_example_metrics_equal_torchmetrics():
    import torch
    import torchmetrics
    from torchmetrics.text import BLEUScore

    from peftlab.compare import stats

    rng = np.random.default_rng(4)
    pred, label = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    cols = stats.classification_columns(pred, label, np.zeros(200), 3)
    sums = {k: v.sum() for k, v in cols.items()}
    expected = torchmetrics.functional.f1_score(torch.tensor(pred), torch.tensor(label), task="multiclass",
                                                num_classes=3, average="macro")
    assert float(stats.macro_f1(sums, 3)) == pytest.approx(float(expected), abs=1e-6)
    preds = ["the cat sat on the mat", "a dog ran in the park today", "hello there", ""]
    refs = ["the cat sat on a mat", "the dog ran in the park", "hello there my friend", "nothing"]
    rows = [stats.bleu_stats(p, r) for p, r in zip(preds, refs)]
    summed = {k: sum(r[k] for r in rows) for k in rows[0]}
    bleu = BLEUScore()
    bleu.update(preds, [[r] for r in refs])
    assert float(stats.corpus_bleu(summed)) == pytest.approx(float(bleu.compute()), abs=1e-6)


# ---------------------------------------------------------------------------------------------- generated text
def test_generated_text_metrics_on_a_tiny_causal_lm(tmp_path, tiny_llama, generation_jsonl, capsys):
    from torchmetrics.text import BLEUScore, ROUGEScore

    import peftlab.compare
    from peftlab.callbacks import GenerationEval as GeneratedTextMetrics

    assert peftlab.compare.GeneratedTextMetrics is GeneratedTextMetrics  # the former name still loads configs
    cfg = write_config(tmp_path, tiny_llama, generation_jsonl,
                       model={"target_modules": ["q_proj", "v_proj"]},
                       data={"task": "causal_lm", "max_length": 48},
                       trainer={"max_steps": 2, "val_check_interval": 2, "limit_test_batches": 1,
                                "limit_val_batches": 1})
    code, out, err = run_main(["fit", "--config", cfg, "--trainer.callbacks+=peftlab.callbacks.GenerationEval",
                               "--trainer.callbacks.max_new_tokens=3"], capsys)
    assert code == 0, err[-3000:]
    metrics = next((tmp_path / "runs").rglob("metrics.csv")).read_text().splitlines()[0]
    for name in ("val/gen_exact_match", "val/rougeL", "val/bleu", "test/gen_exact_match", "test/rougeL", "test/bleu"):
        assert name in metrics

    # the prompts given to generate are the prompts alone, left-padded; the references are the responses
    from peftlab.data import PeftDataModule
    from peftlab.methods import LoRA

    data = PeftDataModule(source=generation_jsonl, task="causal_lm", tokenizer=tiny_llama, max_length=128,
                          batch_size=4)
    batch = next(iter(data.test_dataloader()))
    tok = data.tokenizer
    inputs, refs = GeneratedTextMetrics.prompts_and_references(batch, "causal_lm", tok.pad_token_id)
    rows = data.raw["test"]
    for i in range(4):
        prompt = tok.decode(inputs["input_ids"][i][inputs["attention_mask"][i].bool()], skip_special_tokens=True)
        # the prompt (its end, where max_length cut a long review), without the response
        assert len(prompt.strip()) > 20 and rows[i]["prompt"].strip().endswith(prompt.strip())
        assert tok.decode(refs[i], skip_special_tokens=True).strip() == rows[i]["response"].strip()
        assert inputs["attention_mask"][i][-1] == 1  # left padding: the prompt ends at the last position
    model = LoRA(backbone=tiny_llama, task="causal_lm", r=4, target_modules=["q_proj", "v_proj"]).build().eval()
    callback = GeneratedTextMetrics(max_new_tokens=4, stages=("test",))
    callback._start("test")
    import torch

    with torch.no_grad():
        callback._batch("test", model, batch)
        preds, references = callback.generate(model, batch)
    assert len(callback.examples["test"]) == 4 and len(preds) == 4
    rouge, bleu = ROUGEScore(rouge_keys="rougeL"), BLEUScore()
    rouge.update(preds, references)
    bleu.update(preds, [[r] for r in references])
    per_example = callback.examples["test"]
    assert np.mean([r["rougeL"] for r in per_example]) == pytest.approx(float(rouge.compute()["rougeL_fmeasure"]),
                                                                        abs=1e-5)
    from peftlab.compare import stats

    summed = {k: sum(r[k] for r in per_example) for k in per_example[0] if k.startswith("bleu_")}
    assert float(stats.corpus_bleu(summed)) == pytest.approx(float(bleu.compute()), abs=1e-6)
    # an exact answer (the reference itself, with other spacing) scores 1 on exact match and ROUGE-L
    exact = GeneratedTextMetrics(max_new_tokens=4, stages=("test",))
    exact._start("test")
    exact.generate = lambda module, b: ([f"  {r}  " for r in references], list(references))
    exact._batch("test", model, batch)
    assert [r["gen_exact_match"] for r in exact.examples["test"]] == [1.0] * 4
    assert [r["rougeL"] for r in exact.examples["test"]] == pytest.approx([1.0] * 4)
    assert any(r["gen_exact_match"] == 0.0 for r in per_example)  # the untrained model's text is not the answer


def test_causal_lm_study_with_generation_and_forgetting(tmp_path, tiny_llama, generation_jsonl, capsys):
    study = tiny_study(tmp_path, tiny_llama, generation_jsonl, task="causal_lm", seeds=[0],
                       tuning={"trials": 2, "reduction_factor": 2},
                       report=["test/loss", "test/gen_exact_match", "test/rougeL", "test/bleu"],
                       generation={"max_new_tokens": 3},
                       forgetting={"source": generation_jsonl, "text_column": "prompt", "max_samples": 8,
                                   "max_length": 32},
                       methods={"lora": {}})
    sd = tmp_path / "sd"
    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd), "--latency"], capsys)
    assert code == 0, err[-3000:]
    m = json.loads((sd / "results.json").read_text())["parts"][0]["methods"][0]
    for metric in ("test/loss", "test/gen_exact_match", "test/rougeL", "test/bleu"):
        iv = m["test"][metric]
        assert iv["low"] <= iv["mean"] <= iv["high"], (metric, iv)
        assert iv["mean"] == pytest.approx(m["seeds"][0]["metrics"][metric], abs=1e-5), metric
    f = m["forgetting"]
    assert f["before"] > 0 and f["after"] > 0 and f["delta"] == pytest.approx(f["after"] - f["before"])
    assert m["latency"]["ms_per_batch"] > 0
    report = (sd / "report.md").read_text()
    assert "reference loss before → after" in report and "Generated text" in report


def test_lm_eval_metrics_without_per_document_scores_get_the_seed_interval():
    from peftlab.compare import stats

    iv = stats.seed_interval([0.5, 0.7], 0.95, (0.0, 1.0))
    assert iv.mean == pytest.approx(0.6) and iv.examples == 0
    # t(0.975, 1) = 12.706 times the standard error 0.1
    assert iv.low == 0.0 and iv.high == 1.0
    iv = stats.seed_interval([0.5, 0.52, 0.54], 0.95)
    assert (iv.high - iv.mean) == pytest.approx(4.303 * 0.02 / 3 ** 0.5, rel=1e-3)  # t(0.975, 2)


@pytest.mark.parametrize("change, expected", [
    ({"report": [f"test/{MC}/acc"]}, "is an lm-eval metric (<stage>/<task>/<metric>); add an lm_eval section"),
    ({"report": [f"test/{MC}/acc"], "lm_eval": {"tasks": [GEN]}}, f"names task '{MC}', which lm_eval.tasks does not run"),
    ({"report": [f"test/{MC}/accuracy"], "lm_eval": {"tasks": [MC]}}, f"task {MC} reports test/{MC}/acc"),
    ({"select": f"test/{MC}/acc", "lm_eval": {"tasks": [MC]}}, "select uses the val split"),
    ({"lm_eval": {"tasks": ["peftlab_rotten_tomatos_mc"]}}, "unknown task 'peftlab_rotten_tomatos_mc'. Did you mean"),
    ({"lm_eval": {"tasks": [MC], "limit": 0}}, "lm_eval: --limit must be positive"),
    ({"lm_eval": {"tasks": []}}, "lm_eval.tasks: must list lm-eval tasks"),
    ({"lm_eval": {"tasks": [MC], "shots": 2}}, "unknown key 'shots'"),
])
def test_lm_eval_study_errors_are_one_line_before_any_run(tmp_path, tiny_llama, generation_jsonl, capsys, change,
                                                          expected):
    study = tiny_study(tmp_path, tiny_llama, generation_jsonl, task="causal_lm", **change)
    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(tmp_path / "sd")], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines[0]
    assert not (tmp_path / "sd").exists()


# ---------------------------------------------------------------------------------------------- shipped studies
# every study file (a YAML with methods:), not the experiments' other YAML (param_efficiency's fit configs)
STUDIES = sorted(p for p in ROOT.glob("experiments/*/*.yaml") if "methods" in (yaml.safe_load(p.read_text()) or {}))


PUBLISHED = [s for s in STUDIES if s.with_suffix(".results.json").is_file()]


def test_every_shipped_study_that_publishes_has_been_run():
    """A study file with ``publish:`` ships with its results (the page then comes from them, tested below): no
    results page is left to a hand-written runner or to an estimate."""
    import yaml

    publishing = [s for s in STUDIES if yaml.safe_load(s.read_text()).get("publish")]
    assert len(publishing) == 6 and set(publishing) <= set(PUBLISHED), sorted(map(str, set(publishing) - set(PUBLISHED)))


@pytest.mark.parametrize("study", PUBLISHED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_published_study_pages_are_what_their_results_give(study, tmp_path):
    """A study run to its end publishes a docs page and ``<study>.results.json``; the committed page must be what
    those results render to (so a page edited by hand, or results changed without the page, fails here)."""
    import yaml

    from peftlab.compare.report import render

    page = ROOT / yaml.safe_load(study.read_text())["publish"]
    results = json.loads(study.with_suffix(".results.json").read_text())
    # the plots go to tmp_path (a test writes nothing into the repository); the page links them by name
    assert page.read_text() == render(results, tmp_path, image_prefix=page.stem + "-"), \
        f"regenerate: python -c \"from peftlab.compare.report import rerender ...\" or re-run peftlab compare {study}"


def test_a_single_part_does_not_repeat_the_study_title_and_description(tmp_path):
    """A study with one unnamed part: its title and description appear once (as the page's), not again as a part
    heading; a study of several parts keeps one heading per part."""
    from peftlab.compare.report import render
    from peftlab.compare.study import load_study

    (part,) = load_study(ROOT / "experiments/quality_vs_params/study_variants.yaml").parts
    assert (part.title, part.description, part.expected_duration) == ("", "", None)
    results = json.loads((ROOT / "experiments/quality_vs_params/study_variants.results.json").read_text())
    text = render(results, tmp_path)
    assert text.count(results["title"]) == 1 and text.count(results["description"]) == 1
    assert text.startswith(f"# {results['title']}") and "\n## " not in text
    two = {**results, "parts": [{**results["parts"][0], "name": "a", "title": "part A"},
                                {**results["parts"][0], "name": "b", "title": "part B"}]}
    text = render(two, tmp_path)
    assert "\n## part A\n" in text and "\n## part B\n" in text


def test_parts_do_not_inherit_the_study_title_description_and_duration(tmp_path):
    """A study of several parts: the page gives the study's title, description and duration once; each part is
    headed by its own name; plot files are named by the part's slug (no spaces in links)."""
    from peftlab.compare.report import render
    from peftlab.compare.study import load_study

    study = load_study(ROOT / "experiments/few_shot/study.yaml")
    assert [(p.title, p.description, p.expected_duration) for p in study.parts] == \
        [(name, "", None) for name in ("k=8", "k=16", "k=64", "k=all (2000)")]
    assert study.expected_duration and study.description
    results = json.loads((ROOT / "experiments/quality_vs_params/study_variants.results.json").read_text())
    part = {**results["parts"][0], "description": "", "expected_duration": None}
    several = {**results, "expected_duration": "1 min", "parts": [{**part, "name": "k=8", "title": "k=8"},
                                                                   {**part, "name": "k=all (2000)",
                                                                    "title": "k=all (2000)"}]}
    text = render(several, tmp_path)
    assert text.count(results["title"]) == 1 and text.count("Duration of the default budget: 1 min.") == 1
    assert "\n## k=8\n" in text and "\n## k=all (2000)\n" in text
    assert "(pareto-k=all_2000.png)" in text and (tmp_path / "pareto-k=all_2000.png").is_file()


def test_notes_are_read_into_the_results_and_end_the_page(tmp_path):
    """``notes:`` (a markdown file written after a study ran) is carried in results.json, so the page regenerates
    with it; a missing file is one line at load time; the notes change no method's fingerprint."""
    from peftlab.compare.report import render
    from peftlab.compare.study import load_study

    src = ROOT / "experiments/quality_vs_params/study_variants.yaml"
    notes = tmp_path / "notes.md"
    notes.write_text("## Beside the published table\n\nLoRA first, as in PEFT's table.\n")
    with_notes = tmp_path / "study.yaml"
    with_notes.write_text(src.read_text() + f"\nnotes: {notes}\n")
    study, plain = load_study(with_notes), load_study(src)
    assert study.notes == notes
    assert [study.parts[0].fingerprint(m) for m in study.parts[0].methods.values()] == \
        [plain.parts[0].fingerprint(m) for m in plain.parts[0].methods.values()]
    results = json.loads((ROOT / "experiments/quality_vs_params/study_variants.results.json").read_text())
    text = render({**results, "notes": notes.read_text()}, tmp_path)
    assert text.endswith("## Beside the published table\n\nLoRA first, as in PEFT's table.\n")
    assert "Beside the published table" not in render(results, tmp_path)
    with_notes.write_text(src.read_text() + "\nnotes: missing.md\n")
    with pytest.raises(PeftLabError, match="notes: missing.md is not a file") as info:
        load_study(with_notes)
    assert "\n" not in str(info.value)


def _readme_study(tmp_path) -> Path:
    """The minimal study file shown in the README (the first ```yaml block after '## Comparing methods')."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Comparing methods"):]
    block = section[section.index("```yaml") + len("```yaml"):]
    path = tmp_path / "readme_study.yaml"
    path.write_text(block[:block.index("```")])
    return path


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("study", [*STUDIES, "README"], ids=lambda p: p if p == "README" else f"{p.parent.name}/{p.name}")
def test_shipped_study_files_pass_the_checks(study, smoke, tmp_path, capsys, monkeypatch):
    """Every study file under experiments/ and the README's minimal one parse, and every method, search space and
    metric in them exists (``--check`` builds nothing and trains nothing)."""
    monkeypatch.chdir(ROOT)
    path = _readme_study(tmp_path) if study == "README" else study
    argv = ["compare", "--config", str(path), "--check", "--study_dir", str(tmp_path / "sd")]
    code, out, err = run_main(argv + (["--smoke"] if smoke else []), capsys)
    assert code == 0, err
    assert ": ok (" in out and "method(s)" in out


def test_a_changed_config_layer_is_refused_instead_of_mixing_results(tmp_path, tiny_bert, sentiment_csv, capsys):
    """The stored results remember what the config layers said (their contents, not their paths): editing the
    base config under a finished study is refused in one line before anything trains."""
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, methods={"lora": {}}, seeds=[0], tuning={"trials": 1},
                       budget={"max_steps": 2, "val_check_interval": 1})
    sd = tmp_path / "sd"
    code, _, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 0, err[-3000:]
    base = tmp_path / "base-study.yaml"
    base.write_text(base.read_text().replace("max_length: 32", "max_length: 24"))
    code, _, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 2 and err.count("\n") == 1 and "made from a different study file" in err, err
    assert sorted(starts(sd).values()) == [1, 1]  # nothing ran the second time


def test_tuning_runs_use_a_seed_no_seed_run_uses(tmp_path, tiny_bert, sentiment_csv):
    from peftlab.compare.study import cli_args, load_study, run_arguments

    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, seeds=[0, 1, 2], tuning={"trials": 2})
    part = load_study(study).parts[0]
    assert part.tuning_seed == 3 and part.tuning_seed not in part.seeds
    run = run_arguments(part, part.methods["lora"], seed=part.tuning_seed, kind="tune")
    assert run["seed_everything"] == 3 and run["test_after_fit"] is False
    args = cli_args(run)
    assert "--seed_everything=3" in args and "--test_after_fit=false" in args


def test_forgetting_keeps_the_loss_measured_before_training_across_a_resume(monkeypatch):
    """A seed run resumed from its checkpoint restores the reference loss measured before its first step instead
    of measuring a partly trained model again."""
    from peftlab.compare.callbacks import TestOutcomes

    first = TestOutcomes(forgetting={"source": "x"})
    monkeypatch.setattr(TestOutcomes, "_reference_loss", lambda self, module: 4.25)
    first.on_fit_start(None, None)
    saved = first.state_dict()
    assert saved == {"reference_loss_before": 4.25}

    resumed = TestOutcomes(forgetting={"source": "x"})
    resumed.load_state_dict(saved)
    monkeypatch.setattr(TestOutcomes, "_reference_loss", lambda self, module: pytest.fail("measured again"))
    resumed.on_fit_start(None, None)
    assert resumed.state_dict() == saved


def test_generation_scores_the_last_reply_of_a_multi_turn_chat():
    """A chat trained on every assistant reply has several label spans: generation continues the conversation up
    to the last reply (earlier replies as written) and is scored against that reply alone, not against every
    reply glued together (which a 16-token generation could never match)."""
    import torch

    from peftlab.callbacks import GenerationEval

    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18, 0, 0], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]])
    mask = (ids != 0).long()
    labels = torch.full_like(ids, -100)
    labels[0, 2:4] = ids[0, 2:4]   # reply 1 (13, 14), user turn (15), reply 2 (16, 17), end (18)
    labels[0, 5:7] = ids[0, 5:7]
    labels[1, 6:9] = ids[1, 6:9]   # one response: as before, the prompt is everything before it
    inputs, refs = GenerationEval.prompts_and_references(
        {"input_ids": ids, "attention_mask": mask, "labels": labels}, "causal_lm", 0)
    assert refs == [[16, 17], [27, 28, 29]]
    assert inputs["input_ids"].tolist() == [[0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26]]
    assert inputs["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_fingerprints_of_a_shipped_study_stay_the_same():
    """A method's fingerprint (the hash of its settings a storage's results are kept under) must not change when
    the code that reads the study file does: committed storage (experiments/instruction/study.db) and
    users' study directories resume by it. The values are those stored in that database."""
    from peftlab.compare.study import load_study

    study = load_study(ROOT / "experiments/instruction/study.yaml")
    (part,) = study.parts
    assert {m.slug: part.fingerprint(m) for m in part.methods.values()} == {
        "full": "abe72094bca2ebf6", "lora_r=8_q_v": "caa4af25b5a3a416", "lora_r=16_all-linear": "ba8464a901facffa",
        "lora_r=85_q_v": "c40e71e6b8c91a43", "dora_r=16_all-linear": "638609e656a59e99",
        "rslora_r=16_all-linear": "d4613e24eeb94934", "adapters_b=64": "c3478810e8d667e2",
        "prefix": "d883de20967af779", "prompt": "757d0777a0a285a8", "p-tuning_v2": "18117d8f53ab3e62",
        "qlora_r=16_all-linear": "0127bcaaea95a8b7",
        "lora_prompt": "d440e5ae4ae8a7cc"}
    few_shot = load_study(ROOT / "experiments/few_shot/study.yaml")
    assert [(p.slug, m.slug, p.fingerprint(m)) for p in few_shot.parts[:2] for m in list(p.methods.values())[:2]] == [
        ("k=8", "prompt", "4b88e7ce71dfcc55"), ("k=8", "prefix", "2a08ff1526b8a65b"),
        ("k=16", "prompt", "6c92e35a97005853"), ("k=16", "prefix", "21a76b51954bd082")]


def test_the_rate_ratio_in_the_lr_rule_notes_is_what_its_results_give():
    """#35 item 3: the ratio table (per tuning, geometric mean and t-interval) in the notes printed on the page is
    experiments/instruction/rate_ratio.py's output for the committed results."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rate_ratio", ROOT / "experiments/instruction/rate_ratio.py")
    rate_ratio = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rate_ratio)
    results = json.loads((ROOT / "experiments/instruction/lr_rule.results.json").read_text())
    assert len(rate_ratio.ratios(results)) == len(results["parts"])  # every tuning chose a rate for both methods
    assert rate_ratio.table(results) in (ROOT / "experiments/instruction/lr_rule_notes.md").read_text()
    mean, low, high = rate_ratio.interval([2.0, 8.0])  # geometric mean 4; log-t interval with 1 degree of freedom
    assert mean == pytest.approx(4.0) and low == pytest.approx(4.0 / 2.0 ** 12.7062, rel=1e-3)
