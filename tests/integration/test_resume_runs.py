"""Exact resume from any checkpoint placement: a run SIGKILLed after a checkpoint and resumed ends with the
adapter of the uninterrupted run, tensor for tensor, and saved the same checkpoints (docs/reliability.md).

Each case: the uninterrupted reference (in this process), the same run in a real process that kills itself
with SIGKILL right after a checkpoint (every rank, at the same step), then the resume (``--ckpt_path last`` or
the explicit path of ``last.ckpt``). LoRA dropout and a warm-up schedule are on, so the RNG, the loader position
and the scheduler must all be restored.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_resume.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PEFTLAB, resumed_run_dir, run_main, write_config

KILLER = '''
import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    """SIGKILL this process when training is about to run step `step` (every rank: all stop at once)."""

    def __init__(self, step: int = 0):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.step and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


# 120 rows - 10% validation - 10% test = 96 training rows, batch 8: 12 batches per epoch
CASES = {
    # name: (trainer settings, last_checkpoint settings, kill at optimizer step, expected last.ckpt step, resume form)
    "epoch_end": ({"max_steps": 30}, {}, 14, 12, "last"),
    "mid_epoch_validation": ({"max_steps": 20, "val_check_interval": 5}, {}, 7, 5, "last"),
    "explicit_path": ({"max_steps": 20, "val_check_interval": 5}, {}, 7, 5, "path"),
    "every_n_train_steps": ({"max_steps": 20, "limit_val_batches": 0}, {"every_n_train_steps": 3}, 8, 6, "last"),
    # 2 batches per optimizer step: validation after every 4 batches = every 2 optimizer steps
    "gradient_accumulation": ({"max_steps": 12, "accumulate_grad_batches": 2, "val_check_interval": 4}, {}, 3, 2,
                              "last"),
    # 2 processes: 6 batches per rank and epoch
    "ddp_two_processes": ({"max_steps": 15, "devices": 2, "strategy": "ddp", "val_check_interval": 3}, {}, 4, 3,
                          "last"),
}


def _config(tmp_path, tiny_bert, sentiment_csv, name, trainer, last, kill):
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"monitor": "val/acc", "mode": "max", "save_top_k": 1}}] \
        if trainer.get("limit_val_batches", 1) else []
    callbacks.append({"class_path": "killer.KillAt", "init_args": {"step": kill}})
    return write_config(tmp_path, tiny_bert, sentiment_csv, callbacks=callbacks, runs=name, name=f"{name}.yaml",
                        model={"dropout": 0.1, "warmup_ratio": 0.3},
                        trainer={"limit_val_batches": 1, **trainer})


def _run_args(last: dict) -> list[str]:
    return [arg for key, value in last.items() for arg in (f"--last_checkpoint.{key}", str(value))]


def _in_process(args, capsys, tmp_path):
    sys.path.insert(0, str(tmp_path))
    try:
        code, out, err = run_main(args, capsys)
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 0, err[-3000:]
    return out


def _subprocess(args, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tmp_path)}
    return subprocess.run([PEFTLAB, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _checkpoint_names(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_run_equals_the_uninterrupted_one(case, tmp_path, tiny_bert, sentiment_csv, capsys):
    trainer, last, kill, expected_step, form = CASES[case]
    (tmp_path / "killer.py").write_text(KILLER)
    distributed = trainer.get("devices", 1) > 1
    reference = _config(tmp_path, tiny_bert, sentiment_csv, "reference", trainer, last, 0)
    killed = _config(tmp_path, tiny_bert, sentiment_csv, "killed", trainer, last, kill)
    common = ["--test_after_fit", "false", *_run_args(last)]
    if distributed:  # several processes cannot run inside pytest's
        result = _subprocess(["fit", "--config", reference, *common], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        _in_process(["fit", "--config", reference, *common], capsys, tmp_path)
    result = _subprocess(["fit", "--config", killed, *common], tmp_path)
    assert result.returncode == -9, result.stdout[-2000:] + result.stderr[-2000:]  # SIGKILL, not a clean exit
    run = resumed_run_dir(tmp_path, "killed")
    ckpt = run / "checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == expected_step

    resume = ["fit", "--config", killed, *common, "--ckpt_path", "last" if form == "last" else str(ckpt),
              "--trainer.callbacks.init_args.step", "0"]
    if distributed:
        result = _subprocess(resume, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        output = result.stdout + result.stderr
    else:
        output = _in_process(resume, capsys, tmp_path)
    assert f"resuming from {ckpt}" in output
    run = resumed_run_dir(tmp_path, "killed")  # still one run directory: the resume continued it
    ref_run = resumed_run_dir(tmp_path, "reference")
    for which in ("last", "best"):
        expected_file = ref_run / f"adapter/{which}/adapter_model.safetensors"
        if not expected_file.exists():
            continue
        expected, got = load_file(str(expected_file)), load_file(str(run / f"adapter/{which}/adapter_model.safetensors"))
        assert got.keys() == expected.keys()
        for name in expected:  # bit-identical: data order, dropout masks, optimizer and schedule state
            assert torch.equal(got[name], expected[name]), f"{which}: {name}"
    assert _checkpoint_names(run) == _checkpoint_names(ref_run)  # best-k tracking continued as well
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == trainer["max_steps"]


def test_last_checkpoint_is_the_newest_state_even_without_improvement(tmp_path, tiny_bert, sentiment_csv, capsys):
    """With a monitor, Lightning's ModelCheckpoint(save_last) wrote last.ckpt only at improvements; peftlab's
    last.ckpt follows every validation. A learning rate of 1e-12 keeps val/acc unchanged after step 3."""
    (tmp_path / "killer.py").write_text(KILLER)
    config = write_config(
        tmp_path, tiny_bert, sentiment_csv, runs="flat", name="flat.yaml", model={"learning_rate": 1e-12},
        trainer={"max_steps": 12, "val_check_interval": 3, "limit_val_batches": 1},
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/acc", "mode": "max", "save_top_k": 1, "save_last": True}},
                   {"class_path": "killer.KillAt", "init_args": {"step": 8}}])
    result = _subprocess(["fit", "--config", config, "--test_after_fit", "false"], tmp_path)
    assert result.returncode == -9
    run = resumed_run_dir(tmp_path, "flat")
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 6  # the last validation
    (best,) = [p for p in (run / "checkpoints").glob("epoch=*.ckpt")]
    assert torch.load(best, weights_only=True)["global_step"] == 3  # no improvement after the first validation
    assert "ModelCheckpoint(save_last) is turned off" in result.stdout
