"""What a user watches and touches (issue #34): trackers, progress in logs, budgets, no abbreviations, tidy
evaluation, a short `fit --help`. Each through the real CLI.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_ux.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PEFTLAB, last_value, metrics_rows, run_main, write_config


# ---------------------------------------------------------------------------------------------- trackers
def wandb_records(path):
    """The records of a W&B offline run file (``run-ID.wandb``): a LevelDB-style log of protobuf ``Record`` s in
    32 KiB blocks, after a 7-byte header; W&B offline writes nothing else with the logged values."""
    from wandb.proto import wandb_internal_pb2

    data, block, out, pending = Path(path).read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_mlflow_and_wandb_receive_the_runs_metrics_and_hyperparameters(tmp_path, tiny_bert, sentiment_csv, capsys,
                                                                        monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="tracked", seed=3)
    code, out, err = run_main(["fit", "--config", cfg, "--trackers", "[mlflow,wandb]"], capsys)
    import wandb

    wandb.finish()  # what the end of the `peftlab` process does; W&B writes its summary files then
    assert code == 0, err
    run = tmp_path / "runs/tracked/version_0"
    assert sorted(p.name for p in (tmp_path / "runs/tracked").iterdir()) == ["version_0"]  # one run directory
    rows = metrics_rows(run)  # the CSV is written beside the trackers, so the summary has its sources
    assert f"run dir     {run}" in out and "test/acc" in out
    loss, acc = last_value(rows, "train/loss"), last_value(rows, "test/acc")

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "version_0"
    assert found.data.params["r"] == "4" and found.data.params["learning_rate"] == "0.01"
    assert found.data.metrics["train/loss"] == pytest.approx(loss, rel=1e-6)
    assert found.data.metrics["test/acc"] == pytest.approx(acc, rel=1e-6)

    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    assert [h["train/loss"] for h in history if "train/loss" in h] == pytest.approx(
        [float(r["train/loss"]) for r in rows if r["train/loss"]], rel=1e-6)
    assert [h["test/acc"] for h in history if "test/acc" in h] == pytest.approx([acc])
    assert config["r"] == 4 and config["learning_rate"] == 0.01


# ---------------------------------------------------------------------------------------------- progress & budgets
def test_piped_fit_prints_progress_lines_and_keeps_its_step_budget(tmp_path, tiny_bert, sentiment_csv):
    """stdout a pipe (nohup, SLURM, CI): plain progress lines; --trainer.max_steps beats the config's
    max_epochs (announced); a run shorter than log_every_n_steps still logs its training loss."""
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="piped", seed=3,
                       trainer={"max_steps": -1, "max_epochs": 1, "log_every_n_steps": 20},
                       data={"max_train_samples": 24})  # 3 steps per epoch
    proc = subprocess.run([PEFTLAB, "fit", "--config", cfg, "--trainer.max_steps", "5",
                           "--trainer.enable_progress_bar", "true", "--test_after_fit", "false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[peftlab] --trainer.max_steps 5 given: the config's max_epochs 1") for line in lines)
    progress = [line for line in lines if line.startswith("[peftlab] step ")]
    assert [line.split()[2] for line in progress] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert "epoch 2/-1" not in proc.stdout and "epoch 2" in progress[-1] and "train/loss" in progress[-1]
    assert "ETA" in progress[0] and ("steps/s" in progress[0] or "s/step" in progress[0])
    assert any(line.startswith("[peftlab] validation at step 3: val/acc") for line in lines)
    assert "\r" not in proc.stdout  # no bar redraws in the log
    rows = metrics_rows(tmp_path / "runs/piped/version_0")
    assert max(int(r["step"]) for r in rows) >= 4 and [r for r in rows if r.get("train/loss")]
    import torch

    last = torch.load(tmp_path / "runs/piped/version_0/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 5


def test_fit_help_imports_nothing_heavy():
    probe = "import sys; from peftlab.cli import main\ntry:\n    main(['fit', '--help'])\nexcept SystemExit:\n    pass\n" \
            "print('lightning' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ})
    assert result.stdout.splitlines()[-1] == "False False", result.stderr
