"""The `peftlab` command: shipped configs, print_config round trip, saved config, clean errors.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_cli.py."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import PEFTLAB, ROOT, run_main, write_config

# lines a user could not act on, once printed by every quickstart run (issue: reproducible installs)
NOISE = ("gemm_4bit_forward", "is_gradient_checkpointing", "litlogger", "litmodels", "LeafSpec", "v_num",
         "Total FLOPs", "Traceback", "weights_only")


def test_console_script_quickstart_end_to_end(tmp_path):
    """The README's quickstart config through the real `peftlab` command, capped to a few steps, with the
    progress bar and warnings on as a user sees them: no upstream noise, nothing written outside the run dir."""
    work = tmp_path / "cwd"
    work.mkdir()
    cmd = [PEFTLAB, "fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps", "24",
           "--trainer.val_check_interval", "12", "--trainer.limit_val_batches", "4",
           "--trainer.limit_test_batches", "4", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/acc" in proc.stdout and "trainable   74,498 / 22,788,484" in proc.stdout
    output = proc.stdout + proc.stderr
    assert "train/loss" in output  # the progress was shown ...
    # ... as plain lines, stdout being a pipe here as under nohup (issue #34)
    assert "[peftlab] step 24/24 (100%)  epoch 1" in proc.stdout and "[peftlab] validation at step 12" in proc.stdout
    assert "\r" not in proc.stdout and "[peftlab] data train " in proc.stdout
    assert [n for n in NOISE if n in output] == [], output[-3000:]
    assert list(work.iterdir()) == []  # nothing outside the run directory
    run = tmp_path / "runs/quickstart/version_0"
    assert (run / "config.yaml").exists()
    ckpts = list((run / "checkpoints").glob("*.ckpt"))
    assert ckpts
    # adapter-only: LoRA + head (74,498 params) and its Adam state, not the 91 MB backbone
    assert all(c.stat().st_size < 2_000_000 for c in ckpts)


def test_top_level_help_is_fast_and_lists_every_command(capsys):
    """`peftlab --help` is printed before Lightning is imported (start-up target, docs/benchmarks.md)."""
    from peftlab.commands import COMMANDS

    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for command in ("fit", "validate", "test", "predict", *COMMANDS):
        assert f"\n  {command} " in out, command
    probe = "import sys; from peftlab.cli import main; main(['--help']); print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip().endswith("False")  # no heavy import for the top-level help
    assert run_main([], capsys)[0] == 2  # no command: the help, and a usage error status


def test_predict_on_two_processes_writes_the_one_process_file(tmp_path, tiny_bert, sentiment_csv, capsys):
    """DDP on 2 CPU processes (gloo): each rank predicts every other row; the file has every row once, in input
    order, byte for byte what one process writes (11 rows: the ranks get 6 and 5)."""
    data = {"eval_batch_size": 1, "max_eval_samples": 11}  # one row per batch: the same arithmetic as 1 process
    one_cfg = write_config(tmp_path, tiny_bert, sentiment_csv, data=data, name="one.yaml", runs="one")
    two_cfg = write_config(tmp_path, tiny_bert, sentiment_csv, data=data, name="two.yaml", runs="two",
                           trainer={"devices": 2, "strategy": "ddp"})
    code, out, err = run_main(["predict", "--config", one_cfg, "--predictions_file", str(tmp_path / "one.jsonl")],
                              capsys)
    assert code == 0, err
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([PEFTLAB, "predict", "--config", two_cfg, "--predictions_file",
                             str(tmp_path / "two.jsonl")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "distributed_backend=gloo" in log and log.count("[peftlab] wrote 11 predictions") == 1
    one = (tmp_path / "one.jsonl").read_bytes()
    assert len(one.splitlines()) == 11
    assert (tmp_path / "two.jsonl").read_bytes() == one
