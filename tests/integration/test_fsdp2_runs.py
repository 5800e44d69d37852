"""FSDP2 (``peftlab.strategies.FSDP2Strategy``) on 2 CPU processes over gloo: every method trains the same adapter
as 1 process with the same global batch, checkpoints hold only the trainable parameters and optimizer state,
exports gather only the trainable parameters and load with plain peft, and a SIGKILLed run resumes exactly.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_fsdp2.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PEFTLAB, ROOT, make_data, tiny_trainer, write_config

# method class, its settings; each must train under FSDP2 exactly like in one process
METHODS = {
    "lora": ("LoRA", {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}),
    "adapters": ("BottleneckAdapter", {"bottleneck": 8}),
    "prompt_tuning": ("PromptTuning", {"num_virtual_tokens": 4}),
    "prefix_tuning": ("PrefixTuning", {"num_virtual_tokens": 4, "init": "random"}),
    "p_tuning_v2": ("PTuningV2", {"num_virtual_tokens": 4, "prefix_hidden_size": 16}),
    "lora_prompt": ("LoRAPromptTuning", {"num_virtual_tokens": 4, "r": 4, "target_modules": ["q_proj", "v_proj"]}),
    "full": ("FullFineTuning", {}),
    # QLoRA's packed 4-bit weights (bitsandbytes' CPU backend), sharded in their float storage dtype
    "qlora": ("QLoRA", {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "compute_dtype": "float32",
                        "optimizer": "adamw", "quant_storage": "bfloat16"}),
}


STEPS = 3


# trained as well with the whole backbone loaded on each process before sharding (sharded_start: false)
FULL_START = "lora_full_start"


SCRIPT = '''
import json, sys
import torch
import lightning as L
sys.path.insert(0, {tests!r})
from conftest import make_data
import peftlab.methods as methods
import peftlab.strategies
from peftlab.callbacks import AdapterExport
from peftlab.strategies import FSDP2Strategy
from torch.distributed.tensor import DTensor

filled = []  # tensors a sharded start read from the checkpoint into each rank's shards
load_shards = peftlab.strategies.load_shards
peftlab.strategies.load_shards = lambda model: filled.append(load_shards(model)) or filled[-1]

gathered = []  # sizes of every tensor an export gathers: the trainable parameters only
full_tensor = DTensor.full_tensor
def counting(self, *args, **kwargs):
    gathered.append(self.numel())
    return full_tensor(self, *args, **kwargs)
DTensor.full_tensor = counting

out = {out!r}
report = {{}}
runs = {{name: (cls, kwargs, {backbone!r}) for name, (cls, kwargs) in json.loads({methods!r}).items()}}
runs[{full_start!r}] = runs["lora"]
# the same Llama with its head tied to its input embeddings (SmolLM2 is), from a sharded and from a full start
runs["lora_tied"] = runs["lora_tied_full_start"] = (*runs["lora"][:2], {tied!r})
for name, (cls, kwargs, backbone) in runs.items():
    L.seed_everything(0)
    dm = make_data({source!r}, "causal_lm", backbone, batch_size=4, shuffle=False, group_by_length=False,
                   max_length=48)
    module = getattr(methods, cls)(backbone=backbone, task="causal_lm", learning_rate=1e-2, **kwargs)
    gathered.clear()
    filled.clear()
    strategy = FSDP2Strategy(sharded_start=not name.endswith("full_start"))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps={steps}, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[AdapterExport(dirpath=out + "/" + name)])
    trainer.fit(module, datamodule=dm)
    if trainer.is_global_zero:
        report[name] = {{"gathered": sum(gathered), "trainable": module.trainable_count, "filled": sum(filled)}}
if torch.distributed.get_rank() == 0:
    open(out + "/report.json", "w").write(json.dumps(report))
'''


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory, tiny_llama, generation_jsonl):
    """All methods trained under FSDP2 by one 2-process launch (one start-up for all of them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("fsdp2")
    tied = out / "tiny_llama_tied"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, tie_word_embeddings=True)
    model.tie_weights()
    model.save_pretrained(tied)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tied)
    script = out / "train.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), out=str(out), methods=json.dumps(METHODS),
                                    source=generation_jsonl, backbone=tiny_llama, steps=STEPS,
                                    full_start=FULL_START, tied=str(tied)))
    result = subprocess.run([sys.executable, str(script)], cwd=out, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp2_on_two_processes_trains_what_one_process_trains(name, fsdp2_runs, tiny_llama, generation_jsonl):
    out, report = fsdp2_runs
    cls_name, kwargs = METHODS[name]
    import lightning as L

    import peftlab.methods as methods
    from peftlab.export import trainable_state

    L.seed_everything(0)
    dm = make_data(generation_jsonl, "causal_lm", tiny_llama, batch_size=8, shuffle=False, group_by_length=False,
                   max_length=48)
    module = getattr(methods, cls_name)(backbone=tiny_llama, task="causal_lm", learning_rate=1e-2, **kwargs)
    tiny_trainer(max_steps=STEPS, limit_val_batches=0).fit(module, datamodule=dm)
    expected = trainable_state(module)
    exported = load_file(str(out / name / "last/adapter_model.safetensors"))
    got = _as_trainable_names(module, out / name / "last", exported)
    assert got.keys() == expected.keys()
    moved = 0
    # the same global batch of 8: the same adapter up to summation order. Adam divides each gradient by its own
    # running scale, so an element whose gradient is ~1e-9 (many, in full fine-tuning's embeddings and blocks)
    # turns a last-bit difference of the sum into a visible one: 1e-3 of the tensor's scale there
    atol = 1e-3 if name == "full" else 1e-4
    for key in expected:
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=atol * scale)
        moved += 1
    assert moved
    # the export gathered the trainable parameters, not the frozen backbone
    assert report[name]["gathered"] == report[name]["trainable"] == module.trainable_count
    # a sharded start read every backbone tensor (embeddings, 2 x 9 per block, final norm, head) into the shards,
    # except where attach reads the weights (LoRA + prompt starts its prompt from vocabulary embeddings) and for a
    # quantized backbone (bitsandbytes quantizes while loading: QLoRA loads its 4-bit backbone in full, then shards)
    assert report[name]["filled"] == (0 if name in ("lora_prompt", "qlora") else 21)


def test_a_sharded_start_trains_the_adapter_a_full_start_trains(fsdp2_runs):
    """The backbone built without weights and filled per rank after sharding, against the whole backbone loaded on
    each process first (FSDP2Strategy(sharded_start=false)): the same adapter."""
    out, report = fsdp2_runs
    assert report[FULL_START]["filled"] == 0 and report["lora"]["filled"] == 21
    full = load_file(str(out / FULL_START / "last/adapter_model.safetensors"))
    sharded = load_file(str(out / "lora" / "last/adapter_model.safetensors"))
    assert full.keys() == sharded.keys() and len(full) == 8
    for key in full:
        torch.testing.assert_close(sharded[key], full[key], rtol=0, atol=1e-5)
    # head tied to the input embeddings: one tensor for both (20 read), the same adapter as a full start
    assert report["lora_tied"]["filled"] == 20 and report["lora_tied_full_start"]["filled"] == 0
    tied_full = load_file(str(out / "lora_tied_full_start" / "last/adapter_model.safetensors"))
    tied_sharded = load_file(str(out / "lora_tied" / "last/adapter_model.safetensors"))
    for key in tied_full:
        torch.testing.assert_close(tied_sharded[key], tied_full[key], rtol=0, atol=1e-5)


def _as_trainable_names(module, directory: Path, tensors: dict) -> dict:
    """The exported tensors under the module's trainable-parameter names (peft's files use peft's own names)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("format") == "peftlab":
        return tensors
    from peftlab.api import load_run
    from peftlab.export import trainable_state

    return trainable_state(load_run(str(directory)).module)


def test_fsdp2_exports_load_with_plain_peft_to_the_same_outputs(fsdp2_runs, tiny_llama):
    out, _ = fsdp2_runs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftlab.api import load_run

    directory = out / "lora" / "last"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plain = PeftModel.from_pretrained(base, str(directory)).eval()
    ours = load_run(str(directory)).module.eval()
    ids = torch.randint(5, 500, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_fsdp2_checkpoint_holds_trainable_state_and_a_killed_run_resumes_exactly(tmp_path, tiny_llama,
                                                                                 generation_jsonl):
    """The CLI with configs/strategies/fsdp2.yaml's strategy: distributed checkpoints sized like the adapter and
    its optimizer state (not the backbone), and SIGKILL + --ckpt_path last ends where an uninterrupted run ends."""
    (tmp_path / "killer.py").write_text(
        "import os, signal\nfrom lightning.pytorch.callbacks import Callback\n\n\nclass KillAt(Callback):\n"
        "    def __init__(self, step: int = 0):\n        self.step = step\n\n"
        "    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):\n"
        "        if self.step and trainer.global_step >= self.step:\n            os.kill(os.getpid(), signal.SIGKILL)\n")

    def config(name, kill):
        return write_config(
            tmp_path, tiny_llama, generation_jsonl, runs=name, name=f"{name}.yaml",
            model={"dropout": 0.1, "warmup_ratio": 0.3, "target_modules": ["q_proj", "v_proj"]},
            data={"task": "causal_lm", "batch_size": 4, "max_length": 48},
            trainer={"max_steps": 8, "devices": 2, "val_check_interval": 3, "limit_val_batches": 2,
                     "strategy": {"class_path": "peftlab.strategies.FSDP2Strategy"}},
            callbacks=[{"class_path": "killer.KillAt", "init_args": {"step": kill}}])

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tmp_path)}

    def fit(cfg, *extra):
        return subprocess.run([PEFTLAB, "fit", "--config", cfg, "--test_after_fit", "false", *extra], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)

    result = fit(config("reference", 0))
    assert result.returncode == 0, result.stderr[-3000:]
    killed = config("killed", 4)
    assert fit(killed).returncode == -9
    (run,) = (tmp_path / "killed/r").glob("version_*")
    last = run / "checkpoints/last.ckpt"
    assert last.is_dir()  # a distributed checkpoint: one shard per rank
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    weights = {k for k in stored if k.startswith("state_dict.")}
    # 2 layers x (q_proj, v_proj) x (A, B): the adapter and nothing of the backbone
    assert len(weights) == 8 and all(".lora_" in k for k in weights), sorted(weights)
    numel = sum(m.size.numel() for k, m in stored.items() if k.startswith("state_dict."))
    assert numel == 1792  # the trainable count
    assert {k.split(".")[0] for k in stored} == {"state_dict", "optimizer_0"}
    result = fit(killed, "--ckpt_path", "last", "--trainer.callbacks.init_args.step", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    (ref_run,) = (tmp_path / "reference/r").glob("version_*")
    expected = load_file(str(ref_run / "adapter/last/adapter_model.safetensors"))
    got = load_file(str(run / "adapter/last/adapter_model.safetensors"))
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_a_qlora_adapter_trained_under_fsdp2_loads_and_merges(fsdp2_runs):
    """QLoRA's adapter from the 2-process FSDP2 run: loaded on one process it merges onto the dequantized backbone,
    and the merged plain model computes what the 4-bit model with the adapter computes."""
    out, _ = fsdp2_runs
    from peftlab.api import load_run

    module = load_run(str(out / "qlora" / "last")).module.eval()
    merged = module.merged_model()
    assert not any(type(p).__name__ == "Params4bit" for p in merged.parameters())
    ids = torch.randint(5, 500, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


MEMORY_SCRIPT = '''
import json, sys
import lightning as L
import psutil
import torch
# the libraries the start-up uses, imported before the baseline: the figure is the backbone's, not theirs
import peft, torch.distributed.fsdp, transformers.models.llama.modeling_llama
sys.path.insert(0, {tests!r})
from conftest import make_data
from peftlab.methods import LoRA
from peftlab.strategies import FSDP2Strategy


class StartUpMemory(L.Callback):
    """Resident memory from before the model is built (setup) to after it is sharded and filled (fit start)."""

    def setup(self, trainer, pl_module, stage):
        self.baseline = psutil.Process().memory_info().rss
        with open("/proc/self/clear_refs", "w") as f:  # reset the kernel's peak (VmHWM) to the current RSS
            f.write("5")

    def on_fit_start(self, trainer, pl_module):
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak = int(status["VmHWM"].split()[0]) * 1024
        local = sum(p.to_local().numel() * p.element_size() for p in pl_module.model.parameters())
        json.dump({{"baseline": self.baseline, "peak": peak, "after": psutil.Process().memory_info().rss,
                   "local_bytes": local}}, open(f"{{sys.argv[2]}}.rank{{trainer.global_rank}}.json", "w"))


torch.set_num_threads(1)
L.seed_everything(0)
dm = make_data({source!r}, "causal_lm", {backbone!r}, batch_size=2, max_length=16)
module = LoRA(backbone={backbone!r}, task="causal_lm", dtype="bfloat16", r=4, target_modules=["q_proj", "v_proj"])
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(sharded_start=sys.argv[1] == "sharded"),
                    max_steps=1, limit_train_batches=0, limit_val_batches=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, callbacks=[StartUpMemory()])
trainer.fit(module, datamodule=dm)
'''


@pytest.fixture(scope="module")
def half_billion_llama(tmp_path_factory, tokenizer_dir):
    """A 0.51B-parameter Llama (SmolLM-like vocabulary, 26 blocks of width 1024) built from its config and saved in
    bf16 (1.0 GB). Its weights are never initialized (zeros on disk): start-up memory does not depend on them."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=1024, intermediate_size=4096, num_hidden_layers=26,
                      num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")  # uninitialized: the pages are zero until written
    path = tmp_path_factory.mktemp("llama_half_billion")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    numel = sum(p.numel() for p in model.parameters())
    del model
    return str(path), numel


@pytest.mark.slow
def test_a_sharded_start_holds_about_one_shard_per_process(tmp_path, half_billion_llama, generation_jsonl):
    """Each of 2 processes' peak resident memory from before the build to the start of training, above its baseline
    (the libraries imported): at most 0.6 x one full bf16 copy of the 0.51B backbone with a sharded start (measured:
    0.51, the shard), about one copy with a full start (measured: 1.03; every byte of the checkpoint is mapped in
    before fully_shard keeps the rank's half). Figures in docs/distributed.md."""
    backbone, numel = half_billion_llama
    assert numel >= 500_000_000
    copy_bytes = 2 * numel  # bf16
    script = tmp_path / "start.py"
    script.write_text(MEMORY_SCRIPT.format(tests=str(ROOT / "tests"), source=generation_jsonl, backbone=backbone))
    figures = {}
    for start in ("sharded", "full"):
        result = subprocess.run([sys.executable, str(script), start, str(tmp_path / start)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        ranks = [json.loads((tmp_path / f"{start}.rank{r}.json").read_text()) for r in (0, 1)]
        figures[start] = [(r["peak"] - r["baseline"]) / copy_bytes for r in ranks]
        for r in ranks:  # each rank holds half of the backbone (and the adapter) after sharding
            assert abs(r["local_bytes"] - copy_bytes / 2) < 0.01 * copy_bytes, r
    print(f"peak start-up memory above baseline, x one full copy ({copy_bytes / 2**30:.2f} GiB), per rank: "
          f"{json.dumps(figures)}")
    assert max(figures["sharded"]) <= 0.6, figures
    assert min(figures["full"]) >= 0.95, figures  # (the kernel may drop a few clean file pages on the way)
