"""Method-specific behaviour of the method zoo (the shared matrix lives in test_methods.py).

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_zoo.py."""

from __future__ import annotations

from conftest import make_data, tiny_trainer
from peftlab.methods import QLoRA


def test_qlora_classification_on_minilm():
    """QLoRA on the real all-MiniLM-L6-v2: head kept in full precision, a few training steps."""
    data = make_data("packaged:rotten_tomatoes", "classification", "packaged:all-MiniLM-L6-v2",
                     max_train_samples=64, max_eval_samples=16, batch_size=16)
    model = QLoRA(backbone="packaged:all-MiniLM-L6-v2", num_labels=2, r=8, target_modules=["query", "value"]).build()
    assert model.trainable_count == 6 * 2 * 8 * (384 + 384) + 384 * 2 + 2  # same as LoRA: 74,498
    trainer = tiny_trainer(max_steps=3)
    trainer.fit(model, datamodule=data)
    assert 0.0 <= trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"] <= 1.0
