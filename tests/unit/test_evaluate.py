"""peftlab evaluate: the lm-eval LM wrapper (exact log-likelihoods for every kind of method), the shipped tasks,
the standard-task path on a local copy of a standard task's YAML, results on disk, and the one-line refusals.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_evaluate_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import exported_perturbed
from peftlab.errors import PeftLabError

pytest.importorskip("lm_eval")


REVIEWS = [("A warm, funny and wise film.", "fresh"), ("Dull, long and pointless.", "rotten"),
           ("The cast is wonderful and the script sings.", "fresh"), ("A mess from start to finish.", "rotten"),
           ("Beautifully shot, deeply moving.", "fresh"), ("I wanted my two hours back.", "rotten")]


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
    run, _ = exported_perturbed(tmp_path, tiny_llama, getattr(methods, cls), **kw)
    lm = PeftLabLM.from_run(run, batch_size=5)
    requests = _pairs()
    got = [score for score, _ in lm.loglikelihood(requests)]
    want = _direct_loglikelihoods(run.module, run.module.tokenizer, requests)
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(g, 3) for g in got)) > 2  # real, different numbers


def test_merged_and_unmerged_lora_score_the_same(tmp_path, tiny_llama):
    from peftlab.eval_lm import PeftLabLM
    from peftlab.methods import LoRA

    run, _ = exported_perturbed(tmp_path, tiny_llama, LoRA, r=4, target_modules=["q_proj", "v_proj"])
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

    run, _ = exported_perturbed(tmp_path, tiny_llama, PromptTuning, num_virtual_tokens=4)
    requests = [_Request(f"Movie review: {t}\nAnswer:", {"until": ["e"], "max_gen_toks": 6}) for t, _ in REVIEWS]
    batched = PeftLabLM.from_run(run, batch_size=4).generate_until(requests)
    single = PeftLabLM.from_run(run, batch_size=1).generate_until(requests)
    assert batched == single
    assert all("e" not in g for g in batched)
    free = PeftLabLM.from_run(run, batch_size=4).generate_until(
        [_Request(r.args[0], {"until": [], "max_gen_toks": 6}) for r in requests])
    assert any("e" in g for g in free)  # the stop string does cut something


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


def test_evaluate_help_is_generated_from_the_signature(capsys):
    from peftlab.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--tasks" in out and "--num_fewshot" in out and "RUN" in out and "--backbone" in out
