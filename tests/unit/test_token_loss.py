"""One loss whatever the batching: causal-LM / seq2seq training is normalized by the target tokens of the whole
optimizer step (every accumulated micro-batch, every rank), and packed rows train exactly like unpacked ones.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_token_loss_runs.py."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import make_data, tiny_trainer, write_config


class Grads(L.Callback):
    """The gradients the last optimizer step used (after peftlab's token normalization): Lightning zeroes them at
    the start of the next accumulation window, so after the last step they are still there."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_end(self, trainer, pl_module):
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _lora(tiny_llama):
    from peftlab.methods import LoRA

    return LoRA(backbone=tiny_llama, task="causal_lm", r=4, dropout=0.0, learning_rate=1e-3,
                target_modules=["q_proj", "v_proj"])


def _one_step(tiny_llama, source, batch_size, accumulate, **data):
    torch.manual_seed(0)
    dm = make_data(source, "causal_lm", tiny_llama, batch_size=batch_size, shuffle=False, group_by_length=False,
                   max_train_samples=64, **data)
    grads = Grads()
    trainer = tiny_trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[grads], limit_val_batches=0)
    module = _lora(tiny_llama)
    trainer.fit(module, datamodule=dm)
    assert len(grads.steps) == 1
    return grads.steps[0], module, trainer


def test_gradient_accumulation_weights_every_token_equally(tiny_llama, uneven_jsonl):
    """accumulate_grad_batches 4 at batch 2 == batch 8: the same gradients (rtol 1e-5), though the four
    micro-batches hold very different numbers of target tokens."""
    big, _, _ = _one_step(tiny_llama, uneven_jsonl, batch_size=8, accumulate=1)
    small, _, _ = _one_step(tiny_llama, uneven_jsonl, batch_size=2, accumulate=4)
    assert big.keys() == small.keys() and big
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-8)
    # the data really is uneven: the per-micro-batch mean (what training did before) gives other gradients
    dm = make_data(uneven_jsonl, "causal_lm", tiny_llama, batch_size=2, shuffle=False, group_by_length=False,
                   max_train_samples=64)
    dm.setup()
    counts = [int((b["labels"][:, 1:] != -100).sum()) for _, b in zip(range(4), dm.train_dataloader())]
    assert max(counts) > 2 * min(counts), counts


def test_logged_training_loss_is_the_token_weighted_mean(tiny_llama, uneven_jsonl, tmp_path):
    """train/loss of the first step = the mean NLL over every target token of its 8 examples, computed by the
    transformers model itself (its loss is the token mean) before the weights moved."""
    import csv

    from peftlab.methods.base import token_nll

    torch.manual_seed(0)
    dm = make_data(uneven_jsonl, "causal_lm", tiny_llama, batch_size=2, shuffle=False, group_by_length=False,
                   max_train_samples=64)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="log")
    module = _lora(tiny_llama)
    trainer = tiny_trainer(max_steps=1, accumulate_grad_batches=4, logger=logger, log_every_n_steps=1,
                           limit_val_batches=0)
    reference = _lora(tiny_llama).build()
    reference.model.load_state_dict(module.build().model.state_dict())  # same initial adapter
    dm.setup()
    batches = [b for _, b in zip(range(4), dm.train_dataloader())]
    with torch.no_grad():
        sums = [token_nll(reference.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                          b["labels"], "causal_lm") for b in batches]
        expected = float(sum(s for s, _ in sums) / sum(n for _, n in sums))
        # the same by the model's own loss on all 8 examples at once
        ids = torch.nn.utils.rnn.pad_sequence([r for b in batches for r in b["input_ids"]], batch_first=True)
        assert ids.shape[0] == 8
    trainer.fit(module, datamodule=dm)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert logged and logged[0] == pytest.approx(expected, rel=1e-5)
    mean_of_means = float(sum(s / n for s, n in sums) / 4)
    assert abs(mean_of_means - expected) > 1e-3  # and it is not the mean of the micro-batch means


@pytest.fixture(scope="module")
def t5_without_dropout(tmp_path_factory, tiny_t5):
    """The tiny T5 with dropout off, so batch 8 and 4 x batch 2 compute the same function."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = tmp_path_factory.mktemp("t5_no_dropout")
    AutoModelForSeq2SeqLM.from_pretrained(tiny_t5, dropout_rate=0.0).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_t5).save_pretrained(path)
    return str(path)


def test_seq2seq_accumulation_weights_every_token_equally(t5_without_dropout, uneven_jsonl):
    from peftlab.methods import LoRA

    tiny_t5 = t5_without_dropout

    def step(batch_size, accumulate):
        torch.manual_seed(0)
        dm = make_data(uneven_jsonl, "seq2seq", tiny_t5, batch_size=batch_size, shuffle=False, group_by_length=False,
                       max_train_samples=64)
        grads = Grads()
        module = LoRA(backbone=tiny_t5, task="seq2seq", r=4, dropout=0.0, target_modules=["q", "v"])
        tiny_trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[grads],
                     limit_val_batches=0).fit(module, datamodule=dm)
        return grads.steps[0]

    big, small = step(8, 1), step(2, 4)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------ packing
def _packed_and_plain(tiny_llama, source, **kw):
    plain = make_data(source, "causal_lm", tiny_llama, max_train_samples=16, group_by_length=False, shuffle=False,
                      **kw)
    packed = make_data(source, "causal_lm", tiny_llama, max_train_samples=16, group_by_length=False, shuffle=False,
                       packing=True, **kw)
    plain.setup()
    packed.setup()
    return plain, packed


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_packed_rows_give_the_unpacked_loss_and_gradients(tiny_llama, uneven_jsonl, loss_on):
    from peftlab.methods.base import token_nll

    plain, packed = _packed_and_plain(tiny_llama, uneven_jsonl, loss_on=loss_on, max_length=96)
    assert len(packed.datasets["train"]) < len(plain.datasets["train"]) == 16  # several examples per row
    module = _lora(tiny_llama).build()
    torch.nn.init.normal_(module.model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight,
                          std=0.1)  # LoRA's B starts at zero: give the adapter gradients through A as well

    def loss_and_grads(dm):
        module.zero_grad()
        total, count = 0.0, 0
        loader = torch.utils.data.DataLoader(dm.datasets["train"], batch_size=4, collate_fn=dm.collate)
        for batch in loader:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            nll, n = token_nll(module.model(**inputs, use_cache=False).logits, batch["labels"], "causal_lm")
            nll.backward()
            total, count = total + nll.detach(), count + int(n)
        return total / count, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(plain), loss_and_grads(packed)
    assert "attention_mask" not in packed.collate([packed.datasets["train"][0]])  # the mask comes from positions
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:  # 1e-5 of each gradient's own scale (elements near zero differ by summation order)
        scale = float(grads_a[name].abs().max())
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-5 * scale)


def test_no_token_attends_across_a_packed_example_boundary(tiny_llama, uneven_jsonl):
    """Each example's logits inside a packed row equal its logits alone: the first token of the second example
    would otherwise see the whole first example (a change of its context changes its logits)."""
    plain, packed = _packed_and_plain(tiny_llama, uneven_jsonl, loss_on="all", max_length=96)
    module = _lora(tiny_llama).build().eval()
    rows = packed.datasets["train"]
    row = max(rows, key=lambda r: r["position_ids"].count(0))  # the row with the most examples
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 3
    batch = packed.collate([row])
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits[0]  # as training_step calls it
        for start, end in zip(starts, starts[1:] + [len(row["input_ids"])]):
            ids = torch.tensor([row["input_ids"][start:end]])
            alone = module.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            torch.testing.assert_close(logits[start:end], alone, rtol=1e-5, atol=1e-5)


def test_pack_examples_fills_rows_and_masks_each_first_label():
    from peftlab.data.transforms import pack_examples

    ids = [[1] * 5, [2] * 3, [3] * 4, [4] * 2, [5] * 6]
    labels = [list(range(10, 15)), [-100, 20, 21], [30, 31, 32, 33], [40, 41], list(range(50, 56))]
    out = pack_examples(ids, labels, max_length=8)
    assert sorted(len(r) for r in out["input_ids"]) == [4, 8, 8]  # first fit, longest first: 6+2, 5+3, 4
    assert sum(len(r) for r in out["input_ids"]) == 20  # every token, once
    for row, labs, pos in zip(out["input_ids"], out["labels"], out["position_ids"]):
        for start in (i for i, p in enumerate(pos) if p == 0):
            assert labs[start] == -100  # never predicted from the previous example's last token
        assert len(row) == len(labs) == len(pos) <= 8
    with pytest.raises(Exception, match="more than data.max_length"):
        pack_examples([[1] * 9], [[1] * 9], max_length=8)


def test_methods_with_virtual_tokens_refuse_packing_in_one_line(tmp_path, tiny_llama, uneven_jsonl, capsys):
    from conftest import run_main

    cfg = write_config(tmp_path, tiny_llama, uneven_jsonl, method="peftlab.methods.PromptTuning",
                       model={"num_virtual_tokens": 4}, data={"task": "causal_lm", "packing": True})
    code, _, err = run_main(["fit", "--config", cfg], capsys)
    assert code == 2 and "PromptTuning cannot train on packed rows (data.packing)" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # refused before the model was loaded or anything written
    code, _, err = run_main(["fit", "--config", cfg, "--data.task", "classification"], capsys)
    assert code == 2 and "data.packing needs task: causal_lm" in err
