"""Chat data (issue #30): three formats rendered with a chat template, exactly the assistant tokens in the loss,
splits by conversation, inference in the training format, predicting on a file of inputs alone.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_chat_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import chat_rows, make_data, run_main, write_config, write_jsonl
from peftlab.data.formats import IGNORE_INDEX

SMOL = "packaged:SmolLM2-135M-Instruct"


# a second template family (Llama-3 style: headers, <|eot_id|>, no newline after the end of a turn, trimmed content)
LLAMA3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
          " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def loss_runs(example, tokenizer) -> list[str]:
    """The decoded runs of consecutive loss-carrying tokens of one tokenized example."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def replies(row) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


def _splits_by_id(dm):
    source = {r["id"]: r for r in chat_rows(24)}
    return {split: [source[i] for i in dm.raw[split]["id"]] for split in ("train", "validation", "test")}


@pytest.mark.parametrize("template,eot", [(None, "<|im_end|>"), (LLAMA3, "<|eot_id|>")], ids=["smollm2", "llama3"])
def test_loss_is_on_exactly_each_assistant_reply_and_its_end_of_turn(chat_jsonl, chat_tokenizer_dir, template, eot):
    tokenizer = SMOL if template is None else str(chat_tokenizer_dir)  # SmolLM2's real ChatML template
    dm = make_data(chat_jsonl, "chat", tokenizer, max_length=256, chat_template=template)
    dm.setup()
    rows = _splits_by_id(dm)
    for split in ("train", "validation", "test"):
        assert len(dm.datasets[split]) == len(rows[split]) > 0
        for example, row in zip(dm.datasets[split], rows[split]):
            assert loss_runs(example, dm.tokenizer) == [r + eot for r in replies(row)]
    # the system prompt and the user turns are in the input, never in the loss
    example, row = dm.datasets["train"][0], rows["train"][0]
    text = dm.tokenizer.decode(example["input_ids"])
    assert row["messages"][1 if row["messages"][0]["role"] == "system" else 0]["content"] in text


@pytest.mark.parametrize("train_on,train_on_eos", [("last_assistant", True), ("assistant", False), ("all", True)])
def test_train_on_settings(chat_jsonl, chat_tokenizer_dir, train_on, train_on_eos):
    dm = make_data(chat_jsonl, "chat", str(chat_tokenizer_dir), max_length=256, train_on=train_on,
                   train_on_eos=train_on_eos)
    dm.setup()
    row, example = _splits_by_id(dm)["train"][0], dm.datasets["train"][0]
    if train_on == "all":
        assert example["labels"] == example["input_ids"]
    elif train_on == "last_assistant":
        assert loss_runs(example, dm.tokenizer) == [replies(row)[-1] + "<|im_end|>"]
    else:
        assert loss_runs(example, dm.tokenizer) == replies(row)


def test_sharegpt_and_alpaca_render_as_the_same_conversation(tmp_path, chat_tokenizer_dir):
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}]
    rows = [{"messages": messages}] * 6
    share = [{"conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "bot", "value": "A pear."}]}] * 6
    alpaca = [{"instruction": "Name a fruit.", "input": "", "output": "A pear."}] * 6
    tokenized = []
    for name, data, extra in (("m", rows, {}), ("s", share, {"chat_roles": {"bot": "assistant"}}), ("a", alpaca, {})):
        dm = make_data(write_jsonl(tmp_path / f"{name}.jsonl", data), "chat", str(chat_tokenizer_dir), **extra)
        dm.setup()
        tokenized.append(dm.datasets["train"][0])
    assert tokenized[0] == tokenized[1] == tokenized[2]  # the empty Alpaca input leaves no trace
    with_input = [{"instruction": "Name a fruit.", "input": "Red ones.", "output": "An apple."}] * 6
    dm = make_data(write_jsonl(tmp_path / "ai.jsonl", with_input), "chat", str(chat_tokenizer_dir))
    dm.setup()
    assert dm.tokenizer.decode(dm.datasets["train"][0]["input_ids"]).startswith(
        "<|im_start|>user\nName a fruit.\n\nRed ones.<|im_end|>")


def test_system_prompt_is_added_where_missing_and_never_trained(chat_jsonl, chat_tokenizer_dir):
    dm = make_data(chat_jsonl, "chat", str(chat_tokenizer_dir), max_length=256, system_prompt="Be brief.")
    dm.setup()
    for example, row in zip(dm.datasets["train"], _splits_by_id(dm)["train"]):
        text = dm.tokenizer.decode(example["input_ids"])
        has_own = row["messages"][0]["role"] == "system"
        assert text.startswith("<|im_start|>system\n" + ("You judge film reviews." if has_own else "Be brief."))
        assert loss_runs(example, dm.tokenizer) == [r + "<|im_end|>" for r in replies(row)]


def test_loss_equals_a_hand_computation_over_the_assistant_tokens(chat_jsonl, tiny_chat_llama):
    import torch.nn.functional as F

    from peftlab.methods import LoRA
    from peftlab.methods.base import token_nll

    dm = make_data(chat_jsonl, "chat", tiny_chat_llama, max_length=256, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = LoRA(backbone=tiny_chat_llama, task="causal_lm", r=4, target_modules=["q_proj"]).build()
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, count = token_nll(logits, batch["labels"], "causal_lm")
    logp = F.log_softmax(logits.detach().double(), -1)
    by_hand, n = 0.0, 0
    for b, t in (batch["labels"] != IGNORE_INDEX).nonzero().tolist():  # position t-1 predicts assistant token t
        by_hand -= float(logp[b, t - 1, batch["input_ids"][b, t]])
        n += 1
    assert int(count) == n == sum(int((batch["labels"][b] != IGNORE_INDEX).sum()) for b in range(len(batch["labels"])))
    assert float(nll) == pytest.approx(by_hand, rel=1e-5)


def test_packing_keeps_whole_conversations_and_the_same_targets(chat_jsonl, chat_tokenizer_dir):
    plain = make_data(chat_jsonl, "chat", str(chat_tokenizer_dir), max_length=256)
    packed = make_data(chat_jsonl, "chat", str(chat_tokenizer_dir), max_length=256, packing=True)
    plain.setup()
    packed.setup()
    assert len(packed.datasets["train"]) < len(plain.datasets["train"])
    runs = sorted(r for e in plain.datasets["train"] for r in loss_runs(e, plain.tokenizer))
    assert sorted(r for e in packed.datasets["train"] for r in loss_runs(e, packed.tokenizer)) == runs
    for row in packed.datasets["train"]:  # each conversation restarts its positions (no attention across them)
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert [row["input_ids"][i] for i in starts] == [packed.tokenizer.convert_tokens_to_ids("<|im_start|>")] * len(starts)


def test_length_grouping_batches_conversations_of_similar_length(chat_jsonl, chat_tokenizer_dir):
    dm = make_data(chat_jsonl, "chat", str(chat_tokenizer_dir), max_length=256, batch_size=4, group_by_length=True)
    dm.setup()
    lengths = [int(n) for batch in dm.train_dataloader() for n in batch["attention_mask"].sum(1)]
    # one group of 50 batches holds this whole epoch: sorted longest first, every conversation once
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(lengths) == sorted(len(ids) for ids in dm.datasets["train"]["input_ids"])


def test_splits_never_share_a_group(tmp_path, chat_tokenizer_dir):
    rows = [{**r, "movie": f"m{i // 4}"} for i, r in enumerate(chat_rows(24))]  # 6 groups of 4 rows
    dm = make_data(write_jsonl(tmp_path / "g.jsonl", rows), "chat", str(chat_tokenizer_dir), group_column="movie",
                   val_fraction=0.2, test_fraction=0.2)
    groups = {split: set(dm.raw[split]["movie"]) for split in ("train", "validation", "test")}
    assert groups["train"] and groups["validation"] and groups["test"]
    assert not groups["train"] & groups["validation"] and not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    assert sum(len(dm.raw[s]) for s in groups) == 24


def test_packaged_chat_data_is_real_multi_turn_conversations():
    from peftlab.data.sources import load_source

    ds = load_source("packaged:rotten_tomatoes_chat")["train"]
    assert len(ds) > 4000 and ds.column_names == ["conversation_id", "movie", "messages"]
    first = ds[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] * 4
    verdicts = [m["content"].split(":")[0] for m in first[1:6:2]]
    fresh = verdicts.count("Fresh")
    assert first[-1]["content"] == f"{'Yes' if fresh >= 2 else 'No'}: {fresh} of 3 reviews are fresh."


def test_over_long_conversations_drop_their_oldest_turns_and_are_counted(chat_jsonl, chat_tokenizer_dir, capsys):
    dm = make_data(chat_jsonl, "chat", str(chat_tokenizer_dir), max_length=40)
    dm.setup()
    out = capsys.readouterr().out
    assert "examples are longer than data.max_length=40" in out
    for example in dm.datasets["train"]:
        assert len(example["input_ids"]) <= 40
    # the oldest exchange goes first: what is left starts with the system prompt (if any), then the newest exchange
    kept = 0
    for example, row in zip(dm.datasets["train"], _splits_by_id(dm)["train"]):
        text = dm.tokenizer.decode(example["input_ids"])
        head = "<|im_start|>system\nYou judge film reviews.<|im_end|>\n" if row["messages"][0]["role"] == "system" else ""
        assert text.startswith(head + "<|im_start|>user\nAnd this one?")
        kept += bool(head)
    assert kept


def test_tokenizer_without_chat_template_is_refused_naming_the_option(chat_jsonl, tiny_llama):
    from peftlab.errors import PeftLabError

    with pytest.raises(PeftLabError, match="has no chat template; set data.chat_template"):
        make_data(chat_jsonl, "chat", tiny_llama).setup()


# ------------------------------------------------------------------------------------ inference and the CLI
def _fit_chat(tmp_path, backbone, source, capsys, **data):
    cfg = write_config(tmp_path, backbone, source, trainer={"max_steps": 2},
                       data={"task": "chat", "max_length": 256, **data}, model={"target_modules": ["q_proj"]})
    code, out, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)
    assert code == 0, err
    return next((tmp_path / "runs").rglob("version_*"))


def test_run_predict_and_chat_use_the_training_chat_template(tmp_path, tiny_chat_llama, chat_jsonl, capsys):
    from peftlab.api import load_run
    from peftlab.generation import GenerationSettings

    run_dir = _fit_chat(tmp_path, tiny_chat_llama, chat_jsonl, capsys, system_prompt="Be brief.")
    meta = json.loads((run_dir / "adapter" / "last" / "peftlab_meta.json").read_text())
    assert meta["prompt_format"]["kind"] == "chat" and meta["prompt_format"]["system_prompt"] == "Be brief."
    assert json.loads((run_dir / "run.json").read_text())["data"]["prompt_format"] == meta["prompt_format"]
    run = load_run(str(run_dir))
    question = "What is the capital of Peru?"
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
    assert run.format_prompt(question) == expected
    settings = GenerationSettings(max_new_tokens=5)
    templated = run.predict([question], generation=settings)[0]["generated"]
    by_hand = run.predict([expected], raw=True, generation=settings)[0]["generated"]
    assert templated == by_hand  # predict == the question wrapped in the template by hand
    assert run.chat([{"role": "user", "content": question}], generation=settings) == templated
    # sampling with a seed is reproducible; a stop string cuts the answer
    sampled = [run.predict([question], do_sample=True, temperature=0.8, seed=3, max_new_tokens=5)[0]["generated"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    if templated[1:]:
        stop = templated[1:][:1]
        assert stop not in run.predict([question], generation=settings, stop=[stop])[0]["generated"][1:]


def test_peftlab_chat_message_answers_one_message(tmp_path, tiny_chat_llama, chat_jsonl, capsys):
    from peftlab.api import load_run

    run_dir = _fit_chat(tmp_path, tiny_chat_llama, chat_jsonl, capsys)
    expected = load_run(str(run_dir)).chat([{"role": "user", "content": "Fresh or rotten? Superb."}],
                                           max_new_tokens=4)
    capsys.readouterr()
    code, out, err = run_main(["chat", str(run_dir), "--message", "Fresh or rotten? Superb.",
                               "--generation.max_new_tokens", "4"], capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == expected.splitlines()[-1] if expected.strip() else True
    assert expected in out


def test_peftlab_chat_repl_streams_and_keeps_the_history(tmp_path, tiny_chat_llama, chat_jsonl, capsys, monkeypatch):
    import peftlab.api as api

    run_dir = _fit_chat(tmp_path, tiny_chat_llama, chat_jsonl, capsys)
    seen = []
    real = api.Run.chat

    def spy(self, messages, **kw):
        seen.append([m["content"] for m in messages])
        return real(self, messages, **kw)

    monkeypatch.setattr(api.Run, "chat", spy)
    answers = iter(["Hello", "Again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    api.chat_command(str(run_dir), generation=api.GenerationSettings(max_new_tokens=3))
    assert len(seen) == 2 and seen[0] == ["Hello"] and seen[1][0] == "Hello" and seen[1][-1] == "Again"
    assert len(seen[1]) == 3  # user, the streamed assistant reply, user


def test_predict_on_a_file_of_inputs_alone_writes_the_input_columns(tmp_path, tiny_chat_llama, chat_jsonl, capsys):
    run_dir = _fit_chat(tmp_path, tiny_chat_llama, chat_jsonl, capsys)
    new = write_jsonl(tmp_path / "new.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "Fresh or rotten? Superb."}]},
        {"id": "b", "messages": [{"role": "user", "content": "Fresh or rotten? Dull."},
                                 {"role": "assistant", "content": "Rotten."}]}])  # the reference reply is dropped
    preds = tmp_path / "preds.jsonl"
    code, _, err = run_main(["predict", "--config", str(run_dir / "config.yaml"), "--data.predict_source", new,
                             "--ckpt_path", str(next(run_dir.rglob("*.ckpt"))), "--predictions_file", str(preds),
                             "--generation.max_new_tokens", "3"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert [r["input"] for r in rows] == ["Fresh or rotten? Superb.", "Fresh or rotten? Dull."]
    assert all("generated" in r and "messages" in r for r in rows)


def test_classification_predict_source_needs_no_labels_and_keeps_text_pair(tmp_path, tiny_bert, capsys):
    from conftest import rotten_rows, write_csv

    rows = [{"premise": r["text"], "hypothesis": "It is good.", "label": r["label"]} for r in rotten_rows(60)]
    train = write_csv(tmp_path / "train.csv", rows)
    cfg = write_config(tmp_path, tiny_bert, train, data={"text_column": "premise", "text_pair_column": "hypothesis",
                                                         "labels": ["rotten", "fresh"]})
    code, _, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)
    assert code == 0, err
    run_dir = next((tmp_path / "runs").rglob("version_*"))
    new = write_csv(tmp_path / "new.csv", [{"pair_id": i, "premise": rows[0]["premise"], "hypothesis": h}
                                           for i, h in enumerate(["It is good.", "It is bad."])])
    preds = tmp_path / "p.jsonl"
    # the training file is gone: the labels come from data.labels, the inputs from predict_source
    Path(train).unlink()
    code, _, err = run_main(["predict", "--config", str(run_dir / "config.yaml"), "--data.predict_source", new,
                             "--ckpt_path", str(next(run_dir.rglob("*.ckpt"))), "--predictions_file", str(preds)], capsys)
    assert code == 0, err
    out = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["pair_id"], r["hypothesis"]) for r in out] == [(0, "It is good."), (1, "It is bad.")]
    assert all(r["label"] in ("rotten", "fresh") for r in out)


def test_causal_lm_run_predict_applies_the_prompt_template(tmp_path, tiny_llama, generation_jsonl, capsys):
    from peftlab.api import load_run

    cfg = write_config(tmp_path, tiny_llama, generation_jsonl, trainer={"max_steps": 1},
                       data={"task": "causal_lm", "prompt_template": "Review: {text}\nVerdict:",
                             "response_template": " {label}", "source": _renamed(tmp_path, generation_jsonl)},
                       model={"target_modules": ["q_proj"]})
    code, _, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)
    assert code == 0, err
    run = load_run(str(next((tmp_path / "runs").rglob("version_*"))))
    assert run.format_prompt("Great film.") == "Review: Great film.\nVerdict:"
    assert run.predict(["Great film."], max_new_tokens=3) == run.predict(["Review: Great film.\nVerdict:"],
                                                                          raw=True, max_new_tokens=3)


def _renamed(tmp_path, generation_jsonl):
    rows = [json.loads(line) for line in Path(generation_jsonl).read_text().splitlines()]
    return write_jsonl(tmp_path / "tl.jsonl", [{"text": r["prompt"][8:-9], "label": r["response"].strip()}
                                                for r in rows])
