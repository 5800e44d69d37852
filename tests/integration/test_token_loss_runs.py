"""One loss whatever the batching: causal-LM / seq2seq training is normalized by the target tokens of the whole
optimizer step (every accumulated micro-batch, every rank), and packed rows train exactly like unpacked ones.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_token_loss.py."""

from __future__ import annotations

import os
import subprocess

import torch
from safetensors.torch import load_file

from conftest import PEFTLAB, write_config


def test_two_processes_train_the_same_causal_lm_adapter_as_one(tmp_path, tiny_llama, uneven_jsonl):
    """DDP on 2 CPU processes (batch 2 each, accumulate 2) == 1 process at batch 8: every token of the global
    batch weighs the same on both (before, each rank's micro-batch mean was averaged)."""
    def run(name, devices, batch_size, accumulate):
        cfg = write_config(tmp_path, tiny_llama, uneven_jsonl, runs=name, name=f"{name}.yaml",
                           model={"dropout": 0.0, "learning_rate": 0.01, "target_modules": ["q_proj", "v_proj"]},
                           data={"task": "causal_lm", "batch_size": batch_size, "shuffle": False,
                                 "group_by_length": False, "max_length": 64},
                           trainer={"max_steps": 3, "limit_val_batches": 0, "limit_test_batches": 0,
                                    "devices": devices, "accumulate_grad_batches": accumulate,
                                    **({"strategy": "ddp"} if devices > 1 else {})})
        result = subprocess.run([PEFTLAB, "fit", "--config", cfg, "--test_after_fit", "false"], cwd=tmp_path,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (run_dir,) = sorted((tmp_path / name / "r").glob("version_*"))
        return load_file(str(run_dir / "adapter/last/adapter_model.safetensors"))

    one = run("one", 1, 8, 1)
    two = run("two", 2, 2, 2)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)
