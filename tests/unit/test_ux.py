"""What a user watches and touches (issue #34): trackers, progress in logs, budgets, no abbreviations, tidy
evaluation, a short `fit --help`. Each through the real CLI.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_ux_runs.py."""

from __future__ import annotations

import warnings

import pytest
import yaml

from conftest import last_value, metrics_rows, run_main, write_config


def test_csv_and_tensorboard_share_one_run_directory(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="tb", seed=3)
    (tmp_path / "runs/tb/version_0").mkdir(parents=True)  # an earlier run: both must pick version_1
    args = ["fit", "--config", cfg, "--test_after_fit", "false"]
    code, _, err = run_main([*args, "--trackers", "[tensorboard]"], capsys)
    assert code == 0, err
    run = tmp_path / "runs/tb/version_1"
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "runs/tb").iterdir()) == ["version_0", "version_1"]


def test_a_tracker_logger_alone_still_writes_metrics_csv(tmp_path, tiny_bert, sentiment_csv, capsys, monkeypatch):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="tb", seed=3)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false", "--trainer.logger",
                               "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir", "tblogs"],
                              capsys)
    assert code == 0, err
    run = tmp_path / "tblogs/tb/version_0"  # jsonargparse keeps the config's logger name across the class change
    assert metrics_rows(run) and list(run.glob("events.out.tfevents.*")) and (run / "config.yaml").is_file()


@pytest.mark.parametrize("how", ["trackers", "trainer.logger"])
def test_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, tiny_bert, sentiment_csv, capsys,
                                                              monkeypatch, how):
    import importlib.util

    from lightning.fabric.utilities.imports import RequirementCache

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.setattr("lightning.pytorch.loggers.mlflow._MLFLOW_AVAILABLE", RequirementCache("mlflow>=999"))
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv)
    extra = ["--trackers", "[mlflow]"] if how == "trackers" else [
        "--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger"]
    code, _, err = run_main(["fit", "--config", cfg, *extra], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "pip install 'peftlab[mlflow]'" in err and "Traceback" not in err


def test_explicit_max_epochs_keeps_both_limits(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="both", seed=3,
                       trainer={"max_steps": -1, "max_epochs": 1}, data={"max_train_samples": 24})
    code, out, err = run_main(["fit", "--config", cfg, "--trainer.max_steps", "5", "--trainer.max_epochs", "1",
                               "--test_after_fit", "false"], capsys)
    assert code == 0, err
    assert "given: the config's max_epochs" not in out
    saved = yaml.safe_load((tmp_path / "runs/both/version_0/config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 1 and saved["trainer"]["max_steps"] == 5


def test_plain_progress_every_n_steps_and_terminal_keeps_the_bar():
    import io

    import lightning as L

    from peftlab.callbacks.progress import PeftRichProgressBar, PlainProgress, replace_default_progress_bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, kind in ((io.StringIO(), PlainProgress), (Tty(), PeftRichProgressBar)):
        trainer = L.Trainer(callbacks=[L.pytorch.callbacks.RichProgressBar()], logger=False)
        replace_default_progress_bar(trainer, stream)
        assert [type(c) for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.ProgressBar)] == [kind]


# ---------------------------------------------------------------------------------------------- abbreviations
@pytest.mark.parametrize("option, suggestion", [("--data.max_eval_sample", "max_eval_samples"),
                                                ("--data.text_colum", "text_column")])
def test_abbreviated_option_is_refused_with_the_full_name(tmp_path, tiny_bert, sentiment_csv, capsys, option,
                                                          suggestion):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv)
    code, _, err = run_main(["fit", "--config", cfg, option, "8"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"unknown option(s) {option} 8 (did you mean --data.{suggestion}?)" in err
    assert not (tmp_path / "runs").exists()


def test_command_table_refuses_abbreviations(tmp_path, capsys):
    code, _, err = run_main(["plot", str(tmp_path), "--outp", "x.png"], capsys)
    assert code == 2 and "--outp" in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------- tidy evaluation
QUIET = ("does not have many workers", "ckpt_path", "Checkpoint directory", "LOCAL_RANK", "MISSING")


def test_test_and_predict_write_into_the_runs_directory_quietly(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="ev", seed=3)
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    run = tmp_path / "runs/ev/version_0"
    ckpt = str(run / "checkpoints/last.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", ckpt], capsys)
        assert code == 0 and "test/acc" in out, err
        code, out, err = run_main(["predict", "--config", cfg, "--ckpt_path", ckpt], capsys)
        assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "runs/ev").iterdir()) == ["version_0"]
    assert last_value(metrics_rows(run / "test"), "test/acc") >= 0 and (run / "test/config.yaml").is_file()
    assert len((run / "predict/predictions.jsonl").read_text().splitlines()) == 12
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if any(q in m for q in QUIET)], shown


def test_data_preparation_prints_no_progress_bars_and_one_summary_line(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="q", seed=3)
    code, out, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)
    assert code == 0, err
    assert "it/s" not in err and "examples/s" not in err, err
    (line,) = [line for line in out.splitlines() if line.startswith("[peftlab] data ")]
    assert "train 96" in line and "validation 12" in line and "test 12" in line and "rotten" in line


# ---------------------------------------------------------------------------------------------- --help
def test_fit_help_is_short_and_points_at_the_rest(capsys):
    code, out, _ = run_main(["fit", "--help"], capsys)
    assert code == 0
    assert len(out.splitlines()) < 80
    for group in ("trainer:", "model:", "data:"):
        assert group in out
    assert "--help-all" in out and "--model.help" in out and "docs/reference.md" in out


def test_fit_help_options_exist_and_help_all_is_complete(capsys):
    """Every option the short help names is one of the full parser's (a method's: LoRA's), so it cannot drift."""
    import re

    from peftlab.cli import FIT_HELP

    code, full, _ = run_main(["fit", "--help-all"], capsys)
    assert code == 0 and len(full.splitlines()) > 300
    code, lora, _ = run_main(["fit", "--model.help", "LoRA"], capsys)
    assert code == 0
    named = set(re.findall(r"(--[a-z_.]+[a-z_])", FIT_HELP)) - {"--help-all", "--model.help", "--debug"}
    assert len(named) > 30
    missing = [n for n in sorted(named) if not re.search(re.escape(n) + r"[ ,=\]]", lora if n.startswith(
        "--model.") else full)]
    assert not missing
