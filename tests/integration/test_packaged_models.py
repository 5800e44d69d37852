"""Integration tests on the packaged real models (all-MiniLM-L6-v2, SmolLM2-135M) and real data."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import ROOT, make_data, tiny_trainer
from peftlab.methods import LoRA


def test_loss_decreases_on_real_subset():
    torch.manual_seed(0)
    data = make_data("packaged:rotten_tomatoes", "classification", "packaged:all-MiniLM-L6-v2",
                     max_train_samples=128, batch_size=16, max_length=48)
    model = LoRA(backbone="packaged:all-MiniLM-L6-v2", num_labels=data.num_labels, learning_rate=5e-3).build()
    data.setup()
    fixed = torch.utils.data.DataLoader(data.datasets["train"], batch_size=32, collate_fn=data.collate)
    evaluator = tiny_trainer(limit_val_batches=None)
    before = evaluator.validate(model, dataloaders=fixed, verbose=False)[0]["val/loss"]
    tiny_trainer(max_steps=48).fit(model, datamodule=data)  # 6 epochs over the 128 examples
    after = tiny_trainer(limit_val_batches=None).validate(model, dataloaders=fixed, verbose=False)[0]["val/loss"]
    assert after < before - 0.05, (before, after)


def test_causal_lm_config_on_smollm2(tmp_path, capsys):
    """configs/causal_lm_lora.yaml on the real SmolLM2-135M, capped at 3 steps."""
    from conftest import run_main

    code, out, err = run_main(
        ["fit", "--config", str(ROOT / "configs/causal_lm_lora.yaml"), "--trainer.max_steps", "3",
         "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
         "--data.max_train_samples", "24", "--data.max_eval_samples", "16", "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        capsys,
    )
    assert code == 0, err
    # SmolLM2-135M: 30 layers, hidden 576, 9 query heads and 3 KV heads of 64:
    # q_proj 576->576 gets 8*576 + 576*8, v_proj 576->192 gets 8*576 + 192*8
    assert f"trainable   {30 * ((8 * 576 + 576 * 8) + (8 * 576 + 192 * 8)):,} / " in out
    assert "460,800" in out and "test/ppl" in out
    # adapter-only checkpoints: LoRA + Adam state, a small fraction of the 540 MB fp32 backbone
    from peftlab.assets import model_path

    backbone_bytes = sum(f.stat().st_size for f in Path(model_path("packaged:SmolLM2-135M-Instruct")).glob("*.safetensors"))
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts and all(c.stat().st_size < 0.02 * backbone_bytes for c in ckpts)
    exported = next(tmp_path.rglob("adapter/last/adapter_model.safetensors"))
    assert exported.stat().st_size < 0.01 * backbone_bytes
