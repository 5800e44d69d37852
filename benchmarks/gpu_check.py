"""The GPU check: every GPU path peftlab promises, run for real on one GPU, in a few minutes, with no downloads.

    python benchmarks/gpu_check.py --out DIR            # on a GPU machine (scripts/gpu_check.sh installs what is missing)
    python benchmarks/gpu_check.py --smoke --out DIR    # the same steps on the CPU with tiny shapes (CI-sized)

Steps, each recorded as passed / failed with its numbers in DIR/gpu_check.json (and a table in DIR/gpu_check.md):

1. a backbone of a real shape built from ``configs/backbones/llama-1b`` (TinyLlama-1.1B: 22 layers, hidden 2048,
   grouped-query attention) with random weights, its vocabulary cut to a tokenizer trained here on review text;
   saved to disk so that the real loading path runs;
2. ``peftlab fit`` (the real CLI, ``configs/gpu.yaml``: bf16-mixed, a bf16 backbone, TF32, SDPA) for LoRA, QLoRA
   with paged 8-bit AdamW, prefix tuning and P-tuning v2, a few dozen steps each: the loss must fall and every
   trainable parameter must be fp32; then ``peftlab predict`` (generation), and ``peftlab merge`` for QLoRA with the
   merged model's largest logit difference;
3. ``peftlab fit`` with ``configs/strategies/fsdp2.yaml`` (FSDP2 through ``ModelParallelStrategy``, one process on
   one GPU over NCCL; the CPU tests run two processes over gloo): LoRA's loss must fall, the checkpoint must be a
   directory of trainable state only, and the exported adapter must load;
4. peftlab's training throughput against the hand-written loop of ``benchmarks/throughput.py`` on the same batches,
   as a samples/s ratio (interleaved repeats).

Nothing here is needed on a CPU; ``--smoke`` exists so that the script itself is tested (tests/integration/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peftlab.runinfo import logger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = {
    "lora": ["--model", "peftlab.methods.LoRA", "--model.r", "16", "--model.alpha", "32",
             "--model.target_modules", "[q_proj,k_proj,v_proj,o_proj]", "--model.learning_rate", "2e-4"],
    "qlora": ["--model", "peftlab.methods.QLoRA", "--model.r", "16", "--model.alpha", "32",
              "--model.target_modules", "[q_proj,k_proj,v_proj,o_proj]", "--model.optimizer", "paged_adamw_8bit",
              "--model.compute_dtype", "bfloat16", "--model.learning_rate", "2e-4"],
    "prefix_tuning": ["--model", "peftlab.methods.PrefixTuning", "--model.num_virtual_tokens", "16",
                      "--model.learning_rate", "5e-3"],
    "p_tuning_v2": ["--model", "peftlab.methods.PTuningV2", "--model.num_virtual_tokens", "16",
                    "--model.prefix_hidden_size", "256", "--model.learning_rate", "3e-4"],
}


log = logger("gpu_check")


def texts(n: int) -> list[str]:
    """Review sentences: the packaged corpus when installed, else a small built-in set (the check needs text, not
    a particular text)."""
    try:
        import bz2
        import csv

        from peftlab.assets import dataset_file

        with bz2.open(dataset_file("packaged:rotten_tomatoes"), "rt", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
        return [(r["text"], r["category"]) for r in rows[:n]]
    except Exception:  # noqa: BLE001 - the packaged data is optional here
        words = "a warm funny moving film with a sharp script dull predictable long cast story music".split()
        return [(" ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 12)), "fresh" if i % 3 else "rotten")
                for i in range(n)]


def build_backbone(directory: Path, smoke: bool, vocab: int) -> Path:
    """A Llama of TinyLlama-1.1B's shape (tiny in smoke mode), random weights, with a BPE tokenizer of ``vocab``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [t for t, _ in texts(4000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>",
                                                                                          "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    config = json.loads((ROOT / "configs/backbones/llama-1b/config.json").read_text())
    config.update(vocab_size=len(fast), pad_token_id=0, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    if smoke:
        config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    for key in ("_name_or_path", "transformers_version", "architectures"):
        config.pop(key, None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def write_data(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text, label in texts(n):
            f.write(json.dumps({"prompt": f"Review: {text}\nVerdict:", "response": f" {label}"}) + "\n")
    return path


def peftlab(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "peftlab"  # the console script; `python -m peftlab` where not installed
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "peftlab"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, env=env)


def fit_args(name: str, backbone: Path, data: Path, work: Path, smoke: bool) -> list[str]:
    """``peftlab fit`` arguments: the causal-LM config, configs/gpu.yaml (its CPU-runnable part in smoke mode), the
    method's settings, the check's data and a short budget (40 steps, 6 in smoke mode)."""
    steps = 6 if smoke else 40
    runs = work / "runs"
    common = ["--config", str(ROOT / "configs/causal_lm_lora.yaml")]
    if not smoke:
        common += ["--config", str(ROOT / "configs/gpu.yaml")]
    else:  # configs/gpu.yaml's settings the CPU can run (no TF32 / bf16 kernels needed)
        common += ["--model.init_args.dtype", "bfloat16", "--trainer.precision", "bf16-mixed"]
    method = "lora" if name == "fsdp2" else name
    settings = METHODS[method]
    if smoke and method in ("lora", "qlora"):  # 6 steps on a tiny random model: 2e-4 moves the loss by < 1e-3
        settings = [*settings, "--model.learning_rate", "1e-2"]
    return ["fit", *common, *settings, "--model.init_args.backbone", str(backbone),
            "--data.source", str(data), "--data.prompt_template", "{prompt}", "--data.response_template", "{response}",
            "--data.max_length", "64", "--data.batch_size", "4" if smoke else "16",
            "--data.max_train_samples", "400" if not smoke else "48", "--data.max_eval_samples", "32",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", name]


def losses_of(run: Path) -> list[float]:
    import csv

    with open(run / "metrics.csv", encoding="utf-8") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def trainable_fp32(directory: Path) -> bool:
    from peftlab.api import load_run

    module = load_run(str(directory)).module
    return all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in module.parameters() if p.requires_grad)


def fit(name: str, args: list[str], work: Path) -> tuple[dict, Path | None]:
    """``peftlab fit ARGS``, timed: the step's record (error, or first/last loss and whether it fell) and the run
    directory (None when the fit failed)."""
    start = time.perf_counter()
    result = peftlab(args, work)
    record = {"method": name, "seconds": round(time.perf_counter() - start, 1), "passed": result.returncode == 0}
    if result.returncode != 0:
        record["error"] = (result.stderr or result.stdout)[-1500:]
        return record, None
    (run,) = sorted((work / "runs" / name).glob("version_*"))
    losses = losses_of(run)
    record.update(first_loss=losses[0], last_loss=losses[-1], loss_fell=losses[-1] < losses[0])
    return record, run


def fit_method(name: str, backbone: Path, data: Path, work: Path, smoke: bool) -> dict:
    args = fit_args(name, backbone, data, work, smoke)
    if name == "qlora" and smoke:
        args += ["--model.optimizer", "adamw"]  # paged optimizers need CUDA
    record, run = fit(name, args, work)
    if run is None:
        return record
    record["passed"] = record["loss_fell"]
    predict = peftlab(["predict", "--config", str(run / "config.yaml"), "--ckpt_path",
                       str(run / "checkpoints/last.ckpt"), "--predictions_file", str(work / f"{name}.jsonl")], work)
    record["generate"] = predict.returncode == 0 and (work / f"{name}.jsonl").stat().st_size > 0
    if not record["generate"]:
        record["generate_error"] = (predict.stderr or predict.stdout)[-800:]
    record["passed"] = record["passed"] and record["generate"]
    if name == "qlora":
        merged = peftlab(["merge", str(run), "--output", str(work / "qlora_merged")], work)
        record["merge"] = merged.returncode == 0
        if record["merge"]:
            report = json.loads(merged.stdout[merged.stdout.index("{"):])
            record["merge_max_logit_difference"] = report.get("max_abs_logit_difference")
        else:
            record["merge_error"] = (merged.stderr or merged.stdout)[-800:]
        record["passed"] = record["passed"] and record["merge"]
    record["trainable_fp32"] = trainable_fp32(run)
    record["passed"] = record["passed"] and record["trainable_fp32"]
    return record


def fit_fsdp2(backbone: Path, data: Path, work: Path, smoke: bool) -> dict:
    """LoRA under configs/strategies/fsdp2.yaml on one device: the sharded code path (fully_shard in
    configure_model, distributed checkpoints, the gathering export) on a real accelerator and its process group."""
    args = [*fit_args("fsdp2", backbone, data, work, smoke),
            "--config", str(ROOT / "configs/strategies/fsdp2.yaml"), "--trainer.devices", "1"]
    if smoke:
        args += ["--trainer.accelerator", "cpu"]
    record, run = fit("fsdp2", args, work)
    if run is None:
        return record
    last = run / "checkpoints/last.ckpt"
    record["checkpoint_is_sharded_directory"] = last.is_dir()
    if last.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(str(last)).read_metadata().state_dict_metadata
        weights = [k for k in stored if k.startswith("state_dict.")]
        record["checkpoint_adapter_only"] = bool(weights) and all(".lora_" in k for k in weights)
    record["export_loads"] = (run / "adapter/last/adapter_model.safetensors").is_file()
    if record["export_loads"]:
        record["trainable_fp32"] = trainable_fp32(run / "adapter/last")
    record["passed"] = all(record.get(k) for k in ("loss_fell", "checkpoint_is_sharded_directory",
                                                   "checkpoint_adapter_only", "export_loads", "trainable_fp32"))
    return record


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def hand_loop(backbone: Path, batches: list[dict], device: str, warmup: int) -> float:
    """Samples/s of the loop a user writes by hand: transformers + ``peft.get_peft_model`` + AdamW under bf16
    autocast, the same batches, steady state (after ``warmup`` steps)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(str(backbone), dtype=torch.bfloat16).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=TARGETS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return (len(batches) - warmup) * len(batches[0]["input_ids"]) / (time.perf_counter() - start)


def peftlab_loop(backbone: Path, batches: list[dict], device: str, warmup: int) -> float:
    """Samples/s of peftlab's LoRA in a Lightning Trainer (bf16-mixed), the same batches, steady state."""
    import lightning as L

    from peftlab.methods import LoRA

    marks: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup - 1 or batch_idx == len(batches) - 1:
                _sync(device)
                marks.append(time.perf_counter())

    module = LoRA(backbone=str(backbone), task="causal_lm", r=16, alpha=32, dtype="bfloat16", target_modules=TARGETS,
                  learning_rate=2e-4)
    trainer = L.Trainer(accelerator=device, devices=1, precision="bf16-mixed", max_steps=len(batches), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Clock()])
    import torch

    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))  # batch by batch
    return (len(batches) - warmup) * len(batches[0]["input_ids"]) / (marks[-1] - marks[0])


def throughput(backbone: Path, data: Path, smoke: bool) -> dict:
    """peftlab's samples/s over the hand-written loop's, on the same batches, repeats interleaved."""
    import torch

    from peftlab.data import PeftDataModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps, warmup, repeats = (6, 2, 1) if smoke else (40, 5, 3)
    dm = PeftDataModule(source=str(data), task="causal_lm", tokenizer=str(backbone), max_length=64,
                        batch_size=4 if smoke else 16, group_by_length=False, shuffle=False)
    dm.setup()
    batches = [b for _, b in zip(range(steps), dm.train_dataloader())]
    ours, hand = [], []
    for _ in range(repeats):
        ours.append(peftlab_loop(backbone, batches, device, warmup))
        hand.append(hand_loop(backbone, batches, device, warmup))
    ratio = [a / b for a, b in zip(ours, hand)]
    return {"peftlab_samples_per_s": ours, "hand_samples_per_s": hand, "ratio_median": statistics.median(ratio),
            "ratio_values": ratio, "steps": steps, "warmup": warmup}


def run_step(record: dict, out: Path, name: str, step) -> None:
    """One step, its failure recorded rather than raised, the results so far written after it (a device session
    cut short still returns what ran)."""
    start = time.perf_counter()
    try:
        result = step()
    except Exception as err:  # noqa: BLE001 - recorded, the other steps still run
        result = {"method": name, "passed": False, "seconds": round(time.perf_counter() - start, 1),
                  "error": f"{type(err).__name__}: {err}"}
    record["steps"].append(result)
    log(f"  {'passed' if result['passed'] else 'FAILED'} in {result['seconds']} s")
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the results (gpu_check.json, gpu_check.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script itself")
    parser.add_argument("--only", nargs="+", choices=[*METHODS, "fsdp2", "throughput"], default=None)
    args = parser.parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": args.smoke,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
              "versions": {}, "steps": []}
    from peftlab.runinfo import library_versions

    record["versions"] = library_versions()
    log(f"building the backbone ({'tiny' if args.smoke else 'TinyLlama-1.1B shape'})")
    backbone = build_backbone(work / "backbone", args.smoke, vocab=600 if args.smoke else 8000)
    data = write_data(work / "reviews.jsonl", 120 if args.smoke else 600)
    for name in METHODS:
        if args.only and name not in args.only:
            continue
        log(f"peftlab fit / predict{' / merge' if name == 'qlora' else ''}: {name}")
        run_step(record, out, name, lambda name=name: fit_method(name, backbone, data, work, args.smoke))
    if not args.only or "fsdp2" in args.only:
        log("peftlab fit under FSDP2 (configs/strategies/fsdp2.yaml, 1 device): lora")
        run_step(record, out, "fsdp2", lambda: fit_fsdp2(backbone, data, work, args.smoke))
    if not args.only or "throughput" in args.only:
        log("throughput: peftlab vs the hand-written loop")
        try:
            record["throughput"] = throughput(backbone, data, args.smoke)
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            record["throughput"] = {"error": f"{type(err).__name__}: {err}"}
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str))
    lines = [f"GPU check on {record['device']}, {record['date']}"
             f" (torch {record['versions'].get('torch')}, transformers {record['versions'].get('transformers')})", "",
             "| step | result | numbers |", "|---|---|---|"]
    for step in record["steps"]:
        numbers = (f"loss {step.get('first_loss', float('nan')):.3f} -> {step.get('last_loss', float('nan')):.3f}, "
                   f"{step['seconds']} s" + (f", merge max logit diff {step.get('merge_max_logit_difference')}"
                                            if step["method"] == "qlora" else ""))
        what = {"qlora": "fit + generate + merge", "fsdp2": "LoRA fit under FSDP2 + export"}.get(step["method"],
                                                                                              "fit + generate")
        lines.append(f"| {step['method']} {what} | "
                     f"{'passed' if step['passed'] else 'failed'} | {numbers} |")
    if "throughput" in record:
        t = record["throughput"]
        lines.append(f"| LoRA samples/s, peftlab / hand loop | "
                     f"{'measured' if 'ratio_median' in t else 'failed'} | {t.get('ratio_median', t.get('error'))} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
