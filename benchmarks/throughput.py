"""Training throughput (item 1) and step-time breakdown (item 2).

peftlab fit (a ``lightning.Trainer`` driving a peftlab method module and ``PeftDataModule``, set up like
``peftlab fit`` does: 32-true precision, CSV logger every 20 steps, progress bar on) against

* ``hand``: a minimal PyTorch loop over a transformers model wrapped by ``peft.get_peft_model``:
  ``loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()`` with ``torch.optim.AdamW``;
* ``hf_trainer``: ``transformers.Trainer`` (+ peft), logging and saving off, ``report_to=[]``, ``use_cpu=True``.

Every variant reads the *same* batches: the training loader of one ``PeftDataModule`` with its shuffle seed
pinned (``EpochShuffleSampler.replay``), so the ratios compare the loops and not the data. Each run trains
``warmup + steps + 1`` steps; the steady-state window is the last ``steps`` steps (end of step ``warmup``
to end of the last step, data loading included). One short discarded round of every variant comes first
(the first training run in a process is several times slower, whichever loop it is). Repeats are interleaved (A B C A B C ...) and the median
of the per-repeat ratios is reported. Validation and checkpointing are off in every variant.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import torch

from benchmarks.common import SEED, log, ratio_summary, summary

CLS = dict(
    backbone="packaged:all-MiniLM-L6-v2", task="classification", lr=5e-4,
    data=dict(source="packaged:rotten_tomatoes", task="classification", text_column="text", label_column="label",
              max_length=64, batch_size=32, val_fraction=0.1, test_fraction=0.1, split_seed=42),
    lora=dict(r=8, alpha=16, dropout=0.1, target_modules=["query", "value"]),
)
CLM = dict(
    backbone="packaged:SmolLM2-135M-Instruct", task="causal_lm", lr=3e-4,
    data=dict(source="packaged:rotten_tomatoes", task="causal_lm",
              prompt_template="Movie review: {text}\nIs this review fresh or rotten? Answer:",
              response_template=" {label}", loss_on="response", max_length=96, batch_size=8,
              max_train_samples=2000, max_eval_samples=300, split_seed=42),
    lora=dict(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"]),
)
SETTINGS = {"lora_minilm_cls": CLS, "lora_smollm2_clm": CLM}
PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


# ---------------------------------------------------------------------------------------------- data
def datamodule(setting: dict, **overrides):
    from peftlab.data import PeftDataModule

    dm = PeftDataModule(tokenizer=setting["backbone"], **{**setting["data"], **overrides})
    dm.prepare_data()
    dm.setup("fit")
    return dm


class _TimedIteration:
    """Mixed into the peftlab training loader: records, per batch, the fetch time and the token counts."""

    records: list

    def __iter__(self):
        iterator = super().__iter__()
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.records.append({"fetch": time.perf_counter() - start, "samples": len(batch["input_ids"]),
                                 "tokens": int(batch["attention_mask"].sum()), "padded": batch["input_ids"].numel()})
            yield batch


def pinned_loader(dm):
    """``dm.train_dataloader()`` with a fixed shuffle seed, recording fetch times and tokens per batch."""
    import peftlab.data.datamodule as module

    original = module.ResumableLoader
    # peftlab's own _loader builds it, only the class is the timed subclass
    module.ResumableLoader = type("Timed" + original.__name__, (_TimedIteration, original), {})
    try:
        loader = dm.train_dataloader()
    finally:
        module.ResumableLoader = original
    assert isinstance(loader, original), "PeftDataModule.train_dataloader no longer builds a ResumableLoader"
    loader.sampler.replay(SEED)
    loader.records = []
    return loader


# ---------------------------------------------------------------------------------------------- models
def reference_model(setting: dict, peft_config, quantization_config=None):
    """The backbone straight from transformers (no peftlab code), wrapped by ``peft.get_peft_model``."""
    import transformers
    from peft import get_peft_model, prepare_model_for_kbit_training

    from peftlab.assets import resolve_model

    path = resolve_model(setting["backbone"])
    kwargs = {"dtype": torch.float32}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": "cpu"})
    if setting["task"] == "classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization_config is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, peft_config)
    if peft_config.is_prompt_learning:
        # plain peft <= 0.21.2 cannot run prefix tuning on transformers >= 5.24 at all (the KV-cache argument
        # was renamed); the reference gets the same one-function bridge as peftlab (peftlab.compat), a no-op
        # on earlier versions, so both sides run the same model code
        from peftlab.compat import bridge_cache_argument

        bridge_cache_argument(peft_model)
    return peft_model


def lora_config(setting: dict):
    from peft import LoraConfig

    s = setting["lora"]
    return LoraConfig(task_type=PEFT_TASK[setting["task"]], r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                      target_modules=s["target_modules"])


def peftlab_module(setting: dict, method: str = "LoRA", **kwargs):
    import peftlab.methods as methods

    common = dict(backbone=setting["backbone"], task=setting["task"], learning_rate=setting["lr"],
                  num_labels=2 if setting["task"] == "classification" else None)
    if method in ("LoRA", "QLoRA"):
        kwargs = {**setting["lora"], **kwargs}
    return getattr(methods, method)(**common, **kwargs).build()


# ---------------------------------------------------------------------------------------------- the three loops
def _window(ends: list[float], records: list[dict], warmup: int) -> dict:
    """Steady state: from the end of step ``warmup`` to the end of the last step."""
    n = len(ends) - 1 - warmup
    seconds = ends[-1] - ends[warmup]
    window = records[warmup + 1: len(ends)]
    samples = sum(r["samples"] for r in window)
    tokens = sum(r["tokens"] for r in window)
    padded = sum(r["padded"] for r in window)
    step_ms = [1000 * (ends[k] - ends[k - 1]) for k in range(warmup + 1, len(ends))]
    return {"steps": n, "seconds": seconds, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "padded_tokens_per_s": padded / seconds, "step_ms": 1000 * seconds / n, "tokens": tokens,
            "step_times_ms": step_ms}


def run_peftlab(module, dm, warmup: int, steps: int) -> dict:
    """One `peftlab fit` training run in-process: Lightning Trainer + the peftlab module + PeftDataModule."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    loader = pinned_loader(dm)
    timer = StepTimer()
    dm.train_dataloader = lambda: loader  # the pinned-shuffle loader of this very datamodule
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        trainer = L.Trainer(max_steps=warmup + steps + 1, max_epochs=1, accelerator="cpu", devices=1,
                            precision="32-true", logger=CSVLogger(tmp, name="bench"), log_every_n_steps=20,
                            limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=[timer])
        with contextlib.redirect_stdout(null):
            trainer.fit(module, datamodule=dm)
    del dm.train_dataloader
    out = _window(timer.events["end"], loader.records, warmup)
    out["phases"] = timer.phases(loader.records, warmup)
    return out


def run_hand(model, dm, lr: float, warmup: int, steps: int) -> dict:
    """The minimal reference loop, timing each phase."""
    loader = pinned_loader(dm)
    torch.manual_seed(SEED)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    phases = {k: [] for k in ("data", "forward", "backward", "optimizer", "zero_grad")}
    ends = []
    iterator = iter(loader)
    for _ in range(warmup + steps + 1):
        t0 = time.perf_counter()
        batch = next(iterator)
        t1 = time.perf_counter()
        loss = model(**batch).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        opt.zero_grad()
        t5 = time.perf_counter()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            phases[key].append(value)
        ends.append(t5)
    out = _window(ends, loader.records, warmup)
    out["phases"] = {k: 1000 * sum(v[warmup + 1:]) / steps for k, v in phases.items()}
    return out


def run_hf_trainer(model, dm, lr: float, warmup: int, steps: int) -> dict:
    """transformers.Trainer on the same model type, batches and optimizer settings."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    loader = pinned_loader(dm)
    ends: list[float] = []

    class Ends(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    class SameBatches(Trainer):
        def get_train_dataloader(self):
            return loader

    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        args = TrainingArguments(output_dir=tmp, max_steps=warmup + steps + 1, per_device_train_batch_size=dm.batch_size,
                                 learning_rate=lr, weight_decay=0.0, lr_scheduler_type="linear", optim="adamw_torch",
                                 max_grad_norm=0.0, logging_strategy="no", save_strategy="no", eval_strategy="no",
                                 report_to=[], use_cpu=True, seed=SEED, dataloader_num_workers=0)
        trainer = SameBatches(model=model, args=args, train_dataset=dm.datasets["train"], data_collator=dm.collate,
                              callbacks=[Ends()])
        with contextlib.redirect_stdout(null):
            trainer.train()
    return _window(ends, loader.records, warmup)


def _callback_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class StepTimer(_callback_base()):
    """Timestamps of every training step's phases in a Lightning run (forward measured on the model itself)."""

    def __init__(self):
        self.events = {k: [] for k in ("start", "fwd0", "fwd1", "bwd0", "bwd1", "end")}
        self._hooks = []

    def on_train_start(self, trainer, pl_module):
        model = pl_module.model
        self._hooks = [model.register_forward_pre_hook(lambda *a: self._mark("fwd0")),
                       model.register_forward_hook(lambda *a: self._mark("fwd1"))]

    def on_train_end(self, trainer, pl_module):
        for hook in self._hooks:
            hook.remove()

    def _mark(self, key):
        self.events[key].append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mark("start")

    def on_before_backward(self, trainer, pl_module, loss):
        self._mark("bwd0")

    def on_after_backward(self, trainer, pl_module):
        self._mark("bwd1")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mark("end")

    def phases(self, records: list[dict], warmup: int) -> dict:
        """Mean milliseconds per steady-state step of: data (loader fetch), forward (the model's forward),
        training_step + zero_grad (the rest of the closure before backward: loss check, self.log, zero_grad),
        backward, optimizer (after backward to batch end: optimizer + LR scheduler step), loop (everything else
        between steps: Lightning's loop, logging connector, progress bar, logger)."""
        e = self.events
        idx = range(warmup + 1, len(e["end"]))
        out = {
            "data": [records[k]["fetch"] for k in idx],
            "forward": [e["fwd1"][k] - e["fwd0"][k] for k in idx],
            "training_step_rest": [(e["fwd0"][k] - e["start"][k]) + (e["bwd0"][k] - e["fwd1"][k]) for k in idx],
            "backward": [e["bwd1"][k] - e["bwd0"][k] for k in idx],
            "optimizer": [e["end"][k] - e["bwd1"][k] for k in idx],
            "loop": [e["start"][k] - e["end"][k - 1] - records[k]["fetch"] for k in idx],
        }
        return {k: 1000 * sum(v) / len(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- benchmarks
def interleave(variants: dict, repeats: int, label: str, budget: dict, smoke: bool = False) -> dict[str, list[dict]]:
    """Run ``variants`` (name -> run(warmup, steps)) round-robin ``repeats`` times, after one discarded short
    round: the first run in a process is much slower (allocator and page warm-up), whichever variant it is."""
    if not smoke:
        for fn in variants.values():
            fn(1, 2)
    runs = {name: [] for name in variants}
    for i in range(repeats):
        for name, fn in variants.items():
            result = fn(budget["warmup"], budget["steps"])
            runs[name].append(result)
            log(f"  {label} repeat {i + 1}/{repeats} {name}: {result['samples_per_s']:.1f} samples/s, "
                f"{result['tokens_per_s']:.0f} tokens/s, {result['step_ms']:.0f} ms/step")
    return runs


def summarize(runs: dict[str, list[dict]], reference_names: list[str]) -> dict:
    out = {"variants": {}, "ratios": {}}
    for name, rs in runs.items():
        out["variants"][name] = {k: summary([r[k] for r in rs]) for k in
                                 ("samples_per_s", "tokens_per_s", "padded_tokens_per_s", "step_ms")}
        out["variants"][name]["tokens_in_window"] = [r["tokens"] for r in rs]
        if "phases" in rs[0]:
            out["variants"][name]["phases_ms"] = {k: summary([r["phases"][k] for r in rs]) for k in rs[0]["phases"]}
    for ref in reference_names:
        out["ratios"][f"peftlab/{ref}"] = ratio_summary([r["samples_per_s"] for r in runs["peftlab"]],
                                                        [r["samples_per_s"] for r in runs[ref]])
        # robust to a burst of load inside one run: the same batch's step time, reference / peftlab
        paired = [b / a for ra, rb in zip(runs["peftlab"], runs[ref]) for a, b in zip(ra["step_times_ms"],
                                                                                      rb["step_times_ms"])]
        out["ratios"][f"peftlab/{ref} per step"] = quartiles(paired)
    windows = {name: rs[0]["tokens"] for name, rs in runs.items()}
    out["same_batches"] = len(set(windows.values())) == 1
    return out


def quartiles(values: list[float]) -> dict:
    """Median and interquartile range (as min/max, so the report prints it like the other spreads)."""
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "min": q[0], "max": q[2], "n": len(values), "range": "iqr",
            "spread_pct": 100.0 * (q[2] - q[0]) / 2 / statistics.median(values)}


def budget(smoke: bool, setting: str) -> dict:
    if smoke:
        return {"warmup": 1, "steps": 2, "repeats": 1}
    return {"warmup": 2, "steps": 12, "repeats": 7} if setting == "lora_minilm_cls" else \
        {"warmup": 1, "steps": 6, "repeats": 5}


def bench_throughput(smoke: bool) -> dict:
    """Item 1 (LoRA): peftlab vs hand-written loop vs HF Trainer; item 2 from the same runs."""
    results = {}
    for name, setting in SETTINGS.items():
        if smoke and name != "lora_minilm_cls":
            continue  # smoke: the small model only (the loops are the same code for both)
        b = budget(smoke, name)
        log(f"throughput {name}: building models and data")
        dm = datamodule(setting, **({"max_length": 32, "batch_size": 8} if smoke else {}))
        module = peftlab_module(setting)
        hand = reference_model(setting, lora_config(setting))
        hf = reference_model(setting, lora_config(setting))
        lr = setting["lr"]
        variants = {"peftlab": lambda w, n, m=module, d=dm: run_peftlab(m, d, w, n),
                    "hand": lambda w, n, m=hand, d=dm, r=lr: run_hand(m, d, r, w, n),
                    "hf_trainer": lambda w, n, m=hf, d=dm, r=lr: run_hf_trainer(m, d, r, w, n)}
        runs = interleave(variants, b["repeats"], name, b, smoke)
        results[name] = {"budget": b, "batch_size": dm.batch_size, "max_length": dm.max_length,
                         "trainable": module.trainable_count, **summarize(runs, ["hand", "hf_trainer"])}
        del module, hand, hf
    return results


METHODS = {
    "prompt_tuning": ("PromptTuning", dict(num_virtual_tokens=20)),
    "prefix_tuning": ("PrefixTuning", dict(num_virtual_tokens=20)),
    "qlora": ("QLoRA", dict(quant_type="nf4", double_quant=True, compute_dtype="float32", optimizer="adamw")),
}


def method_reference(setting: dict, method: str):
    from peft import PrefixTuningConfig, PromptTuningConfig
    from transformers import BitsAndBytesConfig

    task = PEFT_TASK[setting["task"]]
    if method == "prompt_tuning":
        return reference_model(setting, PromptTuningConfig(task_type=task, num_virtual_tokens=20))
    if method == "prefix_tuning":
        return reference_model(setting, PrefixTuningConfig(task_type=task, num_virtual_tokens=20, init_weights="zero"))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["classifier", "score", "classification_head"])
    return reference_model(setting, lora_config(setting), quantization_config=quant)


def bench_methods(smoke: bool) -> dict:
    """Item 1 (other methods): prompt tuning, prefix tuning, QLoRA vs their hand-written peft loops, on
    all-MiniLM-L6-v2 classification (the 2-core budget does not allow them on SmolLM2 as well)."""
    setting = CLS
    b = {"warmup": 1, "steps": 2, "repeats": 1} if smoke else {"warmup": 2, "steps": 10, "repeats": 4}
    dm = datamodule(setting, **({"max_length": 32, "batch_size": 8} if smoke else {}))
    results = {}
    for name, (cls, kwargs) in METHODS.items():
        log(f"methods {name}: building models")
        module = peftlab_module(setting, cls, **kwargs)
        hand = method_reference(setting, name)
        hand_trainable = sum(p.numel() for p in hand.parameters() if p.requires_grad)
        runs = interleave({"peftlab": lambda w, n, m=module: run_peftlab(m, dm, w, n),
                           "hand": lambda w, n, m=hand: run_hand(m, dm, setting["lr"], w, n)},
                          b["repeats"], name, b, smoke)
        results[name] = {"budget": b, "batch_size": dm.batch_size, "max_length": dm.max_length,
                         "trainable": {"peftlab": module.trainable_count, "hand": hand_trainable},
                         **summarize(runs, ["hand"])}
        del module, hand
    return results
