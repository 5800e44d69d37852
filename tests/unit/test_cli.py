"""The `peftlab` command: shipped configs, print_config round trip, saved config, clean errors.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_cli_runs.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from conftest import ROOT, run_main, tiny_config
from peftlab.cli import main

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_loads(config, capsys):
    # configs/methods/*.yaml hold only a model section, configs/strategies/*.yaml only a trainer section,
    # meant to be layered on a base config
    layered = config.startswith(("configs/methods/", "configs/strategies/")) or config == "configs/gpu.yaml"
    base = ["--config", str(ROOT / "configs/quickstart.yaml")] if layered else []
    code, out, err = run_main(["fit", *base, "--config", str(ROOT / config), "--print_config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out)
    if config == "configs/gpu.yaml":  # settings layered on any method
        own = yaml.safe_load((ROOT / config).read_text())
        assert printed["trainer"]["precision"] == own["trainer"]["precision"] == "bf16-mixed"
        for key, value in own["model"]["init_args"].items():
            assert printed["model"]["init_args"][key] == value, key
        return
    if config.startswith("configs/strategies/"):
        own = yaml.safe_load((ROOT / config).read_text())["trainer"]
        strategy = printed["trainer"]["strategy"]
        assert strategy == own["strategy"] or strategy["class_path"] == own["strategy"]["class_path"]
        return
    own = yaml.safe_load((ROOT / config).read_text())["model"]
    assert printed["model"]["class_path"] == own["class_path"]
    assert printed["model"]["class_path"].startswith(("peftlab.methods.", "peftlab.multitask."))
    if base:
        # jsonargparse keeps init_args of the same name when a layered config switches class: every value
        # the method file does not set itself must be the class default, not inherited from the base config
        import importlib
        import inspect

        module_name, _, cls_name = own["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        defaults = {}
        for klass in reversed(cls.__mro__):
            if "__init__" in vars(klass):
                defaults.update({k: p.default for k, p in inspect.signature(klass.__init__).parameters.items()
                                 if p.default is not inspect.Parameter.empty})
        for key, value in printed["model"]["init_args"].items():
            if key not in own.get("init_args", {}) and key in defaults:
                assert value == defaults[key] or (isinstance(defaults[key], float) and value == float(defaults[key])), \
                    f"{config}: {key}={value!r} inherited from the base config (default {defaults[key]!r})"
    # linked values are written once: the tokenizer follows model.backbone, the task follows data.task
    assert "tokenizer" not in printed["data"] and "backbone" in printed["model"]["init_args"]
    assert "task" not in printed["model"]["init_args"] and printed["data"]["task"]


def test_print_config_round_trip(tmp_path, capsys):
    code, first, _ = run_main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.r", "16",
                               "--print_config"], capsys)
    assert code == 0
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    code, second, _ = run_main(["fit", "--config", str(saved), "--print_config"], capsys)
    assert code == 0 and second == first
    assert yaml.safe_load(first)["model"]["init_args"]["r"] == 16


def test_help_lists_methods_arguments(capsys):
    code, out, _ = run_main(["fit", "--help-all"], capsys)  # `fit --help` is the short list (tests/unit/test_ux.py)
    assert code == 0
    for arg in ("--model CONFIG | CLASS_PATH_OR_NAME", "--data.source", "--data.prompt_template", "--test_after_fit"):
        assert arg in out
    code, out, _ = run_main(["fit", "--model.help", "LoRA"], capsys)
    assert code == 0
    for arg in ("--model.r R", "rank of the update matrices", "--model.target_modules", "--model.backbone"):
        assert arg in out


def _adapter(ckpt_dir):
    last = Path(ckpt_dir) / "last.ckpt"
    if not last.exists():
        last = sorted(Path(ckpt_dir).glob("*.ckpt"))[-1]
    return torch.load(last, weights_only=True)["state_dict"]


def test_fit_saves_config_and_printed_config_reproduces_run(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    code, out, err = run_main(["fit", "--config", cfg], capsys)
    assert code == 0, err
    assert "test/acc" in out and "fit summary" in out
    run1 = tmp_path / "runs/tiny/version_0"
    saved = yaml.safe_load((run1 / "config.yaml").read_text())
    assert saved["model"]["init_args"]["r"] == 4 and saved["data"]["source"] == sentiment_csv
    assert "num_labels" not in saved["model"]["init_args"]  # read from the data at start, never written twice
    assert (run1 / "metrics.csv").exists()
    # the saved (resolved) config, fed back, reproduces the trained adapter exactly
    code, out, err = run_main(["fit", "--config", str(run1 / "config.yaml")], capsys)
    assert code == 0, err
    first, second = _adapter(run1 / "checkpoints"), _adapter(tmp_path / "runs/tiny/version_1/checkpoints")
    assert first.keys() == second.keys() and len(first) == 10
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_validate_test_predict_subcommands(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    ckpt = str(next((tmp_path / "runs/tiny/version_0/checkpoints").glob("*.ckpt")))
    code, out, err = run_main(["validate", "--config", cfg, "--ckpt_path", ckpt], capsys)
    assert code == 0 and "val/acc" in out, err
    code, out, err = run_main(["test", "--config", cfg, "--ckpt_path", ckpt], capsys)
    assert code == 0 and "test/acc" in out, err
    pred = tmp_path / "pred.jsonl"
    code, out, err = run_main(["predict", "--config", cfg, "--ckpt_path", ckpt, "--predictions_file", str(pred)], capsys)
    assert code == 0, err
    rows = [yaml.safe_load(line) for line in pred.read_text().splitlines()]
    # every input column is written back; the gold label beside the predicted one as input_label (issue #30)
    assert len(rows) == 12 and set(rows[0]) == {"input", "input_label", "label", "probs"}
    assert rows[0]["label"] in ("rotten", "fresh") and sum(rows[0]["probs"].values()) == pytest.approx(1, abs=1e-4)


BAD = [
    # (extra args, expected message fragment)
    (["--model.init_args.rank", "8"], "rank"),
    (["--model.init_args.target_modules", "[qkv]"], "target module 'qkv' (model.target_modules) is not in this backbone"),
    (["--data.text_column", "review"], "column 'review' (data.text_column) is not in data source"),
    (["--data.labels", "[good,bad]"], "out of range for data.labels"),
    (["--model.init_args.r", "-1"], "model.r (LoRA rank) must be >= 1"),
    (["--data.task", "seq2seq", "--data.prompt_template", "{text}", "--data.response_template", "{label}"],
     "no seq2seq head"),
    (["--model.init_args.r", "eight"], "r"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_input_one_clear_message(tmp_path, tiny_bert, sentiment_csv, capsys, extra, message):
    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    code, out, err = run_main(["fit", "--config", cfg, *extra], capsys)
    assert code != 0
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_unreadable_data_file_and_earlier_outputs_untouched(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    assert run_main(["fit", "--config", cfg], capsys)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, _, err = run_main(["fit", "--config", cfg, "--data.source", str(empty)], capsys)
    assert code == 2 and "is empty" in err and err.count("\n") == 1
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    assert after == before


def test_debug_flag_shows_traceback(tmp_path, tiny_bert, sentiment_csv):
    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    from peftlab.errors import PeftLabError

    with pytest.raises(PeftLabError):
        main(["fit", "--config", cfg, "--data.text_column", "review", "--debug"])


def test_cli_writes_nothing_into_the_working_directory(tmp_path, tiny_bert, sentiment_csv, capsys, monkeypatch):
    """fit / test / predict with a logger, and fit with the logger off, write only into the run directory they
    name (trainer.logger's, or trainer.default_root_dir); with neither there is no run directory, and
    config.yaml and the adapters are not written into the working directory (a13e040 committed one)."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    assert run_main(["fit", "--config", cfg], capsys)[0] == 0
    ckpt = str(next((tmp_path / "runs/tiny/version_0/checkpoints").glob("*.ckpt")))
    assert run_main(["test", "--config", cfg, "--ckpt_path", ckpt], capsys)[0] == 0
    assert run_main(["predict", "--config", cfg, "--ckpt_path", ckpt], capsys)[0] == 0
    assert (tmp_path / "runs/tiny/version_0/config.yaml").exists()
    assert list(work.iterdir()) == []
    root = tmp_path / "root"
    code, _, err = run_main(["fit", "--config", cfg, "--trainer.logger", "false",
                             "--trainer.default_root_dir", str(root)], capsys)
    assert code == 0, err
    assert (root / "config.yaml").exists() and (root / "adapter/last/adapter_config.json").exists()
    assert list(work.iterdir()) == []
    code, out, err = run_main(["fit", "--config", cfg, "--trainer.logger", "false",
                               "--trainer.enable_checkpointing", "false"], capsys)
    assert code == 0, err
    assert "no run directory" in out
    assert list(work.iterdir()) == []


def test_predict_csv_and_plot(tmp_path, tiny_bert, sentiment_csv, capsys):
    import csv

    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    run = tmp_path / "runs/tiny/version_0"
    ckpt = str(run / "checkpoints" / next(p.name for p in (run / "checkpoints").glob("*.ckpt")))
    code, _, err = run_main(["predict", "--config", cfg, "--ckpt_path", ckpt,
                             "--predictions_file", str(tmp_path / "p.csv")], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(rows) == 12 and set(rows[0]) == {"input", "input_label", "label", "p_rotten", "p_fresh"}
    code, out, err = run_main(["plot", str(run)], capsys)
    assert code == 0, err
    png = run / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run_main(["plot", str(tmp_path)], capsys)
    assert code == 2 and "has no metrics.csv" in err


# ------------------------------------------------------------------------------------------ the command table
def test_command_table_summaries_are_the_functions_docstrings():
    """`peftlab --help` shows the table's summary (no import); it is the first line of the function's docstring."""
    import inspect

    from peftlab.commands import COMMANDS, function

    for name, command in COMMANDS.items():
        assert inspect.getdoc(function(name)).splitlines()[0] == command.summary, name


def test_command_help_comes_from_the_signature_and_docstring(capsys):
    import inspect

    import docstring_parser

    from peftlab.commands import COMMANDS, FIT_ARGS, function

    for name in COMMANDS:
        code, out, _ = run_main([name, "--help"], capsys)
        assert code == 0, name
        flat = " ".join(out.split())
        assert out.startswith(f"usage: peftlab {name}")
        fn = function(name)
        doc = docstring_parser.parse(inspect.getdoc(fn))
        assert doc.short_description in flat
        params = inspect.signature(fn).parameters
        documented = {p.arg_name: " ".join(p.description.split()) for p in doc.params}
        assert set(documented) == set(params), f"{name}: every parameter is documented under Args"
        for param, p in params.items():
            if param == FIT_ARGS:
                assert "--config" not in out.split("Also takes")[0].split("examples:")[0].split("options:")[-1]
                assert "Also takes `peftlab fit`'s arguments" in flat and "--config FILE" in flat
                continue
            shown = param.upper() if p.kind is p.POSITIONAL_ONLY else f"--{param}"
            assert shown in out or f"{param[:-1].upper()} [" in out, (name, param)
            assert documented[param][:40] in flat, (name, param)
        for e in doc.examples:  # every example is in the help, and is runnable syntax (next test)
            assert e.description.splitlines()[0] in out


def _parsed(name, argv):
    from peftlab.commands import parse_command

    return parse_command(name, argv)


@pytest.mark.parametrize("name, argv, args, expected", [
    ("merge", ["runs/x/version_0", "--output", "m/", "--dtype", "bfloat16", "--backbone", "B"],
     ["runs/x/version_0"], {"output": "m/", "dtype": "bfloat16", "backbone": "B"}),
    ("merge", ["--output=m", "run"], ["run"], {"output": "m", "dtype": "float32", "backbone": None}),
    ("compose", ["A", "B", "C", "--weights", "0.7", "0.3", "1", "--output", "D", "--mode", "exact", "--density",
                 "0.4", "--merge"],
     [["A", "B", "C"]], {"weights": [0.7, 0.3, 1.0], "output": "D", "mode": "exact", "density": 0.4, "merge": True}),
    ("compose", ["--weights", "1.5", "-0.5", "--output", "D", "A", "B"],  # a negative weight is a value
     [["A", "B"]], {"weights": [1.5, -0.5], "output": "D", "mode": "exact", "density": 0.5, "merge": False}),
    ("compose", ["A", "B", "--weights", "[0.5, 0.5]", "--output", "D", "--merge", "false"],
     [["A", "B"]], {"weights": [0.5, 0.5], "output": "D", "mode": "exact", "density": 0.5, "merge": False}),
    ("plot", ["runs/x/version_0"], ["runs/x/version_0"], {"output": None}),
    ("params", ["--config", "a.yaml", "--config=b.yaml", "--model.r", "16", "--data.task", "causal_lm", "--backbone",
                "llama-2-7b", "--num_labels", "3", "--json", "--model.target_modules", "[q_proj, v_proj]"],
     [], {"backbone": "llama-2-7b", "num_labels": 3, "json": True,
          "fit_args": ["--config", "a.yaml", "--config=b.yaml", "--model.r", "16", "--data.task", "causal_lm",
                       "--model.target_modules", "[q_proj, v_proj]"]}),
    ("estimate-memory", ["--size", "7b", "--batch_size", "4", "--seq_len", "1024", "--gradient_checkpointing"],
     [], {"size": "7b", "batch_size": 4, "seq_len": 1024, "gradient_checkpointing": True}),
    ("estimate-memory", ["--config", "c.yaml", "--no-gradient_checkpointing", "--optimizer", "paged",
                         "--trainer.precision", "bf16-true", "--target_modules", "q_proj", "v_proj", "--json"],
     [], {"gradient_checkpointing": False, "optimizer": "paged", "target_modules": ["q_proj", "v_proj"], "json": True,
          "fit_args": ["--config", "c.yaml", "--trainer.precision", "bf16-true"]}),
    ("estimate-memory", ["--backbone", "B", "--target_modules", "q", "--target_modules", "v", "--precision", "fp16"],
     [], {"backbone": "B", "target_modules": ["q", "v"], "precision": "fp16", "fit_args": []}),
    ("recommend", ["--few_shot", "--no-api_only", "--task_type", "code", "--backbone", "B", "--output", "F", "--force"],
     [], {"few_shot": True, "api_only": False, "task_type": "code", "backbone": "B", "output": "F", "force": True,
          "latency_critical": None, "all_methods": True}),
    ("recommend", ["--no_all_methods", "--latency_critical", "true", "--num_tasks", "3", "--multi_task", "combine"],
     [], {"all_methods": False, "latency_critical": True, "num_tasks": 3, "multi_task": "combine", "force": False}),
    ("recommend", ["--all_methods"], [], {"all_methods": True}),
    ("recommend", ["--no-all_methods"], [], {"all_methods": False}),
], ids=lambda v: None)
def test_documented_command_syntax_parses(name, argv, args, expected):
    got_args, got = _parsed(name, argv)
    assert got_args == args
    for key, value in expected.items():
        assert got[key] == value, key


def test_normalize_argv_is_driven_by_the_signature():
    from peftlab.commands import normalize_argv

    def fn(items: list[str], /, *, names: list[str] | None = None, flag: bool = False, maybe: bool | None = None,
           size: int = 1, mode: Literal["a", "b"] = "a", fit_args=()) -> None:
        """Test."""

    assert normalize_argv(fn, ["x", "y", "--flag", "--size", "-3", "z"]) == ["--flag=true", "--size", "-3",
                                                                          '["x", "y", "z"]']
    assert normalize_argv(fn, ["--no-flag", "--no_maybe", "--maybe", "false", "--flag=true"]) == \
        ["--flag=false", "--maybe=false", "--maybe=false", "--flag=true"]
    # repeated list options accumulate where the option first appeared; a YAML list counts as its items
    assert normalize_argv(fn, ["--names", "a", "b", "--mode", "b", "--names", "[c, d]", "--names=e", "--", "-p"]) == \
        ['--names=["a", "b", "c", "d", "e"]', "--mode", "b", '["-p"]']
    # unknown options are left for jsonargparse to report; bool values other than true/false are not swallowed
    assert normalize_argv(fn, ["--bogus", "--flag", "maybe"]) == ["--bogus", "--flag=true", '["maybe"]']

    def scalars(run: str, /, *, output: str = "") -> None:
        """Test."""

    assert normalize_argv(scalars, ["--output", "o", "r", "s"]) == ["--output", "o", "r", "s"]


def test_split_fit_args():
    from peftlab.commands import split_fit_args
    from peftlab.errors import PeftLabError

    def fn(*, optimizer: str | None = None, json: bool = False, fit_args=()) -> None:
        """Test."""

    own, fit = split_fit_args(fn, ["--config", "a.yaml", "--optimizer", "paged", "--no-json", "--model.r", "16",
                                   "--trainer.callbacks+=X", "--seed_everything", "-1", "--data.labels=[a, b]"])
    assert own == ["--optimizer", "paged", "--no-json"]
    assert fit == ["--config", "a.yaml", "--model.r", "16", "--trainer.callbacks+=X", "--seed_everything", "-1",
                   "--data.labels=[a, b]"]
    with pytest.raises(PeftLabError, match="unknown option --bogus; options are this command's"):
        split_fit_args(fn, ["--config", "a.yaml", "--bogus", "1"], "params")


def test_commands_are_plain_functions(tmp_path, tiny_bert, capsys):
    """The command functions are the Python API too: typed arguments in, a result out (and the same output)."""
    from peftlab.analysis.params import params_command
    from peftlab.analysis.recommend import recommend_command

    report = params_command(fit_args=["--config", str(ROOT / "configs/quickstart.yaml")], json=True)
    assert report.trainable == 74_498 and '"trainable": 74498' in capsys.readouterr().out
    rec = recommend_command(api_only=True, output=str(tmp_path / "r.yaml"))
    assert rec.method == "prompt engineering" and not (tmp_path / "r.yaml").exists()


# ------------------------------------------------------------------------------------------ predictions
def _fake_trainer(tmp_path, texts, names=("rotten", "fresh")):
    from types import SimpleNamespace

    data = SimpleNamespace(label_names=list(names) if names else None, predict_texts=lambda: list(texts))
    return SimpleNamespace(log_dir=str(tmp_path), datamodule=data, world_size=1, is_global_zero=True)


def _classification_batch(rows):
    probs = torch.tensor([[1 - p, p] for p in rows])
    return {"pred": probs.argmax(-1), "probs": probs}


def test_prediction_writer_orders_rows_and_drops_padding(tmp_path, monkeypatch, capsys):
    """Two ranks' interleaved shares, with a padding repeat, make one file in input order (no processes needed:
    the gather is replaced by the two ranks' rows)."""
    import json

    from peftlab.callbacks import PredictionWriter
    from peftlab.callbacks import predictions as module

    texts = [f"text {i}" for i in range(5)]
    p = [0.1, 0.2, 0.3, 0.4, 0.9]
    # rank 0 predicted rows 0, 2, 4 (in batches of 2), rank 1 rows 1, 3 and row 0 again (padding to equal shares)
    rank0 = ([_classification_batch([p[0], p[2]]), _classification_batch([p[4]])], [[[0, 2], [4]]])
    rank1 = ([_classification_batch([p[1], p[3]]), _classification_batch([p[0]])], [[[1, 3], [0]]])
    trainer = _fake_trainer(tmp_path, texts)
    other = []
    monkeypatch.setattr(module, "gather_records", lambda mine, trainer: [mine, other])
    writer = PredictionWriter()
    other[:] = [(0, i, row) for (batch, idx) in zip(rank1[0], rank1[1][0])
                for i, row in zip(idx, module.prediction_rows(batch, ["rotten", "fresh"]))]
    writer.write_on_epoch_end(trainer, None, *rank0)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["input"] for r in rows] == texts
    assert [r["probs"]["fresh"] for r in rows] == pytest.approx(p)
    assert [r["label"] for r in rows] == ["rotten"] * 4 + ["fresh"]
    assert "wrote 5 predictions" in capsys.readouterr().out and writer.written == str(tmp_path / "predictions.jsonl")


def test_prediction_writer_csv_generation_and_plain_loaders(tmp_path):
    import csv

    from peftlab.callbacks import PredictionWriter

    writer = PredictionWriter(str(tmp_path / "sub" / "p.csv"))
    batches = [_classification_batch([0.25, 0.75]), _classification_batch([0.5])]
    writer.write_on_epoch_end(_fake_trainer(tmp_path, ["a", "b", "c"], names=None), None, batches, [])  # no indices
    rows = list(csv.DictReader(open(tmp_path / "sub" / "p.csv", encoding="utf-8")))
    assert [(r["input"], r["label"], r["p_1"]) for r in rows] == [("a", "0", "0.25"), ("b", "1", "0.75"),
                                                                  ("c", "0", "0.5")]
    assert not (tmp_path / "sub" / "p.csv.tmp").exists()
    writer = PredictionWriter(str(tmp_path / "g.jsonl"))
    writer.write_on_epoch_end(_fake_trainer(tmp_path, ["q1", "q2"], names=None), None,
                              [{"text": [" yes"]}, {"text": [" no"]}], [[[1], [0]]])
    assert (tmp_path / "g.jsonl").read_text() == \
        '{"input": "q1", "generated": " no"}\n{"input": "q2", "generated": " yes"}\n'
