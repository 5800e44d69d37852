"""Exact resume from any checkpoint placement: a run SIGKILLed after a checkpoint and resumed ends with the
adapter of the uninterrupted run, tensor for tensor, and saved the same checkpoints (docs/reliability.md).

Each case: the uninterrupted reference (in this process), the same run in a real process that kills itself
with SIGKILL right after a checkpoint (every rank, at the same step), then the resume (``--ckpt_path last`` or
the explicit path of ``last.ckpt``). LoRA dropout and a warm-up schedule are on, so the RNG, the loader position
and the scheduler must all be restored.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_resume_runs.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import resumed_run_dir, run_main, write_config


def test_a_checkpoint_of_another_run_starts_a_new_run(tmp_path, tiny_bert, sentiment_csv, capsys):
    """An explicit --ckpt_path outside this config's runs is a starting point, not a run to continue."""
    first = write_config(tmp_path, tiny_bert, sentiment_csv, runs="a", name="a.yaml", trainer={"max_steps": 2})
    assert run_main(["fit", "--config", first, "--test_after_fit", "false"], capsys)[0] == 0
    ckpt = tmp_path / "a/r/version_0/checkpoints/last.ckpt"
    second = write_config(tmp_path, tiny_bert, sentiment_csv, runs="b", name="b.yaml", trainer={"max_steps": 4})
    code, out, err = run_main(["fit", "--config", second, "--test_after_fit", "false", "--ckpt_path", str(ckpt)], capsys)
    assert code == 0, err
    assert "resuming from" not in out
    assert torch.load(tmp_path / "b/r/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


# (trainer settings, steps of the first part, steps in all): an epoch of 12 batches; one of 5 (limit_train_batches)
EPOCH_ENDS = {"epoch_of_12": ({"val_check_interval": 5}, 12, 14),
              "limit_train_batches": ({"limit_train_batches": 5, "val_check_interval": 2}, 5, 7)}


@pytest.mark.parametrize("case", list(EPOCH_ENDS))
def test_a_run_stopped_by_max_steps_at_an_epoch_end_continues_exactly(case, tmp_path, tiny_bert, sentiment_csv,
                                                                     capsys):
    """A run whose max_steps ends an epoch and is continued equals the longer run: on resume Lightning draws once
    from the finished epoch's iterator, which must be empty and leave the RNG as it was saved (also where
    limit_train_batches ends the epoch early). A constant rate: the first part's schedule would otherwise differ;
    no validation at its last step."""
    settings, first, steps = EPOCH_ENDS[case]

    def config(name, steps):
        return write_config(tmp_path, tiny_bert, sentiment_csv, runs=name, name=f"{name}.yaml",
                            model={"dropout": 0.1, "scheduler": "constant"},
                            trainer={"max_steps": steps, "limit_val_batches": 1, **settings})

    assert run_main(["fit", "--config", config("reference", steps), "--test_after_fit", "false"], capsys)[0] == 0
    part = config("part", first)
    assert run_main(["fit", "--config", part, "--test_after_fit", "false"], capsys)[0] == 0
    code, _, err = run_main(["fit", "--config", part, "--test_after_fit", "false", "--trainer.max_steps", str(steps),
                             "--ckpt_path", "last"], capsys)
    assert code == 0, err
    ref_ckpt = torch.load(resumed_run_dir(tmp_path, "reference") / "checkpoints/last.ckpt", weights_only=True)
    got_ckpt = torch.load(resumed_run_dir(tmp_path, "part") / "checkpoints/last.ckpt", weights_only=True)
    assert (got_ckpt["epoch"], got_ckpt["global_step"]) == (ref_ckpt["epoch"], ref_ckpt["global_step"])
    expected = load_file(str(resumed_run_dir(tmp_path, "reference") / "adapter/last/adapter_model.safetensors"))
    got = load_file(str(resumed_run_dir(tmp_path, "part") / "adapter/last/adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
