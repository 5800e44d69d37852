"""peftlab.callbacks.GenerationEval: generated-text metrics every N validations during fit, and the generations
file `peftlab test` writes on a generative run."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import run_main, write_config
from peftlab.errors import PeftLabError


def _config(tmp_path, tiny_llama, generation_jsonl, **trainer):
    return write_config(tmp_path, tiny_llama, generation_jsonl, model={"target_modules": ["q_proj", "v_proj"],
                                                                       "max_new_tokens": 3},
                        data={"task": "causal_lm", "max_length": 48, "max_eval_samples": 12},
                        trainer={"max_steps": 4, "val_check_interval": 1, "limit_val_batches": 1,
                                 "limit_test_batches": 2, **trainer}, run_name="gen")


def test_generation_metrics_every_second_validation_beside_the_loss(tmp_path, tiny_llama, generation_jsonl, capsys):
    cfg = _config(tmp_path, tiny_llama, generation_jsonl)
    code, out, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false",
                               "--trainer.callbacks+=peftlab.callbacks.GenerationEval",
                               "--trainer.callbacks.max_new_tokens=3", "--trainer.callbacks.stages=[val]",
                               "--trainer.callbacks.every_n_validations=2", "--trainer.callbacks.max_batches=1"],
                              capsys)
    assert code == 0, err[-3000:]
    rows = list(csv.DictReader(open(next((tmp_path / "runs").rglob("metrics.csv")))))
    losses = [r for r in rows if r.get("val/loss")]
    generated = [r for r in rows if r.get("val/rougeL")]
    assert len(losses) == 4 and len(generated) == 2  # validations 1 and 3 of 4
    assert [r["step"] for r in generated] == [losses[0]["step"], losses[2]["step"]]
    assert all(0 <= float(r["val/gen_exact_match"]) <= 1 and 0 <= float(r["val/bleu"]) <= 1 for r in generated)


def test_peftlab_test_writes_the_generations_file(tmp_path, tiny_llama, generation_jsonl, capsys):
    cfg = _config(tmp_path, tiny_llama, generation_jsonl)
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    ckpt = str(next((tmp_path / "runs/gen/version_0/checkpoints").glob("*.ckpt")))
    code, out, err = run_main(["test", "--config", cfg, "--ckpt_path", ckpt], capsys)
    assert code == 0, err[-3000:]
    (path,) = (tmp_path / "runs" / "gen").rglob("generations.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12  # every test example (max_eval_samples), in order
    assert set(rows[0]) == {"input", "reference", "generated", "gen_exact_match", "rougeL"}
    sources = [json.loads(line) for line in open(generation_jsonl)]
    assert {r["reference"].strip() for r in rows} <= {"fresh", "rotten"}
    assert all(any(s["prompt"].strip().endswith(r["input"].strip()[-30:]) for s in sources) for r in rows)
    metrics = list(csv.DictReader(open(path.parent / "metrics.csv")))
    logged = float(next(r for r in metrics if r.get("test/gen_exact_match"))["test/gen_exact_match"])
    assert logged == pytest.approx(sum(r["gen_exact_match"] for r in rows) / len(rows))


def test_classification_test_writes_no_generations(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, run_name="cls", trainer={"max_steps": 1})
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    ckpt = str(next((tmp_path / "runs/cls/version_0/checkpoints").glob("*.ckpt")))
    code, out, err = run_main(["test", "--config", cfg, "--ckpt_path", ckpt], capsys)
    assert code == 0 and "test/acc" in out, err[-3000:]
    assert not list((tmp_path / "runs").rglob("generations.jsonl"))


def test_bad_settings_are_refused():
    from peftlab.callbacks import GenerationEval

    with pytest.raises(PeftLabError, match="stages"):
        GenerationEval(stages=["train"])
    with pytest.raises(PeftLabError, match="every_n_validations"):
        GenerationEval(every_n_validations=0)


def test_prompt_family_generations_of_a_batch_equal_each_row_alone(tiny_llama, generation_jsonl):
    """Prompt tuning's virtual positions sit ahead of the left padding (pads_exactly = False): GenerationEval
    generates its rows in batches of one prompt length, so a batch's generations are each row's own."""
    import torch

    from peftlab.callbacks import GenerationEval
    from peftlab.data import PeftDataModule
    from peftlab.methods import PromptTuning

    module = PromptTuning(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=3, max_new_tokens=5).build()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    module.eval()
    data = PeftDataModule(source=generation_jsonl, task="causal_lm", tokenizer=tiny_llama, max_length=64,
                          batch_size=8, max_eval_samples=8, loss_on="response")
    data.prepare_data()
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    lengths = {int((row != -100).nonzero()[0]) for row in batch["labels"]}
    assert len(lengths) > 2  # prompts of several lengths in the batch
    callback = GenerationEval(max_new_tokens=5)
    masks, generate = [], module.model.generate
    module.model.generate = lambda **kw: masks.append(kw["attention_mask"]) or generate(**kw)
    with torch.no_grad():
        together, _ = callback.generate(module, batch)
        assert len(masks) == len(lengths) and all(bool(m.all()) for m in masks)  # no padding in any call
        alone = [callback.generate(module, {k: v[i:i + 1] for k, v in batch.items()})[0][0] for i in range(8)]
    assert together == alone
