"""Chat data (issue #30): three formats rendered with a chat template, exactly the assistant tokens in the loss,
splits by conversation, inference in the training format, predicting on a file of inputs alone.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_chat.py."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, write_config


@pytest.mark.slow
def test_shipped_chat_config_trains_smollm2_through_the_cli(tmp_path, capsys):
    """configs/chat_lora.yaml through ``python -m peftlab fit`` on the real SmolLM2-135M-Instruct, one step."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "peftlab", "fit", "--config", str(ROOT / "configs/chat_lora.yaml"),
         "--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.max_train_samples",
         "8", "--data.max_eval_samples", "2", "--data.batch_size", "2", "--data.max_length", "160",
         "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.val_check_interval", "1",
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads(next(tmp_path.rglob("adapter/last/peftlab_meta.json")).read_text())
    assert "<|im_start|>" in meta["prompt_format"]["chat_template"]
    assert torch.isfinite(torch.tensor(float(next(line for line in run.stdout.splitlines() if "test/loss" in line).split()[-1])))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_chat_data_trains_the_same_adapter_on_two_processes(tmp_path, tiny_chat_llama, chat_jsonl, strategy):
    """DDP and FSDP2 (2 CPU processes over gloo, global batch 8) train what one process trains on chat data."""
    import subprocess

    from safetensors.torch import load_file

    from conftest import PEFTLAB

    def fit(name, devices, batch_size):
        cfg = write_config(tmp_path, tiny_chat_llama, chat_jsonl, name=f"{name}.yaml", runs=name, callbacks=[],
                           trainer={"max_steps": 3, "devices": devices, "limit_val_batches": 0},
                           data={"task": "chat", "max_length": 256, "batch_size": batch_size, "shuffle": False,
                                 "group_by_length": False},
                           model={"target_modules": ["q_proj", "v_proj"], "dropout": 0.0})
        argv = [PEFTLAB, "fit", "--config", cfg, "--test_after_fit", "false"]
        if devices > 1:
            argv[4:4] = ["--trainer.strategy", "ddp" if strategy == "ddp" else
                         json.dumps({"class_path": "peftlab.strategies.FSDP2Strategy"})]
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        return load_file(str(next((tmp_path / name).rglob("adapter/last/adapter_model.safetensors"))))

    one, two = fit("one", 1, 8), fit("two", 2, 4)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-4 * float(one[key].abs().max()))
