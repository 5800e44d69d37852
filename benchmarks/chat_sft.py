"""Chat SFT: peftlab fit against TRL's SFTTrainer on the same model, conversations, LoRA, batch and steps (#30 item 8).

    python benchmarks/chat_sft.py            # batch 4, 1 + 6 steps, 2 repeats (about 30 min on a loaded 2-core CPU)
    python benchmarks/chat_sft.py --batch_size 2 --steps 3 --repeats 2   # what docs/benchmarks.md records (~10 min)
    python benchmarks/chat_sft.py --smoke    # two steps each (CI: tests/integration/test_benchmarks.py, skipped without trl)

LoRA (r 8, alpha 16, dropout 0, all-linear, lr 3e-4, linear decay, no warm-up) on packaged:SmolLM2-135M-Instruct,
trained on packaged:rotten_tomatoes_chat with the loss on the assistant turns only, three ways in ONE process,
repeats interleaved:

* ``peftlab_packed``: the real fit path (``lightning.Trainer`` + ``peftlab.methods.LoRA`` + ``PeftDataModule`` with
  ``task: chat``, ``packing: true``: padding-free rows with ``position_ids``);
* ``trl_packed``: ``trl.SFTTrainer`` with ``packing=True`` (its padding-free best-fit-decreasing packing) and
  ``assistant_only_loss=True``;
* ``trl_default``: ``trl.SFTTrainer`` with its defaults (padded batches, its gradient-checkpointing default) except
  what must match: batch size, steps, learning rate and schedule, ``max_length``, ``assistant_only_loss=True``.

Both libraries get the very same conversations (peftlab's training split, read through ``PeftDataModule.raw``) and
the same chat template. TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers, which SmolLM2's template
lacks, so TRL's runs get a copy of that template with the assistant reply and its ``<|im_end|>`` wrapped in
markers (:data:`TRL_TEMPLATE`); the benchmark checks that TRL then tokenizes every conversation to exactly
peftlab's tokens and targets. The same LoRA initialisation goes to every run (one seed).

Measured: target (assistant) tokens per second in the steady state (after ``warmup`` steps, data loading
included), and the loss per target token on the same unpacked validation conversations after the same steps.
Writes ``benchmarks/chat_sft.json`` (``_smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import SEED, log, machine, quiet, ratio_summary, summary  # noqa: E402

HERE = Path(__file__).resolve().parent
BACKBONE = "packaged:SmolLM2-135M-Instruct"
LORA = dict(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
LR = 3e-4
# SmolLM2-135M-Instruct's template (chat_template.jinja) with TRL's generation markers around what peftlab trains:
# the assistant reply and its end-of-turn marker, not the newline after it
TRL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def check_trl() -> str:
    """trl's version; one line naming the extra when it is absent (it is a benchmark-only dependency)."""
    try:
        import trl
    except ImportError as e:
        raise SystemExit("benchmarks/chat_sft.py needs trl: pip install -e '.[bench]'") from e
    return trl.__version__


def _targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def datamodule(max_length: int, batch_size: int, n_train: int, n_eval: int, packing: bool):
    from peftlab.data import PeftDataModule

    dm = PeftDataModule(tokenizer=BACKBONE, source="packaged:rotten_tomatoes_chat", task="chat",
                        group_column="movie", train_on="assistant", max_length=max_length, batch_size=batch_size,
                        max_train_samples=n_train, max_eval_samples=n_eval, split_seed=SEED, packing=packing)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _window(ends: list[float], targets: list[int], warmup: int) -> dict:
    seconds = ends[-1] - ends[warmup - 1]
    tokens = sum(targets[warmup:len(ends)])
    return {"steps": len(ends) - warmup, "seconds": seconds, "target_tokens": tokens,
            "target_tokens_per_s": tokens / seconds, "step_ms": 1000 * seconds / (len(ends) - warmup)}


def run_peftlab(dm, warmup: int, steps: int) -> tuple[dict, object]:
    """`peftlab fit` in-process: Lightning Trainer + peftlab's LoRA module + the packed chat PeftDataModule."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    from peftlab.methods import LoRA

    ends, targets = [], []

    class Clock(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ends.append(time.perf_counter())
            targets.append(_targets(batch["labels"]))

    torch.manual_seed(SEED)
    module = LoRA(backbone=BACKBONE, task="causal_lm", learning_rate=LR, **LORA).build()
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, contextlib.redirect_stderr(null), \
            contextlib.redirect_stdout(null):
        trainer = L.Trainer(max_steps=warmup + steps, max_epochs=1, accelerator="cpu", devices=1,
                            precision="32-true", logger=CSVLogger(tmp, name="bench"), log_every_n_steps=20,
                            limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=[Clock()])
        trainer.fit(module, datamodule=dm)
    return _window(ends, targets, warmup), module.model


def trl_dataset(dm):
    import datasets

    from peftlab.data import chat

    train = dm.raw["train"]
    fmt = chat.detect_format(train.column_names)
    return datasets.Dataset.from_dict({"messages": [chat.to_messages(row, fmt) for row in train]})


def trl_trainer(dm, warmup: int, steps: int, packed: bool, max_length: int):
    """(trl.SFTTrainer on a transformers + peft LoRA of the same backbone, LoRA config and initialisation seed,
    step end times, target tokens per step); the conversations are tokenized here, before any timing."""
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from benchmarks.throughput import reference_model
    from peftlab.assets import resolve_model

    ends, targets = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    class Counted(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            targets.append(_targets(inputs["labels"]))
            return super().training_step(model, inputs, *args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(BACKBONE))
    tokenizer.chat_template = TRL_TEMPLATE
    torch.manual_seed(SEED)
    model = reference_model({"backbone": BACKBONE, "task": "causal_lm"},
                            LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                       lora_dropout=LORA["dropout"], target_modules=LORA["target_modules"]))
    # packed: TRL's padding-free packing, no checkpointing (as peftlab); default: TRL's own defaults (padded
    # batches, gradient checkpointing on) but fp32 like peftlab (its bf16 default is a GPU setting)
    extra = dict(packing=True, padding_free=True, gradient_checkpointing=False) if packed else {}
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="chat_sft_"), max_steps=warmup + steps,
                     per_device_train_batch_size=dm.batch_size, learning_rate=LR, lr_scheduler_type="linear",
                     warmup_steps=0, weight_decay=0.0, optim="adamw_torch", max_grad_norm=0.0,
                     max_length=max_length, assistant_only_loss=True, logging_strategy="no", save_strategy="no",
                     eval_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=SEED,
                     data_seed=SEED, dataloader_num_workers=0, **extra)
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null):
        trainer = Counted(model=model, args=args, train_dataset=trl_dataset(dm), processing_class=tokenizer,
                          callbacks=[Clock()])
    return trainer, ends, targets


def run_trl(dm, warmup: int, steps: int, packed: bool, max_length: int) -> tuple[dict, object]:
    trainer, ends, targets = trl_trainer(dm, warmup, steps, packed, max_length)
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null):
        trainer.train()
    return _window(ends, targets, warmup), trainer.model


def same_tokens(dm, trainer, max_length: int) -> dict:
    """TRL's tokenization of the conversations against peftlab's: identical ids and assistant targets? Compared
    on the conversations that fit ``max_length``: longer ones peftlab shortens by dropping the oldest turns, TRL
    by cutting the end (counted as ``too_long``)."""
    ours, theirs = dm.datasets["train"], trainer.train_dataset
    tok = trainer.processing_class
    rendered = [len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
                for m in trl_dataset(dm)["messages"]]
    fits = [n <= max_length for n in rendered]
    pairs = [(a, b, la, lb) for a, b, la, lb, f in zip(ours["input_ids"], theirs["input_ids"], ours["labels"],
                                                       theirs["labels"], fits) if f]
    return {"compared": len(pairs), "too_long": fits.count(False),
            "same_input_ids": sum(list(a) == list(b) for a, b, _, _ in pairs),
            "same_targets": sum(list(la) == list(lb) for _, _, la, lb in pairs),
            "target_tokens": sum(sum(t != -100 for t in la) for _, _, la, _ in pairs)}


def validation_loss(model, dm) -> float:
    """Summed NLL over all target tokens of the (unpacked) validation conversations / their number."""
    from peftlab.methods.base import token_nll

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            nll, n = token_nll(model(**inputs, use_cache=False).logits, batch["labels"], "causal_lm")
            total, count = total + float(nll), count + int(n)
    return total / count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (as benchmarks/run.py)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    trl_version = check_trl()
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (2 if args.smoke else 6)
    warmup = args.warmup or 1
    repeats = args.repeats or (1 if args.smoke else 2)
    n_train = (warmup + steps) * args.batch_size * 4  # enough rows that no run reaches the end of an epoch
    n_eval = 8 if args.smoke else 32
    log("chat_sft: building data (padded and packed)")
    padded = datamodule(args.max_length, args.batch_size, n_train, n_eval, packing=False)
    packed = datamodule(args.max_length, args.batch_size, n_train, n_eval, packing=True)
    variants = {
        "peftlab_packed": lambda: run_peftlab(packed, warmup, steps),
        "trl_packed": lambda: run_trl(padded, warmup, steps, True, args.max_length),
        "trl_default": lambda: run_trl(padded, warmup, steps, False, args.max_length),
    }
    tokens_check = same_tokens(padded, trl_trainer(padded, 0, 1, False, args.max_length)[0], args.max_length)
    log(f"  TRL's tokenization against peftlab's: {tokens_check}")
    runs = {name: [] for name in variants}
    for i in range(repeats):
        for name, fn in variants.items():
            result, model = fn()
            result["val_loss_per_target_token"] = validation_loss(model, padded)
            runs[name].append(result)
            log(f"  repeat {i + 1}/{repeats} {name}: {result['target_tokens_per_s']:.1f} target tokens/s, "
                f"{result['step_ms']:.0f} ms/step, validation loss {result['val_loss_per_target_token']:.4f}")
            del model
    speed = {n: [r["target_tokens_per_s"] for r in rs] for n, rs in runs.items()}
    loss = {n: [r["val_loss_per_target_token"] for r in rs] for n, rs in runs.items()}
    base = validation_loss(_untrained(), padded)
    result = {
        "setting": {"backbone": BACKBONE, "data": "packaged:rotten_tomatoes_chat (task chat, train_on assistant)",
                    "lora": {**LORA, "lr": LR, "scheduler": "linear, no warm-up"}, "batch_size": args.batch_size,
                    "max_length": args.max_length, "warmup": warmup, "steps": steps, "repeats": repeats,
                    "train_conversations": len(padded.datasets["train"]), "val_conversations": n_eval,
                    "threads": torch.get_num_threads(), "device": "cpu",
                    "trl_template": "SmolLM2's template with {% generation %} markers (TRL_TEMPLATE)"},
        "tokenization": tokens_check,
        "target_tokens_per_s": {n: summary(v) for n, v in speed.items()},
        "ratios": {"peftlab_packed/trl_packed": ratio_summary(speed["peftlab_packed"], speed["trl_packed"]),
                   "peftlab_packed/trl_default": ratio_summary(speed["peftlab_packed"], speed["trl_default"])},
        "target_tokens_per_step": {n: summary([r["target_tokens"] / r["steps"] for r in rs]) for n, rs in runs.items()},
        "val_loss_per_target_token": {n: summary(v) for n, v in loss.items()},
        "val_loss_untrained": base,
        "loss_difference_peftlab_vs_trl_packed": summary([a - b for a, b in zip(loss["peftlab_packed"],
                                                                                loss["trl_packed"])]),
        "machine": machine(), "trl": trl_version,
        "command": "python benchmarks/chat_sft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(args.out) if args.out else HERE / f"chat_sft{'_smoke' if args.smoke else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out}")
    return result


def _untrained():
    from peftlab.methods import LoRA

    torch.manual_seed(SEED)
    return LoRA(backbone=BACKBONE, task="causal_lm", learning_rate=LR, **LORA).build().model


if __name__ == "__main__":
    main()
