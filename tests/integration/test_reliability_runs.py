"""Reliability and safety (issue #9): bad input gets one clear message, saves are atomic, a killed run
resumes bit-exactly, runs are deterministic and recorded, loading never unpickles, faults stop cleanly.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_reliability.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from conftest import PEFTLAB, run_main, write_config

# ---------------------------------------------------------------------------------------------- kill and resume
SLOW_CALLBACK = '''
import time
from lightning.pytorch.callbacks import Callback


class Slow(Callback):
    """Sleeps after each step so the test can kill the run mid-epoch; changes no numbers."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)
'''


BATCHES_PER_EPOCH = 12  # 120 rows - 10% validation - 10% test = 96, batch size 8


def _resume_config(tmp_path, tiny_bert, sentiment_csv, runs, seconds):
    callbacks = [{"class_path": "slow_callback.Slow", "init_args": {"seconds": seconds}}]
    return write_config(tmp_path, tiny_bert, sentiment_csv, callbacks=callbacks, runs=runs, name=f"{runs}.yaml",
                        model={"dropout": 0.1, "warmup_ratio": 0.2},  # dropout and the schedule depend on state
                        trainer={"max_steps": 30, "limit_val_batches": 1},
                        extra={"last_checkpoint": {"every_n_train_steps": 1}})


def _peftlab(args, cwd, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([PEFTLAB, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, tiny_bert, sentiment_csv, capsys):
    (tmp_path / "slow_callback.py").write_text(SLOW_CALLBACK)
    sys.path.insert(0, str(tmp_path))
    try:  # the uninterrupted reference, in this process
        reference = _resume_config(tmp_path, tiny_bert, sentiment_csv, "reference", 0.0)
        assert run_main(["fit", "--config", reference, "--test_after_fit", "false"], capsys)[0] == 0
    finally:
        sys.path.remove(str(tmp_path))
    expected = load_file(str(next((tmp_path / "reference").rglob("adapter/last/adapter_model.safetensors"))))

    # the same run in a real process, killed with SIGKILL once it has written a mid-epoch checkpoint
    config = _resume_config(tmp_path, tiny_bert, sentiment_csv, "killed", 0.3)
    proc = _peftlab(["fit", "--config", config, "--test_after_fit", "false"], tmp_path)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        # a glob of the checkpoint folder only: a recursive one races the run's atomic renames of adapter/ folders
        last = list((tmp_path / "killed").glob("r/version_*/checkpoints/last.ckpt"))
        if last:
            step = torch.load(last[0], weights_only=True)["global_step"]
            if step >= BATCHES_PER_EPOCH + 3:  # in the second epoch, after an epoch boundary was crossed
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    output = proc.communicate(timeout=60)[0]
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, output
    ckpt = next((tmp_path / "killed").rglob("last.ckpt"))
    resumed_from = torch.load(ckpt, weights_only=True)["global_step"]
    assert resumed_from < 30 and resumed_from % BATCHES_PER_EPOCH != 0  # really mid-epoch, really unfinished

    proc = _peftlab(["fit", "--config", config, "--test_after_fit", "false", "--ckpt_path", "last",
                     "--trainer.callbacks.init_args.seconds", "0"], tmp_path)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert f"resuming from {ckpt}" in output
    assert "not resumable" not in output  # Lightning's warning for loaders without state
    runs = sorted((tmp_path / "killed").glob("r/version_*"))
    assert len(runs) == 1  # the resumed run continued in the killed run's directory
    got = load_file(str(runs[0] / "adapter/last/adapter_model.safetensors"))
    assert torch.load(runs[0] / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 30
    assert got.keys() == expected.keys()
    for name in expected:  # bit-identical: same data order, dropout masks, optimizer and schedule state
        assert torch.equal(got[name], expected[name]), name


# ---------------------------------------------------------------------------------------------- long run


# ---------------------------------------------------------------------------------------------- long run


class MemoryProbe(Callback):
    """Records the process's resident memory every ``every`` steps into ``path`` (json)."""

    def __init__(self, path: str, every: int = 100):
        self.path, self.every, self.samples = path, every, {}

    def on_train_batch_end(self, trainer, *args, **kwargs):
        import psutil

        if trainer.global_step % self.every == 0:
            self.samples[trainer.global_step] = psutil.Process().memory_info().rss
            Path(self.path).write_text(json.dumps(self.samples))


@pytest.mark.slow
def test_soak_thousands_of_steps_with_checkpoints_memory_stays_flat(tmp_path, tiny_bert, sentiment_csv, capsys):
    """3000 steps (250 epochs, 250 validations, 30 checkpoints + adapter exports): resident memory after
    warm-up must not grow (measured: 577 MiB at step 500 and at 3000). Run with `pytest -m slow`."""
    probe = tmp_path / "rss.json"
    callbacks = [{"class_path": "test_reliability_runs.MemoryProbe", "init_args": {"path": str(probe)}}]
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, callbacks=callbacks, model={"dropout": 0.1},
                       trainer={"max_steps": 3000, "limit_val_batches": 1, "log_every_n_steps": 50},
                       extra={"last_checkpoint": {"every_n_train_steps": 100}})
    code, _, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)
    assert code == 0, err
    rss = {int(k): v for k, v in json.loads(probe.read_text()).items()}
    assert max(rss) == 3000
    growth_mb = (rss[3000] - rss[500]) / 2**20
    print(f"resident memory at step 500: {rss[500] / 2**20:.0f} MiB, at 3000: {rss[3000] / 2**20:.0f} MiB "
          f"(growth {growth_mb:+.1f} MiB)")
    assert growth_mb < 32, rss
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 3000
