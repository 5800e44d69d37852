"""``peftlab compare``: study-file checks, a tiny study end to end (tuning with pruning, seeds, report), resuming,
two workers on one SQLite study, the bootstrap intervals on data with known answers, and generated-text metrics.

Everything runs on the tiny models of conftest.py with budgets of a few steps (each run is a real `peftlab fit`).

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_compare.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_main, runs_log, starts, tiny_study

MC, GEN = "peftlab_rotten_tomatoes_mc", "peftlab_rotten_tomatoes_gen"


# ---------------------------------------------------------------------------------------------- resuming, workers
def _worker_cmd(study, sd, *extra):
    return [sys.executable, "-m", "peftlab", "compare", "--config", str(study), "--study_dir", str(sd), *extra]


def test_two_workers_share_one_sqlite_study_and_no_trial_runs_twice(tmp_path, tiny_bert, sentiment_csv):
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, tuning={"trials": 4, "reduction_factor": 2},
                       methods={"lora": {}})
    sd = tmp_path / "sd"
    proc = subprocess.run(_worker_cmd(study, sd, "--workers", "2"), capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = runs_log(sd)
    ran = starts(sd)
    assert len(ran) == 4 + 2 and set(ran.values()) == {1}, ran  # every trial and seed exactly once
    assert len({e["pid"] for e in log}) == 2, "both workers trained"
    assert "[w1]" in proc.stdout and "[w2]" in proc.stdout
    results = json.loads((sd / "results.json").read_text())
    for m in results["parts"][0]["methods"]:
        assert len(m["trials"]) == 4 and len(m["seeds"]) == 2 and all("metrics" in s for s in m["seeds"])


@pytest.mark.slow
def test_a_killed_study_resumes_without_rerunning_finished_work(tmp_path, tiny_bert, sentiment_csv, capsys):
    """SIGKILL a worker in the middle of a run; the next invocation redoes that run only."""
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, budget={"max_steps": 40, "val_check_interval": 4},
                       methods={"lora": {}}, seeds=[0], tuning={"trials": 3, "pruner": "none"})
    sd = tmp_path / "sd"
    proc = subprocess.Popen(_worker_cmd(study, sd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until one run finished and the next one started
        events = runs_log(sd)
        if sum(e["event"] == "end" for e in events) >= 1 and sum(e["event"] == "start" for e in events) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = runs_log(sd)
    finished = {e["run"] for e in before if e["event"] == "end"}
    started = {e["run"] for e in before if e["event"] == "start"}
    interrupted = started - finished
    assert finished and interrupted, before

    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 0, err[-3000:]
    assert "left running by a worker that ended" in out
    ran = starts(sd)
    assert all(ran[r] == 1 for r in finished), ran  # finished work is not repeated
    assert all(ran[r] == 2 for r in interrupted), ran  # the killed run ran again, once
    results = json.loads((sd / "results.json").read_text())
    m = results["parts"][0]["methods"][0]
    assert sum(t["state"] == "complete" for t in m["trials"]) == 3 and m["seeds"][0].get("metrics")


def test_a_study_selects_on_and_reports_lm_eval_metrics_with_intervals(tmp_path, tiny_llama, generation_jsonl, capsys):
    """select on an lm-eval metric at each validation, report two tasks' metrics: each interval's mean is the seed
    runs' logged value, resampled over the task's documents; differences to the baseline are paired."""
    study = tiny_study(tmp_path, tiny_llama, generation_jsonl, task="causal_lm", seeds=[0, 1],
                       tuning={"trials": 2, "reduction_factor": 2, "seed": 5},
                       budget={"max_steps": 2, "val_check_interval": 1}, select=f"val/{MC}/acc",
                       report=[f"test/{MC}/acc", f"test/{GEN}/exact_match_extract", "test/loss"],
                       lm_eval={"tasks": [MC, GEN], "limit": 6, "batch_size": 4, "max_gen_toks": 3})
    sd = tmp_path / "sd"
    code, out, err = run_main(["compare", "--config", str(study), "--study_dir", str(sd)], capsys)
    assert code == 0, err[-3000:]
    part = json.loads((sd / "results.json").read_text())["parts"][0]
    assert part["direction"] == "maximize" and part["lm_eval"]["during_validation"] is True
    lora, prompt = part["methods"]
    for m in (lora, prompt):
        assert all(t["validations"] >= 1 for t in m["trials"] if t["state"] == "complete")
        for metric in (f"test/{MC}/acc", f"test/{GEN}/exact_match_extract"):
            iv = m["test"][metric]
            logged = [s["metrics"][metric] for s in m["seeds"]]
            assert iv["examples"] == 6 and iv["seeds"] == 2, (metric, iv)
            assert iv["mean"] == pytest.approx(sum(logged) / 2, abs=1e-6) and iv["per_seed"] == pytest.approx(logged)
            assert 0 <= iv["low"] <= iv["mean"] <= iv["high"] <= 1
    diff = prompt["vs_baseline"][f"test/{MC}/acc"]
    assert diff["mean"] == pytest.approx(prompt["test"][f"test/{MC}/acc"]["mean"] - lora["test"][f"test/{MC}/acc"]["mean"])
    report = (sd / "report.md").read_text()
    assert f"test/{MC}/acc mean" in report and "lm-eval tasks (`peftlab_rotten_tomatoes_mc`" in report


@pytest.mark.slow  # the shipped study end to end: over a minute on 2 cores
def test_quality_vs_params_study_smoke_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """The CI run of #22: part (a)'s study file with --smoke (MiniLM, the packaged reviews), through the real CLI,
    to a report with intervals and the exact trainable-parameter counts."""
    monkeypatch.chdir(ROOT)
    sd = tmp_path / "sd"
    code, out, err = run_main(["compare", "--config", "experiments/quality_vs_params/study.yaml", "--smoke",
                               "--study_dir", str(sd)], capsys)
    assert code == 0, err[-3000:]
    results = json.loads((sd / "results.json").read_text())
    methods = {m["name"]: m for m in results["parts"][0]["methods"]}
    assert set(methods) == {"full", "lora r=8"}
    # all-MiniLM-L6-v2 (22,713,216 parameters) + a 2-class head (384 x 2 + 2 = 770); LoRA r=8 on query and value
    # of 6 layers: 6 x 2 x (384 x 8 + 8 x 384) = 73,728, plus the head
    assert methods["full"]["trainable"] == methods["full"]["total"] == 22_713_216 + 770
    assert methods["lora r=8"]["trainable"] == 73_728 + 770
    # peft keeps the original head beside its trainable copy (modules_to_save): the model holds the head twice
    assert methods["lora r=8"]["total"] == 22_713_216 + 2 * 770 + 73_728
    for m in methods.values():
        iv = m["test"]["test/acc"]
        assert iv["low"] <= iv["mean"] <= iv["high"] and iv["seeds"] == 1
    assert "[95% CI]" in (sd / "report.md").read_text()


def test_claims_on_a_sqlite_study_are_serialised_between_processes(tmp_path):
    """SQLite does not make Optuna's WAITING -> RUNNING claim atomic (two workers both claimed seed 0 and trained
    it in one directory, in CI): claiming happens under claim_lock. A second process must not enter while the
    first holds it: its entry comes after the first one's exit."""
    from peftlab.compare.storage import claim_lock

    url = f"sqlite:///{tmp_path / 'study.db'}"
    held, released = tmp_path / "held", tmp_path / "released"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, pathlib\n"
        "from peftlab.compare.storage import claim_lock\n"
        f"with claim_lock({url!r}):\n"
        f"    pathlib.Path({str(held)!r}).write_text('1')\n"
        "    time.sleep(1.5)\n"
        f"    pathlib.Path({str(released)!r}).write_text(repr(time.time()))\n")])
    deadline = time.time() + 120
    while not held.exists():
        assert time.time() < deadline and holder.poll() is None, "the holder process did not take the lock"
        time.sleep(0.05)
    with claim_lock(url):
        entered = time.time()
    assert holder.wait(timeout=120) == 0
    assert entered >= float(released.read_text())  # waited for the holder's exit
    with claim_lock("postgresql://user@host/db"):  # other databases lock rows themselves: no lock file
        pass
    assert [p.name for p in tmp_path.glob("*.lock")] == ["study.db.claims.lock"]


def test_a_zombie_worker_counts_as_dead():
    """A worker killed on this machine whose parent has not reaped it yet is a zombie: its runs are recovered."""
    from peftlab.compare.storage import pid_alive

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 60
    while pid_alive(proc.pid):  # exited, not yet reaped
        assert time.time() < deadline, "a finished child still counts as alive"
        time.sleep(0.05)
    assert proc.poll() == 0 and not pid_alive(proc.pid) and pid_alive(os.getpid())


# in the default suite (#35: the smoke run in CI): SmolLM2-135M, 4 runs (1 tuning trial + 1 seed per method)
def test_instruction_study_smoke_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """#35's study file with --smoke: SmolLM2-135M-Instruct on the packaged chats (data.task chat), tuned LoRA and
    prompt tuning, to a report with the loss per assistant token, the generated-text metrics, the shipped lm-eval
    tasks and forgetting."""
    monkeypatch.chdir(ROOT)
    sd = tmp_path / "sd"
    code, out, err = run_main(["compare", "--config", "experiments/instruction/study.yaml", "--smoke",
                               "--study_dir", str(sd)], capsys)
    assert code == 0, err[-3000:]
    results = json.loads((sd / "results.json").read_text())
    methods = {m["name"]: m for m in results["parts"][0]["methods"]}
    assert set(methods) == {"lora r=8 q,v", "prompt"}
    # SmolLM2-135M: 30 layers, hidden 576, k/v 192 (3 KV heads of 64); LoRA r=8 on q (576 -> 576) and v (576 -> 192):
    # 30 x 8 x ((576 + 576) + (576 + 192)); 20 virtual tokens of width 576
    assert methods["lora r=8 q,v"]["trainable"] == 30 * 8 * (1152 + 768) == 460_800
    assert methods["prompt"]["trainable"] == 20 * 576
    for m in methods.values():
        for metric in ("test/loss", "test/exact_match", "test/gen_exact_match", "test/rougeL", "test/bleu",
                       f"test/{MC}/acc", f"test/{GEN}/exact_match_extract"):
            iv = m["test"][metric]
            assert iv["low"] <= iv["mean"] <= iv["high"] and iv["seeds"] == 1, (m["name"], metric, iv)
        assert m["test"][f"test/{MC}/acc"]["examples"] == 4  # lm_eval.limit of the smoke run
        f = m["forgetting"]
        assert f["before"] > 0 and f["delta"] == pytest.approx(f["after"] - f["before"])
    # "before" is the built, untrained method: LoRA's zero B leaves the backbone as it is, but prompt tuning's 20
    # untrained virtual tokens are already in the input (measured: 4.847 vs LoRA's 4.641), so a prompt method's
    # forgetting delta is measured from its own start, not from the bare backbone
    assert methods["prompt"]["forgetting"]["before"] != pytest.approx(methods["lora r=8 q,v"]["forgetting"]["before"])
    report = (sd / "report.md").read_text()
    assert "[95% CI]" in report and "reference loss before → after" in report
