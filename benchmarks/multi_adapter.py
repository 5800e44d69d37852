"""Many adapters on one backbone (issue #32): hot-swapping, mixed-adapter batches and the server, as ratios.

On SmolLM2-135M (causal LM), with 8 LoRA adapters (r 8 on q/v, random B so nothing is skipped) and 8 prompt-tuning
adapters (20 virtual tokens) exported to a temporary directory and loaded into one adapter set per family:

* ``switch``: ``load_run`` of an exported adapter (a backbone loaded from disk) vs ``AdapterSet.switch`` (no load) and
  vs ``AdapterSet.add`` (the adapter's weights onto the shared backbone);
* ``mixed``: forward throughput (rows/s, 32-token rows) of one batch whose rows name all 8 adapters (2 rows each),
  vs the same rows through one adapter (a batch of one adapter, the goal is >= 0.8x) and vs the loop over the
  adapters, one sub-batch of its 2 rows at a time (what hot-swapping without mixed batches costs). LoRA rows are
  routed per row by peft (``adapter_names``); prompt-tuning rows are grouped per adapter inside the batch;
* ``server``: ``peftlab serve`` over the LoRA set: requests/s of 16 concurrent clients vs one client at a time
  (16 requests of 4 new tokens each; the requests of the concurrent clients are batched);
* ``multitask_fit`` (a benchmark of its own, ``bench_multitask_fit``): wall time of 4 separate fits of one LoRA task each vs one ``MultiTask`` fit of the 4 tasks on
  the same per-task batches (4 rows of each task per step, 6 steps; loading included: the separate fits load the
  backbone 4 times, the multi-task fit once).

Rounds are interleaved (variant a, b, c, a, b, c, ...); each ratio is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import SEED, log, ratio_summary, summary

BACKBONE = "packaged:SmolLM2-135M-Instruct"


def _export_adapters(directory: Path, cls, count: int, **kw) -> dict[str, str]:
    from peftlab.export import export_adapter

    module = cls(backbone=BACKBONE, task="causal_lm", max_new_tokens=8, **kw).build().eval()
    gen = torch.Generator().manual_seed(SEED)
    paths = {}
    for i in range(count):
        with torch.no_grad():
            for p in module.parameters():
                if p.requires_grad:
                    p.normal_(std=0.02, generator=gen)
        paths[f"{cls.__name__.lower()}{i}"] = str(export_adapter(module, directory / f"{cls.__name__}{i}"))
    return paths


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mixed(adapters, names: list[str], rows_per_adapter: int, length: int, rounds: int) -> dict:
    vocab = adapters.backbone.config.vocab_size
    ids = torch.randint(5, vocab - 1, (rows_per_adapter * len(names), length),
                        generator=torch.Generator().manual_seed(SEED))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mixed = [n for n in names for _ in range(rows_per_adapter)]

    def loop():
        for i, name in enumerate(names):
            rows = slice(i * rows_per_adapter, (i + 1) * rows_per_adapter)
            adapters.forward({k: v[rows] for k, v in batch.items()}, name)

    variants = {"mixed": lambda: adapters.forward(batch, mixed), "one_adapter": lambda: adapters.forward(batch, names[0]),
                "loop": loop}
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(_time(fn))
    n = len(mixed)
    return {"rows": n, "length": length, "rounds": rounds, "routing": adapters.routing(),
            "rows_per_s": {k: summary([n / t for t in ts]) for k, ts in times.items()},
            "ratio": {"mixed/one_adapter": ratio_summary(times["one_adapter"], times["mixed"]),
                      "mixed/loop": ratio_summary(times["loop"], times["mixed"])}}


def _server(adapters, names: list[str], requests: int, rounds: int, max_new_tokens: int) -> dict:
    import openai

    from peftlab.serve import Server, create_app

    prompts = [f"Review {i}: a film about {w}.\nVerdict:" for i, w in enumerate(["cats", "rain", "war", "love"] * 8)]
    jobs = [(names[i % len(names)], prompts[i % len(prompts)]) for i in range(requests)]
    app = create_app(adapters, max_batch_size=16, max_wait_ms=10)
    with Server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        def ask(job):
            return client.completions.create(model=job[0], prompt=job[1], max_tokens=max_new_tokens).choices[0].text

        def sequential():
            for job in jobs:
                ask(job)

        def concurrent():
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(ask, jobs))

        sequential()  # warm-up
        times = {"one_client": [], "16_clients": []}
        batches = []  # the batch sizes of the concurrent rounds (one client at a time makes batches of 1)
        for _ in range(rounds):
            times["one_client"].append(_time(sequential))
            app.state.batcher.batches.clear()
            times["16_clients"].append(_time(concurrent))
            batches += app.state.batcher.batches
    return {"requests": requests, "rounds": rounds, "max_new_tokens": max_new_tokens,
            "requests_per_s": {k: summary([requests / t for t in ts]) for k, ts in times.items()},
            "ratio": {"16_clients/one_client": ratio_summary(times["one_client"], times["16_clients"])},
            "mean_batch": sum(batches) / len(batches)}


def _ratios(part: dict) -> str:
    return ", ".join(f"{k} {v['median']:.2f}x" for k, v in part["ratio"].items())


def _multitask_fit(tasks: int, steps: int, rows: int, rounds: int) -> dict:
    import lightning as L

    from peftlab.data import PeftDataModule
    from peftlab.methods import LoRA
    from peftlab.multitask import MultiTask

    lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    prompts = {f"task{i}": f"Task {i}. Movie review: {{text}}\nAnswer:" for i in range(tasks)}
    common = dict(source="packaged:rotten_tomatoes", task="causal_lm", tokenizer=BACKBONE, response_template=" {label}",
                  max_length=64, max_train_samples=rows * steps, max_eval_samples=4, shuffle=False)

    def trainer():
        return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)

    def separate():
        for prompt in prompts.values():
            trainer().fit(LoRA(backbone=BACKBONE, task="causal_lm", **lora),
                          datamodule=PeftDataModule(batch_size=rows, prompt_template=prompt, **common))

    def together():
        data = PeftDataModule(batch_size=rows * tasks, tasks={n: {"prompt_template": p} for n, p in prompts.items()},
                              **common)
        model = MultiTask(backbone=BACKBONE, task="causal_lm",
                          tasks={n: {"class_path": "peftlab.methods.LoRA", "init_args": lora} for n in prompts})
        trainer().fit(model, datamodule=data)

    times = {"separate": [], "multitask": []}
    for _ in range(rounds):
        times["separate"].append(_time(separate))
        times["multitask"].append(_time(together))
    return {"tasks": tasks, "steps": steps, "rows_per_task": rows,
            "seconds": {k: summary(v) for k, v in times.items()},
            "ratio": {"separate/multitask": ratio_summary(times["separate"], times["multitask"])}}


def bench_multi_adapter(smoke: bool) -> dict:
    from peftlab.api import load_adapters, load_run
    from peftlab.methods import LoRA, PromptTuning

    count = 2 if smoke else 8
    rounds = 2 if smoke else 4
    out = {"backbone": BACKBONE, "adapters": count}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log(f"multi_adapter: exporting {count} LoRA and {count} prompt-tuning adapters")
        lora = _export_adapters(tmp, LoRA, count, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
        prompt = _export_adapters(tmp, PromptTuning, count, num_virtual_tokens=20)
        names = list(lora)
        adapters = load_adapters(dict(list(lora.items())[:-1]))
        last_name, last_path = names[-1], lora[names[-1]]
        times = {"load_run": [], "add": [], "switch": []}
        for i in range(1 if smoke else 3):
            times["load_run"].append(_time(lambda: load_run(last_path)))
            if i:
                adapters.remove(last_name)
            times["add"].append(_time(lambda: adapters.add(last_name, last_path)))
            target = names[i % len(names)]
            times["switch"].append(_time(lambda: adapters.switch(target)))  # noqa: B023 - called right here
        out["switch"] = {"seconds": {k: summary(v) for k, v in times.items()},
                         "ratio": {"load_run/switch": ratio_summary(times["load_run"], times["switch"]),
                                   "load_run/add": ratio_summary(times["load_run"], times["add"])}}
        log(f"  load_run {out['switch']['seconds']['load_run']['median']:.2f} s, add "
            f"{out['switch']['seconds']['add']['median'] * 1000:.0f} ms, switch "
            f"{out['switch']['seconds']['switch']['median'] * 1e6:.0f} us")
        length = 16 if smoke else 32
        with torch.inference_mode():
            out["mixed_lora"] = _mixed(adapters, names, 2, length, rounds)
            log("  LoRA mixed: " + _ratios(out["mixed_lora"]))
            prompts = load_adapters(prompt)
            out["mixed_prompt"] = _mixed(prompts, list(prompt), 2, length, rounds)
            log("  prompt mixed: " + _ratios(out["mixed_prompt"]))
            del prompts
        out["server"] = _server(adapters, names, 4 if smoke else 16, 1 if smoke else 2, 2 if smoke else 4)
        log(f"  server: 16 clients / one client {out['server']['ratio']['16_clients/one_client']['median']:.2f}x "
            f"(mean batch {out['server']['mean_batch']:.1f})")
    return out


def bench_multitask_fit(smoke: bool) -> dict:
    """``python benchmarks/run.py --only multitask_fit``: see ``multitask_fit`` in the module docstring."""
    out = {"backbone": BACKBONE, **_multitask_fit(2 if smoke else 4, 2 if smoke else 6, 2 if smoke else 4,
                                                  1 if smoke else 2)}
    log("multi-task fit: " + _ratios(out))
    return out
