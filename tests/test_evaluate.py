"""peftlab evaluate: the lm-eval LM wrapper (exact log-likelihoods for every kind of method), the shipped tasks,
the standard-task path on a local copy of a standard task's YAML, results on disk, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftlab.errors import PeftLabError

pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data" / "eval"
REVIEWS = [("A warm, funny and wise film.", "fresh"), ("Dull, long and pointless.", "rotten"),
           ("The cast is wonderful and the script sings.", "fresh"), ("A mess from start to finish.", "rotten"),
           ("Beautifully shot, deeply moving.", "fresh"), ("I wanted my two hours back.", "rotten")]


def _perturbed(module, seed=0):
    """``module`` with its trainable parameters moved off their initial values (a LoRA B of zeros would make
    the adapter a no-op and every comparison trivially true)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.eval()


def _run(tmp_path, backbone, method, **kw):
    """An exported (untrained, perturbed) run of ``method`` on the tiny Llama, loaded back with load_run."""
    from peftlab.api import load_run
    from peftlab.export import export_adapter

    module = _perturbed(method(backbone=backbone, task="causal_lm", **kw).build())
    export_adapter(module, tmp_path / "adapter")
    return load_run(str(tmp_path / "adapter")), tmp_path / "adapter"


class _Request:
    def __init__(self, *args):
        self.args = args


def _pairs():
    return [_Request(f"Movie review: {t}\nIs this review fresh or rotten? Answer:", f" {c}")
            for t, label in REVIEWS for c in ("fresh", "rotten")]


def _direct_loglikelihoods(module, tok, requests):
    """Each continuation's log-probability through ``module`` itself, one example at a time, no batching."""
    out = []
    for r in requests:
        context, continuation = r.args
        whole = tok.encode(context + continuation)
        n_ctx = len(tok.encode(context))
        ids = torch.tensor([whole[:-1]])
        with torch.no_grad():
            logits = module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]
        logprobs = logits.float().log_softmax(-1)[0]
        out.append(float(sum(logprobs[i - 1, whole[i]] for i in range(n_ctx, len(whole)))))
    return out


METHODS = {
    "prompt_tuning": ("PromptTuning", {"num_virtual_tokens": 4}),
    "prefix_tuning": ("PrefixTuning", {"num_virtual_tokens": 4}),
    "p_tuning": ("PTuning", {"num_virtual_tokens": 4}),
    "p_tuning_v2": ("PTuningV2", {"num_virtual_tokens": 3, "prefix_hidden_size": 8}),
    "adapters": ("BottleneckAdapter", {"bottleneck": 4}),
    "full": ("FullFineTuning", {}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_loglikelihoods_equal_a_direct_computation_through_the_module(tmp_path, tiny_llama, name):
    """Batched, sorted, right-padded scoring of the wrapper == one example at a time through the PeftModule."""
    import peftlab.methods as methods
    from peftlab.eval_lm import PeftLabLM

    cls, kw = METHODS[name]
    run, _ = _run(tmp_path, tiny_llama, getattr(methods, cls), **kw)
    lm = PeftLabLM.from_run(run, batch_size=5)
    requests = _pairs()
    got = [score for score, _ in lm.loglikelihood(requests)]
    want = _direct_loglikelihoods(run.module, run.module.tokenizer, requests)
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(g, 3) for g in got)) > 2  # real, different numbers


def test_merged_and_unmerged_lora_score_the_same(tmp_path, tiny_llama):
    from peftlab.eval_lm import PeftLabLM
    from peftlab.methods import LoRA

    run, _ = _run(tmp_path, tiny_llama, LoRA, r=4, target_modules=["q_proj", "v_proj"])
    tok = run.module.tokenizer
    unmerged = PeftLabLM.from_run(run, batch_size=4)
    merged = PeftLabLM(run.module.merged_model(), tok, batch_size=4)
    base = PeftLabLM(_base(tiny_llama), tok, batch_size=4)
    requests = _pairs()
    a = [s for s, _ in unmerged.loglikelihood(requests)]
    b = [s for s, _ in merged.loglikelihood(requests)]
    assert a == pytest.approx(b, abs=1e-4)
    assert max(abs(x - y) for x, y in zip(a, [s for s, _ in base.loglikelihood(requests)])) > 1e-3  # LoRA acts
    rolling = [_Request(t) for t, _ in REVIEWS]
    assert unmerged.loglikelihood_rolling(rolling) == pytest.approx(merged.loglikelihood_rolling(rolling), abs=1e-4)


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_rolling_windows_add_up_to_the_whole_text(tiny_llama, tokenizer_dir):
    """A text longer than max_length is scored in disjoint windows; with a window as long as the text, the sum is
    the text's log-likelihood after the prefix token, computed in one pass."""
    from transformers import AutoTokenizer

    from peftlab.eval_lm import PeftLabLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = _base(tiny_llama)
    text = " ".join(t for t, _ in REVIEWS)
    ids = [tok.bos_token_id, *tok.encode(text)]
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids[:-1]])).logits.float().log_softmax(-1)[0]
    whole = float(sum(lp[i - 1, ids[i]] for i in range(1, len(ids))))
    # a sum of ~100 fp32 terms: equal to a relative 1e-6
    assert PeftLabLM(model, tok, max_length=256).loglikelihood_rolling([_Request(text)]) == pytest.approx([whole],
                                                                                                       rel=1e-6)
    windowed = PeftLabLM(model, tok, max_length=16, batch_size=3).loglikelihood_rolling([_Request(text)])[0]
    assert windowed != pytest.approx(whole, abs=1e-3)  # shorter windows see less context: a different number


def test_generate_until_stops_at_the_stop_string_and_matches_unbatched(tmp_path, tiny_llama):
    from peftlab.eval_lm import PeftLabLM
    from peftlab.methods import PromptTuning

    run, _ = _run(tmp_path, tiny_llama, PromptTuning, num_virtual_tokens=4)
    requests = [_Request(f"Movie review: {t}\nAnswer:", {"until": ["e"], "max_gen_toks": 6}) for t, _ in REVIEWS]
    batched = PeftLabLM.from_run(run, batch_size=4).generate_until(requests)
    single = PeftLabLM.from_run(run, batch_size=1).generate_until(requests)
    assert batched == single
    assert all("e" not in g for g in batched)
    free = PeftLabLM.from_run(run, batch_size=4).generate_until(
        [_Request(r.args[0], {"until": [], "max_gen_toks": 6}) for r in requests])
    assert any("e" in g for g in free)  # the stop string does cut something


# ---------------------------------------------------------------------------------------------- the command
def test_evaluate_a_p_tuning_v2_run_writes_results_and_samples(tmp_path, tiny_llama, capsys):
    from peftlab.evaluate import evaluate_command
    from peftlab.methods import PTuningV2

    _, run_dir = _run(tmp_path, tiny_llama, PTuningV2, num_virtual_tokens=3, prefix_hidden_size=8)
    out = evaluate_command(str(run_dir), tasks=["peftlab_rotten_tomatoes_mc", "peftlab_rotten_tomatoes_gen"],
                           limit=4, batch_size=3, log_samples=True)
    directory = Path(out["directory"])
    assert directory.parent == run_dir / "eval"
    record = json.loads((directory / "results.json").read_text())
    mc, gen = record["results"]["peftlab_rotten_tomatoes_mc"], record["results"]["peftlab_rotten_tomatoes_gen"]
    assert 0 <= mc["acc,none"] <= 1 and "acc_stderr,none" in mc
    assert "exact_match,extract" in gen and "exact_match_stderr,extract" in gen
    assert record["n-samples"]["peftlab_rotten_tomatoes_mc"]["effective"] == 4
    assert record["versions_of_libraries"]["lm_eval"] and record["arguments"]["limit"] == 4
    samples = [json.loads(line) for line in (directory / "samples_peftlab_rotten_tomatoes_mc.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"doc", "resps", "acc"} <= set(samples[0])
    table = capsys.readouterr().out.splitlines()
    assert "| Task | Filter | n-shot | Metric | Value | Stderr | Docs |" in table  # (lm-eval's own prints A, B, C)
    assert f"| peftlab_rotten_tomatoes_mc | none | 0 | acc | {mc['acc,none']:.4f} | " \
           f"{mc['acc_stderr,none']:.4f} | 4 |" in table


def test_a_local_copy_of_a_standard_task_reads_its_own_format(tmp_path, tiny_llama, tokenizer_dir):
    """arc_easy's YAML from lm-eval, unchanged except that it reads a tiny local file in ARC's own format."""
    from peftlab.evaluate import evaluate_command

    out = evaluate_command(backbone=tiny_llama, tasks=[str(DATA / "arc_easy_local.yaml")], batch_size=4,
                           output_dir=str(tmp_path / "out"))
    result = out["results"]["arc_easy_local"]
    assert result["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)  # three questions
    assert {"acc_norm,none", "acc_stderr,none"} <= set(result)


def test_shipped_tasks_load_and_point_at_packaged_data():
    from peftlab.evaluate import shipped_tasks, task_config

    tasks = shipped_tasks()
    assert set(tasks) == {"peftlab_rotten_tomatoes_mc", "peftlab_rotten_tomatoes_gen"}
    for path in tasks.values():
        config = task_config(path)
        (data,) = config["dataset_kwargs"]["data_files"]["test"]
        assert Path(data).is_file() and Path(data).is_absolute()
        rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
        assert len(rows) == 400 and {r["label"] for r in rows} == {"fresh", "rotten"}


@pytest.mark.parametrize("kwargs, message", [
    # an unknown name is looked up in lm-eval's index of ~15,000 tasks, which takes 15-35 s to build here
    pytest.param({"tasks": ["peftlab_rotten_tomatoes_mcq"]}, "unknown task 'peftlab_rotten_tomatoes_mcq'. Did you "
                 "mean 'peftlab_rotten_tomatoes_mc'", marks=pytest.mark.slow),
    pytest.param({"tasks": ["helaswag"]}, "Did you mean 'hellaswag'", marks=pytest.mark.slow),
    ({"tasks": ["peftlab_rotten_tomatoes_mc"], "limit": 0}, "--limit must be positive"),
    ({"tasks": ["peftlab_rotten_tomatoes_mc"], "limit": 2.5}, "whole number"),
    ({"tasks": []}, "name at least one task"),
    ({"tasks": ["peftlab_rotten_tomatoes_mc"], "backbone": None}, "name a run"),
])
def test_bad_requests_fail_in_one_line_before_loading(kwargs, message, monkeypatch):
    from peftlab import evaluate

    monkeypatch.setattr("peftlab.backbones.load_backbone", lambda *a, **k: pytest.fail("loaded a model"))
    kwargs = {"backbone": "packaged:SmolLM2-135M-Instruct", **kwargs}
    with pytest.raises(PeftLabError, match=None) as err:
        evaluate.evaluate_command(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_task_files_and_runs_fail_in_one_line(tmp_path, tiny_bert, tiny_llama):
    from peftlab.evaluate import evaluate_command
    from peftlab.export import export_adapter
    from peftlab.methods import LoRA

    broken = tmp_path / "broken.yaml"
    broken.write_text("task: x\ndoc_to_text: [unclosed\n")
    with pytest.raises(PeftLabError, match="cannot be read"):
        evaluate_command(backbone="x", tasks=[str(broken)])
    missing = tmp_path / "missing.yaml"
    missing.write_text("task: x\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n")
    with pytest.raises(PeftLabError, match="names data file 'nowhere.jsonl', which does not exist"):
        evaluate_command(backbone="x", tasks=[str(missing)])
    with pytest.raises(PeftLabError, match="has no chat template"):
        evaluate_command(backbone=tiny_llama, tasks=["peftlab_rotten_tomatoes_mc"], apply_chat_template=True)
    classifier = LoRA(backbone=tiny_bert, task="classification", num_labels=2, r=2).build()
    export_adapter(classifier, tmp_path / "cls")
    with pytest.raises(PeftLabError, match="is a classification run"):
        evaluate_command(str(tmp_path / "cls"), tasks=["peftlab_rotten_tomatoes_gen"])


def test_unsupported_lm_eval_version_is_refused(monkeypatch):
    from peftlab import evaluate

    monkeypatch.setattr(evaluate.metadata, "version", lambda name: "0.3.0")
    with pytest.raises(PeftLabError, match=r"lm-eval 0.3.0 is installed; peftlab evaluate supports lm-eval>=0.4,<0.5"):
        evaluate.evaluate_command(backbone="x", tasks=["peftlab_rotten_tomatoes_mc"])


def test_chat_template_hook_uses_the_tokenizer_template(tiny_llama, tokenizer_dir):
    from transformers import AutoTokenizer

    from peftlab.eval_lm import PeftLabLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    lm = PeftLabLM(_base(tiny_llama), tok)
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    assert lm.tokenizer_name == tok.name_or_path.replace("/", "__")
    assert lm.chat_template(True) == tok.chat_template and lm.chat_template(False) is None


@pytest.mark.slow  # two loads of SmolLM2 (~45 s on a shared CPU)
def test_cli_evaluates_a_smollm2_lora_run_offline(tmp_path, capsys):
    """The issue's smoke run: `peftlab evaluate RUN --tasks <shipped> --limit` on a packaged SmolLM2 LoRA run (the
    base-model row, --backbone alone, is the same path with the tiny Llama in the arc_easy test)."""
    from peftlab.cli import main
    from peftlab.export import export_adapter
    from peftlab.methods import LoRA

    module = _perturbed(LoRA(backbone="packaged:SmolLM2-135M-Instruct", task="causal_lm", r=2, target_modules=["q_proj"])
                        .build())
    export_adapter(module, tmp_path / "run" / "adapter" / "best")
    tasks = ["--tasks", "peftlab_rotten_tomatoes_mc", "peftlab_rotten_tomatoes_gen", "--limit", "3"]
    main(["evaluate", str(tmp_path / "run"), *tasks, "--batch_size", "3", "--log_samples"])
    out = capsys.readouterr().out
    assert "peftlab_rotten_tomatoes_mc" in out and "exact_match" in out
    (run_dir,) = (tmp_path / "run" / "eval").iterdir()
    tuned = json.loads((run_dir / "results.json").read_text())
    assert tuned["arguments"]["run"] == str(tmp_path / "run") and tuned["arguments"]["limit"] == 3
    rows = [json.loads(line) for line in (run_dir / "samples_peftlab_rotten_tomatoes_gen.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 3 and all(r["target"] in ("fresh", "rotten") for r in rows)
    assert 0 <= tuned["results"]["peftlab_rotten_tomatoes_gen"]["exact_match,extract"] <= 1


def test_evaluate_help_is_generated_from_the_signature(capsys):
    from peftlab.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--tasks" in out and "--num_fewshot" in out and "RUN" in out and "--backbone" in out


def test_a_chat_run_is_evaluated_in_its_recorded_chat_template(tmp_path, tiny_llama):
    """A run whose peftlab_meta.json records a chat prompt format gets lm-eval's chat path by default, with the
    template it was trained with (not the tokenizer's, which the tiny tokenizer does not even have)."""
    from peftlab.adapters import rewrite_meta
    from peftlab.api import load_run
    from peftlab.eval_lm import PeftLabLM
    from peftlab.evaluate import evaluate_command
    from peftlab.methods import LoRA

    _, run_dir = _run(tmp_path, tiny_llama, LoRA, r=2, target_modules=["q_proj"])
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    rewrite_meta(run_dir, prompt_format={"kind": "chat", "chat_template": template})
    lm = PeftLabLM.from_run(load_run(str(run_dir)))
    assert lm.chat and lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant]"
    out = evaluate_command(str(run_dir), tasks=["peftlab_rotten_tomatoes_mc"], limit=2, log_samples=True)
    record = json.loads((Path(out["directory"]) / "results.json").read_text())
    assert record["arguments"]["apply_chat_template"] is True
    (sample, _) = [json.loads(line) for line in
                   (Path(out["directory"]) / "samples_peftlab_rotten_tomatoes_mc.jsonl").read_text().splitlines()]
    assert sample["arguments"][0][0].startswith("[user] Movie review:")  # (context, continuation) pairs
    # the run's training system prompt leads every prompt (unless the task's history brings its own)
    rewrite_meta(run_dir, prompt_format={"kind": "chat", "chat_template": template, "system_prompt": "Be brief."})
    lm = PeftLabLM.from_run(load_run(str(run_dir)))
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "[system] Be brief.\n[user] hi\n[assistant]"
    assert lm.apply_chat_template([{"role": "system", "content": "Task."}, {"role": "user", "content": "hi"}]) \
        == "[system] Task.\n[user] hi\n[assistant]"
    plain = evaluate_command(str(run_dir), tasks=["peftlab_rotten_tomatoes_mc"], limit=2, apply_chat_template=False)
    assert json.loads((Path(plain["directory"]) / "results.json").read_text())["arguments"]["apply_chat_template"] \
        is False
