"""Reliability and safety (issue #9): bad input gets one clear message, saves are atomic, a killed run
resumes bit-exactly, runs are deterministic and recorded, loading never unpickles, faults stop cleanly.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_reliability_runs.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import run_main, write_config
from peftlab.errors import PeftLabError


# ---------------------------------------------------------------------------------------------- bad input
def _file(tmp_path, name, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _trained_checkpoint(ctx) -> str:
    cfg = write_config(ctx["tmp"], ctx["bert"], ctx["csv"], name="ok.yaml", runs="ok_runs")
    code, _, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false"], ctx["capsys"])
    assert code == 0, err
    return str(next((ctx["tmp"] / "ok_runs").rglob("*.ckpt")))


def _adapter_of_other_backbone(ctx) -> str:
    cfg = write_config(ctx["tmp"], ctx["bert"], ctx["csv"], name="ok.yaml", runs="ok_runs")
    code, _, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false"], ctx["capsys"])
    assert code == 0, err
    return str(next((ctx["tmp"] / "ok_runs").rglob("adapter/last")))


def _remote_code_backbone(ctx) -> str:
    directory = ctx["tmp"] / "custom_model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "my_custom_arch", "auto_map": {"AutoConfig": "modeling_custom.CustomConfig"}}))
    (directory / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    return str(directory)


def _jsonl(ctx, name, rows) -> str:
    from conftest import write_jsonl

    return write_jsonl(ctx["tmp"] / name, rows)


def _generation_config(ctx, bad_row: dict) -> list[str]:
    """A causal-LM config on the tiny Llama whose sixth row is ``bad_row``."""
    rows = [{"prompt": f"Review {i}:", "response": " fresh"} for i in range(5)] + [bad_row]
    cfg = write_config(ctx["tmp"], ctx["chat_llama"], _jsonl(ctx, "gen.jsonl", rows), name="gen.yaml",
                       data={"task": "causal_lm", "prompt_template": "{prompt}", "response_template": "{response}"},
                       model={"target_modules": ["q_proj"]})
    return ["--config", cfg]


def _chat_config(ctx, bad_messages: list[dict], backbone: str | None = None) -> list[str]:
    """A chat config on the tiny ChatML Llama whose sixth conversation is ``bad_messages``."""
    good = [{"role": "user", "content": "Fresh or rotten? Superb."}, {"role": "assistant", "content": "Fresh."}]
    rows = [{"messages": good}] * 5 + [{"messages": bad_messages}]
    cfg = write_config(ctx["tmp"], backbone or ctx["chat_llama"], _jsonl(ctx, "chat.jsonl", rows), name="chat.yaml",
                       data={"task": "chat"}, model={"target_modules": ["q_proj"]})
    return ["--config", cfg]


def _labels_file(ctx, labels) -> str:
    rows = b"".join(f"review number {i},{label}\n".encode() for i, label in enumerate(labels * 10))
    return _file(ctx["tmp"], "labels.csv", b"text,label\n" + rows)


_USER = {"role": "user", "content": "Fresh or rotten? Dull."}


# (id, argv builder, expected message fragment). Each case runs the real CLI in-process on the tiny BERT (or on the
# tiny Llama, through a second --config, for generation and chat data).
BAD_INPUTS = [
    ("unknown_key", lambda c: ["--model.init_args.rank", "8"], "rank"),
    ("wrong_type", lambda c: ["--model.init_args.r", "eight"], "model.init_args.r"),
    ("negative_rank", lambda c: ["--model.init_args.r", "-1"], "model.r (LoRA rank) must be >= 1"),
    ("alpha_zero", lambda c: ["--model.init_args.alpha", "0"], "model.alpha must be > 0"),
    ("dropout_out_of_range", lambda c: ["--model.init_args.dropout", "1.5"], "model.dropout must be in [0, 1)"),
    ("prefix_length_zero",
     lambda c: ["--config", write_config(c["tmp"], c["bert"], c["csv"], method="peftlab.methods.PrefixTuning",
                                         model={"num_virtual_tokens": 0}, name="p.yaml")],
     "model.num_virtual_tokens must be >= 1"),
    ("target_module_absent", lambda c: ["--model.init_args.target_modules", "[qkv]"],
     "target module 'qkv' (model.target_modules) is not in this backbone"),
    ("target_string_matches_nothing", lambda c: ["--model.init_args.target_modules", "query"],
     "is a single string, which peft matches as a regular expression"),
    ("method_backbone_mismatch",  # QLoRA's CPU kernels need >= 64 input features; the tiny BERT has 32
     lambda c: ["--config", write_config(c["tmp"], c["bert"], c["csv"], method="peftlab.methods.QLoRA",
                                         model={"r": 4}, name="q.yaml")],
     "QLoRA on CPU needs linear layers with >= 64 input features"),
    ("task_model_mismatch", lambda c: ["--data.task", "seq2seq"], "has no seq2seq head"),
    ("unknown_method", lambda c: ["--model.class_path", "peftlab.methods.LoRAA"], "LoRAA"),
    ("unknown_task", lambda c: ["--data.task", "regression"], "regression"),
    ("unknown_optimizer", lambda c: ["--model.init_args.optimizer", "sgd"], "optimizer"),
    ("learning_rate_zero", lambda c: ["--model.init_args.learning_rate", "0"], "model.learning_rate must be > 0"),
    ("head_learning_rate_zero", lambda c: ["--model.init_args.head_learning_rate", "0"],
     "model.head_learning_rate must be > 0"),
    ("warmup_out_of_range", lambda c: ["--model.init_args.warmup_ratio", "1.5"], "model.warmup_ratio must be in [0, 1)"),
    ("batch_size_zero", lambda c: ["--data.batch_size", "0"], "data.batch_size must be >= 1"),
    ("val_fraction_out_of_range", lambda c: ["--data.val_fraction", "1.5"], "data.val_fraction must be between 0 and 1"),
    ("missing_config_file", lambda c: ["--config", str(c["tmp"] / "nope.yaml")], "nope.yaml"),
    ("config_not_yaml", lambda c: ["--config", _file(c["tmp"], "broken.yaml", b"model: [unclosed\n")], "broken.yaml"),
    ("missing_data_file", lambda c: ["--data.source", str(c["tmp"] / "missing.csv")], "does not exist"),
    ("missing_backbone_dir", lambda c: ["--model.init_args.backbone", str(c["tmp"] / "no_model")],
     "no such directory"),
    ("empty_dataset", lambda c: ["--data.source", _file(c["tmp"], "empty.csv", b"")], "is empty"),
    ("header_only_dataset", lambda c: ["--data.source", _file(c["tmp"], "h.csv", b"text,label\n")], "has no rows"),
    ("non_utf8_text",
     lambda c: ["--data.source", _file(c["tmp"], "l.csv", b"text,label\n" + "caf\xe9,fresh\n".encode("latin-1") * 20)],
     "not valid UTF-8"),
    ("text_column_absent", lambda c: ["--data.text_column", "review"], "column 'review' (data.text_column)"),
    ("labels_out_of_range", lambda c: ["--data.labels", "[good,bad]"], "out of range for data.labels"),
    ("few_shot_k_larger_than_class", lambda c: ["--data.few_shot_k", "1000"], "data.few_shot_k=1000"),
    ("few_shot_k_and_n", lambda c: ["--data.few_shot_k", "4", "--data.few_shot_n", "8"], "not both"),
    ("checkpoint_missing", lambda c: ["--ckpt_path", str(c["tmp"] / "gone.ckpt")], "gone.ckpt does not exist"),
    ("checkpoint_corrupt", lambda c: ["--ckpt_path", _file(c["tmp"], "bad.ckpt", b"\x80\x04 not a checkpoint")],
     "is corrupt or not a Lightning checkpoint"),
    ("incompatible_checkpoint_on_resume",
     lambda c: ["--model.init_args.r", "8", "--ckpt_path", _trained_checkpoint(c)], "checkpoint does not match"),
    ("remote_code_not_trusted", lambda c: ["--model.init_args.backbone", _remote_code_backbone(c)],
     "trust_remote_code"),
    # silent corruption before issue #30: each of these trained without a word
    ("null_response", lambda c: _generation_config(c, {"prompt": "Review 5:", "response": None}),
     "row 5 of train: column 'response' of data.response_template is null"),
    ("empty_response", lambda c: _generation_config(c, {"prompt": "Review 5:", "response": ""}),
     "row 5 of train: the response (data.response_template) is empty"),
    ("label_with_trailing_space", lambda c: ["--data.source", _labels_file(c, ["fresh", "rotten", "Neutral "])],
     "label 'Neutral ' in column 'label' has surrounding whitespace"),
    ("labels_differ_only_by_case", lambda c: ["--data.source", _labels_file(c, ["fresh", "rotten", "Fresh"])],
     "labels 'Fresh' and 'fresh' in column 'label' differ only by case"),
    ("malformed_jsonl_line",
     lambda c: ["--data.source", _file(c["tmp"], "bad.jsonl", b'{"text": "a", "label": "fresh"}\n' * 2
                                       + b'{"text": "b", "label": rotten}\n' + b'{"text": "c", "label": "rotten"}\n' * 9)],
     "line 3 of"),
    ("chat_unknown_role", lambda c: _chat_config(c, [_USER, {"role": "bot", "content": "Rotten."}]),
     "row 5 of train: unknown role 'bot'"),
    ("chat_no_assistant_turn", lambda c: _chat_config(c, [_USER]), "row 5 of train: the conversation has no assistant"),
    ("chat_ends_on_user_turn",
     lambda c: _chat_config(c, [_USER, {"role": "assistant", "content": "Rotten."}, _USER]),
     "row 5 of train: the conversation ends on a user turn"),
    ("chat_null_content", lambda c: _chat_config(c, [_USER, {"role": "assistant", "content": None}]),
     "row 5 of train: the assistant turn has content null"),
    ("chat_empty_reply", lambda c: _chat_config(c, [_USER, {"role": "assistant", "content": " "}]),
     "row 5 of train: an assistant turn is empty"),
    ("chat_template_missing", lambda c: _chat_config(c, [_USER, {"role": "assistant", "content": "Rotten."}],
                                                     backbone=c["llama"]),
     "has no chat template; set data.chat_template"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_clear_message(tmp_path, tiny_bert, sentiment_csv, capsys, case, request):
    _, argv, message = case
    ctx = {"tmp": tmp_path, "bert": tiny_bert, "csv": sentiment_csv, "capsys": capsys}
    if case[0].startswith(("null_", "empty_", "chat_")):  # generation and chat cases run on the tiny Llamas
        ctx.update(chat_llama=request.getfixturevalue("tiny_chat_llama"), llama=request.getfixturevalue("tiny_llama"))
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv)
    extra = argv(ctx)
    capsys.readouterr()
    code, out, err = run_main(["fit", "--config", cfg, *extra], capsys)
    assert code != 0
    assert message in err, err
    assert "Traceback" not in err and "Traceback" not in out
    # one message on one line (progress bars of the data preparation that ran before may precede it)
    lines = [line for line in err.splitlines() if line.strip() and "examples/s" not in line and "Seed set" not in line]
    assert len(lines) == 1 and lines[0].startswith("peftlab: error: "), err


def test_adapter_from_another_backbone_is_refused_by_merge(tmp_path, tiny_bert, tiny_llama, sentiment_csv, capsys):
    adapter = _adapter_of_other_backbone({"tmp": tmp_path, "bert": tiny_bert, "csv": sentiment_csv, "capsys": capsys})
    code, _, err = run_main(["merge", adapter, "--output", str(tmp_path / "m"), "--backbone", tiny_llama], capsys)
    assert code != 0 and "Traceback" not in err
    assert "the adapter was trained on" in err and "does not fit backbone" in err, err
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- safe loading
def _exported(tmp_path, tiny_llama, generation_jsonl, method="LoRA", **kw):
    import peftlab.methods as methods
    from conftest import trained
    from peftlab.export import export_adapter

    model, _ = trained(getattr(methods, method), tiny_llama, "causal_lm", generation_jsonl, steps=1, **kw)
    return export_adapter(model, tmp_path / "adapter")


def test_adapter_config_with_unknown_fields_is_rejected(tmp_path, tiny_llama, generation_jsonl):
    from peftlab.api import load_run

    directory = _exported(tmp_path, tiny_llama, generation_jsonl, r=4, target_modules=["q_proj"])
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "execute_this": "rm -rf /"}))
    with pytest.raises(PeftLabError, match=r"fields peft does not know: \['execute_this'\]"):
        load_run(str(directory))


def test_adapter_tensor_with_wrong_shape_is_rejected(tmp_path, tiny_llama, generation_jsonl):
    from peftlab.api import load_run

    directory = _exported(tmp_path, tiny_llama, generation_jsonl, r=4, target_modules=["q_proj"])
    weights = load_file(str(directory / "adapter_model.safetensors"))
    name = next(k for k in weights if "lora_A" in k)
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    save_file(weights, str(directory / "adapter_model.safetensors"))
    with pytest.raises(PeftLabError, match=r"does not fit this LoRA model \(wrong shape \[.*lora_A"):
        load_run(str(directory))


def test_peftlab_meta_is_validated(tmp_path, tiny_llama, generation_jsonl):
    from peftlab.api import load_run

    directory = _exported(tmp_path, tiny_llama, generation_jsonl, method="PromptTuning", num_virtual_tokens=2)
    meta_path = directory / "peftlab_meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "init_args": {**meta["init_args"], "unknown_knob": 1}}))
    with pytest.raises(PeftLabError, match="peftlab_meta.json does not fit PromptTuning.*unknown_knob"):
        load_run(str(directory))
    meta_path.write_text(json.dumps({**meta, "method": "subprocess.Popen"}))
    with pytest.raises(PeftLabError, match="is not a PeftModule subclass"):
        load_run(str(directory))


def test_checkpoint_with_python_objects_is_never_unpickled(tmp_path, tiny_bert, sentiment_csv, capsys):
    class Payload:  # unpickling this would run code; weights-only loading must refuse it
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, evil)
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv)
    code, _, err = run_main(["fit", "--config", cfg, "--ckpt_path", str(evil)], capsys)
    assert code == 2 and "never unpickles arbitrary objects" in err
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------- atomic saves
def _checkpoint_config(tmp_path, tiny_bert, sentiment_csv, max_steps=6, every=2, model=None, **kw):
    # last.ckpt every `every` steps (peftlab's LastCheckpoint), no best-k checkpoints
    return write_config(tmp_path, tiny_bert, sentiment_csv, callbacks=[], model={"dropout": 0.1, **(model or {})},
                        trainer={"max_steps": max_steps, "limit_val_batches": 1, "val_check_interval": 1.0},
                        extra={"last_checkpoint": {"every_n_train_steps": every}}, **kw)


def test_crash_during_checkpoint_save_keeps_previous_one(tmp_path, tiny_bert, sentiment_csv, capsys, monkeypatch):
    cfg = _checkpoint_config(tmp_path, tiny_bert, sentiment_csv, max_steps=2)
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    good = last.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "state_dict" in obj:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")  # errno.ENOSPC
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_half_way)
    code, _, err = run_main(["fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", "4",
                             "--test_after_fit", "false"], capsys)
    assert code == 2 and "no space left on the device while writing" in err and "previous checkpoints" in err
    assert last.read_bytes() == good  # untouched, and no temporary files left beside it
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_atomic_checkpoint_io_is_installed_by_the_cli_and_reads_weights_only(tmp_path, tiny_bert, sentiment_csv):
    from lightning.pytorch.callbacks import Callback

    from peftlab.checkpointing import AtomicCheckpointIO
    from peftlab.cli import run_cli

    seen = []

    class See(Callback):
        def on_fit_start(self, trainer, pl_module):
            seen.append(type(trainer.strategy.checkpoint_io))

    cfg = _checkpoint_config(tmp_path, tiny_bert, sentiment_csv, max_steps=1)
    run_cli(["fit", "--config", cfg, "--test_after_fit", "false"], callbacks=[See()])
    assert seen == [AtomicCheckpointIO]


# ---------------------------------------------------------------------------------------------- faults
class LossBecomesNaN:
    """Mixed into LoRA by the test below: the loss is NaN from the third step on."""


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = _checkpoint_config(tmp_path, tiny_bert, sentiment_csv, max_steps=8, every=1,
                             method="test_reliability.NaNAfterTwoSteps")
    code, _, err = run_main(["fit", "--config", cfg], capsys)
    assert code == 2 and "the training loss is nan at step 2" in err and "last checkpoint is good" in err
    last = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_out_of_memory_gives_advice(tmp_path, tiny_bert, sentiment_csv, capsys):
    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, method="test_reliability.OutOfMemoryAtStart")
    code, _, err = run_main(["fit", "--config", cfg], capsys)
    assert code == 2 and "Traceback" not in err
    for advice in ("out of memory", "data.batch_size", "gradient_checkpointing", "QLoRA", "estimate-memory"):
        assert advice in err


from peftlab.methods import LoRA  # noqa: E402 - the two test methods above are LoRA subclasses


class NaNAfterTwoSteps(LoRA):
    def forward(self, **batch):
        out = super().forward(**batch)
        if self.training and self.global_step >= 2:
            out.loss = out.loss * float("nan")
        return out


class OutOfMemoryAtStart(LoRA):
    def forward(self, **batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_weights_and_the_run_is_recorded(tmp_path, tiny_bert, sentiment_csv, capsys):
    weights = []
    for name in ("a", "b"):
        cfg = write_config(tmp_path, tiny_bert, sentiment_csv, model={"dropout": 0.1}, runs=f"runs_{name}",
                           trainer={"max_steps": 6}, name=f"{name}.yaml")
        assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
        run_dir = next((tmp_path / f"runs_{name}").glob("r/version_*"))
        weights.append(load_file(str(run_dir / "adapter/last/adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    record = json.loads((run_dir / "run.json").read_text())
    assert record["seed"] == 7 and record["method"] == "peftlab.methods.lora.LoRA"
    assert {"torch", "lightning", "transformers", "peft", "peftlab", "python"} <= set(record["versions"])
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"] == torch.__version__
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed_everything"] == 7
    meta = json.loads((run_dir / "adapter/last/peftlab_meta.json").read_text())
    assert meta["run"]["versions"] == record["versions"]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama, generation_jsonl):
    from conftest import make_data
    from peftlab.methods import FullFineTuning

    data = make_data(generation_jsonl, "causal_lm", tiny_llama)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LoRA(backbone=tiny_llama, task="causal_lm", r=4, target_modules=["q_proj", "v_proj"],
                     gradient_checkpointing=checkpointing).build()
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert model.model.get_base_model().is_gradient_checkpointing is checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])
    assert FullFineTuning(backbone=tiny_llama, task="causal_lm", gradient_checkpointing=True).build().model.is_gradient_checkpointing


def test_resumable_loader_replays_the_epoch_and_eval_loaders_leave_the_rng_alone(tiny_bert, sentiment_csv):
    from torch.utils.data import RandomSampler

    from conftest import make_data
    from peftlab.data.loading import EpochShuffleSampler, ResumableLoader

    rows = list(range(50))
    torch.manual_seed(3)
    assert list(EpochShuffleSampler(rows)) == (torch.manual_seed(3) and list(RandomSampler(rows)))

    loader = ResumableLoader(rows, sampler=EpochShuffleSampler(rows), batch_size=8)
    torch.manual_seed(1)
    epoch = [b.tolist() for b in loader]
    torch.manual_seed(1)
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(3)]
    state = loader.state_dict()
    after = torch.rand(3)
    assert state["position"] == 3
    fresh = ResumableLoader(rows, sampler=EpochShuffleSampler(rows), batch_size=8)
    fresh.load_state_dict(state)
    torch.manual_seed(99)  # whatever happened since, the RNG comes back with the remaining batches
    rest = [b.tolist() for b in fresh][:1]
    assert torch.equal(torch.rand(3), after)
    assert seen + rest == epoch[:4]

    data = make_data(sentiment_csv, "classification", tiny_bert)
    data.setup()
    before = torch.get_rng_state()
    for loader in (data.val_dataloader(), data.test_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)
