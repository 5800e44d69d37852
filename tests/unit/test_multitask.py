"""Several adapters trained in one run (MultiTask + data.tasks): gradient isolation, equality with runs of one
task each, per-task metrics and exports, one-line refusals, and the CLI end to end."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from conftest import rotten_rows, run_main, tiny_trainer, write_jsonl
from peftlab.api import load_adapters, load_run
from peftlab.data import PeftDataModule
from peftlab.data.multitask import batch_shares
from peftlab.errors import PeftLabError
from peftlab.methods import LoRA, PromptTuning
from peftlab.multitask import MultiTask

LORA_A = {"class_path": "peftlab.methods.LoRA", "init_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
LORA_B = {"class_path": "peftlab.methods.LoRA", "init_args": {"r": 2, "target_modules": ["q_proj"],
                                                              "learning_rate": 2e-2}}


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two generative tasks on the same reviews: the verdict, and the review's first word."""
    root = tmp_path_factory.mktemp("mt")
    rows = rotten_rows(60)
    a = write_jsonl(root / "verdict.jsonl", [{"prompt": f"Review: {r['text']}\nVerdict:", "response": " " + r["label"]}
                                             for r in rows])
    b = write_jsonl(root / "first.jsonl", [{"prompt": f"Text: {r['text']}\nFirst word:",
                                            "response": " " + r["text"].split()[0]} for r in rows])
    return a, b


def data(tiny_llama, sources, **kw):
    a, b = sources
    kw = {"batch_size": 8, "max_length": 48, "shuffle": False, "max_eval_samples": 8, **kw}
    return PeftDataModule(task="causal_lm", tokenizer=tiny_llama, tasks={"a": {"source": a}, "b": {"source": b}},
                          task_weights={"a": 3, "b": 1}, **kw)


def multitask(tiny_llama, a=LORA_A, b=LORA_B):
    return MultiTask(backbone=tiny_llama, task="causal_lm", learning_rate=5e-2, tasks={"a": a, "b": b})


def test_batch_shares_split_the_batch_by_weight():
    assert batch_shares(8, {"a": 3.0, "b": 1.0}) == {"a": 6, "b": 2}
    assert batch_shares(4, {"a": 1.0, "b": 1.0, "c": 1.0}) == {"a": 2, "b": 1, "c": 1}
    assert batch_shares(3, {"a": 100.0, "b": 1.0, "c": 1.0}) == {"a": 1, "b": 1, "c": 1}
    assert sum(batch_shares(10, {"a": 1.0, "b": 2.0, "c": 4.0}).values()) == 10
    with pytest.raises(PeftLabError, match="smaller than the number of tasks"):
        batch_shares(1, {"a": 1.0, "b": 1.0})


def test_the_cycle_loader_restarts_a_shorter_loader_with_a_fresh_shuffle():
    from torch.utils.data.distributed import DistributedSampler

    from peftlab.data.loading import CycleLoader, EpochShuffleSampler, ResumableLoader

    torch.manual_seed(0)
    short, long = range(4), range(100, 106)
    loader = CycleLoader({"s": ResumableLoader(short, sampler=EpochShuffleSampler(short), batch_size=2),
                          "l": ResumableLoader(long, sampler=EpochShuffleSampler(long), batch_size=2)})
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # the longer loader's epoch
    rows = [sorted(b["s"].tolist()) for b in batches]
    assert sorted(rows[0] + rows[1]) == [0, 1, 2, 3] and set(rows[2]) <= {0, 1, 2, 3}  # then a new cycle
    assert sorted(x for b in batches for x in b["l"].tolist()) == list(long)
    with pytest.raises(PeftLabError, match="the checkpoint's training data has the tasks \\['x'\\], this run \\['l', 's'\\]"):
        loader.load_state_dict({"position": 1, "rng": None, "loaders": {"x": {}}})  # a task renamed since
    ddp = DistributedSampler(short, num_replicas=1, rank=0)
    CycleLoader({"s": ResumableLoader(short, sampler=ddp)}).sampler.set_epoch(3)  # Lightning calls this per epoch
    assert ddp.epoch == 3


def test_one_backbone_and_every_batch_holds_every_task(tiny_llama, two_sources):
    model = multitask(tiny_llama).build()
    a, b = model.task_methods["a"], model.task_methods["b"]
    backbone = {id(p) for p in model.model.parameters()}
    for method in (a, b):  # every frozen weight is the shared backbone's own tensor
        assert {id(p) for p in method.parameters() if not p.requires_grad} <= backbone
    assert model.total_count == sum(p.numel() for p in model.model.parameters()) + a.trainable_count + b.trainable_count
    assert model.trainable_count == a.trainable_count + b.trainable_count
    dm = data(tiny_llama, two_sources)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"a", "b"} and len(batch["a"]["input_ids"]) == 6 and len(batch["b"]["input_ids"]) == 2


def test_a_rows_gradient_reaches_only_its_own_adapter(tiny_llama, two_sources):
    model = multitask(tiny_llama, b={"class_path": "peftlab.methods.PromptTuning",
                                     "init_args": {"num_virtual_tokens": 3}}).build()
    model.trainer = tiny_trainer()
    dm = data(tiny_llama, two_sources)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for method in model.task_methods.values():
        method._token_scale = 1.0
    model.training_step({"a": batch["a"]}, 0).backward()
    a, b = model.task_methods["a"], model.task_methods["b"]
    own = [p.grad for p in a.parameters() if p.requires_grad]
    assert all(g is not None for g in own) and any(g.any() for g in own)  # B's (A's is 0 while B starts at 0)
    assert all(p.grad is None or not p.grad.any() for p in b.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.model.parameters())


def test_an_epoch_bounded_multitask_fit_runs(tiny_llama, two_sources):
    """max_epochs (the shipped config's bound): the schedule's length is the longest task's epoch; a CombinedLoader
    has no length before it is iterated."""
    model = multitask(tiny_llama)
    L.seed_everything(0)
    trainer = tiny_trainer(max_steps=-1, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=data(tiny_llama, two_sources))
    assert trainer.global_step == model.total_optimizer_steps() == 24  # b: 48 training rows at 2 per batch


def test_a_task_training_backbone_biases_leaves_the_shared_ones_frozen(tiny_bert):
    """LoRA's bias: all makes peft set the backbone's biases trainable; the task gets its own copies and the
    shared backbone (every other task's) stays frozen."""
    from peftlab.adapter_set import build_on_shared
    from peftlab.backbones import load_backbone, load_tokenizer

    backbone = load_backbone(tiny_bert, "classification", num_labels=2).requires_grad_(False)
    method = build_on_shared(LoRA(backbone=tiny_bert, num_labels=2, r=2, bias="all"), backbone,
                             load_tokenizer(tiny_bert))
    assert not any(p.requires_grad for p in backbone.parameters())
    shared = {id(p) for p in backbone.parameters()}
    biases = [n for n, p in method.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert biases and all(id(p) not in shared for p in method.parameters() if p.requires_grad)


def fit(module, datamodule, steps=4):
    L.seed_everything(3)
    tiny_trainer(max_steps=steps, limit_val_batches=0).fit(module, datamodule=datamodule)
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_k_adapters_trained_together_equal_k_runs_of_one_task(tiny_llama, two_sources):
    joint = fit(multitask(tiny_llama), data(tiny_llama, two_sources))
    a_src, b_src = two_sources
    common = {"task": "causal_lm", "tokenizer": tiny_llama, "max_length": 48, "shuffle": False, "max_eval_samples": 8}
    alone_a = fit(LoRA(backbone=tiny_llama, task="causal_lm", **{"learning_rate": 5e-2, **LORA_A["init_args"]}),
                  PeftDataModule(source=a_src, batch_size=6, **common))
    alone_b = fit(LoRA(backbone=tiny_llama, task="causal_lm", **{"learning_rate": 5e-2, **LORA_B["init_args"]}),
                  PeftDataModule(source=b_src, batch_size=2, **common))
    for prefix, alone in (("task_methods.a.", alone_a), ("task_methods.b.", alone_b)):
        for name, value in alone.items():
            torch.testing.assert_close(joint[prefix + name], value, atol=1e-5, rtol=0)
    start = LoRA(backbone=tiny_llama, task="causal_lm", **LORA_A["init_args"]).build()
    moved = {n for n, p in start.named_parameters() if p.requires_grad and ".lora_B." in n}
    assert moved and all(joint["task_methods.a." + n].abs().sum() > 0 for n in moved)  # it trained


def test_refusals_are_one_line(tiny_llama, two_sources):
    cases = [
        (lambda: multitask(tiny_llama, b={"class_path": "peftlab.methods.FullFineTuning"}), "cannot be a task"),
        (lambda: multitask(tiny_llama, b={"class_path": "peftlab.methods.AdaLoRA"}), "rank allocator"),
        (lambda: multitask(tiny_llama, b={"class_path": "peftlab.methods.LoRA", "init_args": {"optimizer": "adamw_8bit"}}),
         "shares with the run"),
        (lambda: MultiTask(backbone=tiny_llama, tasks={"a": LORA_A}), "generative tasks"),
        (lambda: PeftDataModule(task="causal_lm", tokenizer=tiny_llama, tasks={"a": {"source": two_sources[0], "bach_size": 2}}),
         "not a data setting"),
        (lambda: PeftDataModule(task="causal_lm", tokenizer=tiny_llama, tasks={"a": {"source": two_sources[0]}},
                                task_weights={"b": 1}), "which data.tasks does not have"),
        (lambda: PeftDataModule(task="causal_lm", tokenizer=tiny_llama,
                                tasks={"a": {"source": two_sources[0], "task": "classification"}}), "share one backbone"),
    ]
    for make, words in cases:
        with pytest.raises(PeftLabError, match=words) as info:
            make()
        assert "\n" not in str(info.value)
    model = multitask(tiny_llama)
    with pytest.raises(PeftLabError, match="same tasks"):
        model.check_data(PeftDataModule(task="causal_lm", tokenizer=tiny_llama,
                                        tasks={"b": {"source": two_sources[1]}, "a": {"source": two_sources[0]}}))
    with pytest.raises(PeftLabError, match="needs one data source per task"):
        model.check_data(PeftDataModule(task="causal_lm", tokenizer=tiny_llama, source=two_sources[0]))


def write_multitask_config(tmp_path, tiny_llama, sources, steps=4, extra_trainer=None, scheduler="linear",
                           rows=(None, None)):
    import yaml

    a, b = sources
    cfg = {
        "seed_everything": 7,
        "trainer": {"max_steps": steps, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0, "limit_val_batches": 2, "limit_test_batches": 2,
                    "val_check_interval": 2, "log_every_n_steps": 1, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "mt"}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"monitor": "val/loss", "mode": "min", "save_top_k": 1}}],
                    **(extra_trainer or {})},
        "model": {"class_path": "peftlab.multitask.MultiTask",
                  "init_args": {"backbone": tiny_llama, "learning_rate": 5e-2, "scheduler": scheduler,
                                "tasks": {"a": LORA_A, "b": {"class_path": "peftlab.methods.PromptTuning",
                                                             "init_args": {"num_virtual_tokens": 3}}}}},
        "data": {"task": "causal_lm", "batch_size": 4, "max_length": 48, "max_eval_samples": 4,
                 "tasks": {"a": {"source": a, "max_train_samples": rows[0]},
                           "b": {"source": b, "max_length": 40, "max_train_samples": rows[1]}},
                 "task_weights": {"a": 1, "b": 1}},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_cli_fits_tests_and_exports_every_task(tmp_path, tiny_llama, two_sources, capsys):
    config = write_multitask_config(tmp_path, tiny_llama, two_sources)
    code, out, err = run_main(["fit", "--config", config], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "mt" / "version_0"
    metrics = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/a/loss", "train/b/loss", "val/loss", "val/a/loss", "val/b/exact_match",
                "test/a/loss", "test/b/loss"):
        assert key in metrics, key
    for name, method in (("a", LoRA), ("b", PromptTuning)):  # each task's export loads alone
        alone = load_run(str(run / "adapter" / "best" / name))
        assert type(alone.module) is method
        assert json.loads((run / "adapter" / "best" / name / "peftlab_meta.json").read_text())["prompt_format"]
    with pytest.raises(PeftLabError, match="multi-task run"):
        load_run(str(run))
    together = load_adapters(str(run))
    assert together.names == ["a", "b"]
    texts = ["Review: a dull film\nVerdict:"]
    assert together.predict(texts, adapter="a", max_new_tokens=2) == load_run(
        str(run / "adapter" / "best" / "a")).predict(texts, max_new_tokens=2)


# (rows of a, rows of b; checkpoint step; total steps) at 2 rows per task and batch: mid-epoch for both; on the
# step where b (2 batches) starts its second cycle while a is mid-epoch; at the end of an epoch (3 batches, b's) with
# a (2 batches) one batch into its second cycle, which the next epoch must drop
RESUMES = {"mid-epoch": ((None, None), 2, 4, 2), "shorter task's cycle end": ((None, 4), 2, 5, 2),
           "epoch end inside a shorter task's cycle": ((4, 6), 3, 5, 3),
           "stopped by max_steps at an epoch end": ((4, 6), 3, 5, 2)}


@pytest.mark.parametrize("rows,stop,steps,every", RESUMES.values(), ids=RESUMES.keys())
def test_cli_resumes_a_killed_multitask_run_exactly(tmp_path, tiny_llama, two_sources, capsys, rows, stop, steps,
                                                    every):
    # a constant rate: the interrupted run's first part is a shorter run, whose linear schedule would differ
    full = write_multitask_config(tmp_path / "full", tiny_llama, two_sources, steps=steps, scheduler="constant",
                                  rows=rows, extra_trainer={"val_check_interval": every})
    assert run_main(["fit", "--config", full, "--test_after_fit", "false"], capsys)[0] == 0
    part = write_multitask_config(tmp_path / "part", tiny_llama, two_sources, steps=stop, scheduler="constant",
                                  rows=rows, extra_trainer={"val_check_interval": every})
    assert run_main(["fit", "--config", part, "--test_after_fit", "false"], capsys)[0] == 0
    last = tmp_path / "part" / "runs" / "mt" / "version_0" / "checkpoints" / "last.ckpt"
    code, _, err = run_main(["fit", "--config", part, "--trainer.max_steps", str(steps), "--test_after_fit", "false",
                             "--ckpt_path", str(last)], capsys)
    assert code == 0, err

    def final(root):
        return load_adapters(str(root / "runs" / "mt" / sorted(p.name for p in (root / "runs" / "mt").iterdir())[-1]
                                 / "adapter" / "last"))

    a, b = final(tmp_path / "full"), final(tmp_path / "part")
    for name in ("a", "b"):
        ours = {n: p for n, p in a.runs[name].module.named_parameters() if p.requires_grad}
        theirs = {n: p for n, p in b.runs[name].module.named_parameters() if p.requires_grad}
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
