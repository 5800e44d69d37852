"""Turning rows into model inputs for each task type.

* classification: ``text`` (+ optional ``text_pair``) -> ``input_ids``/``attention_mask`` and an integer ``labels``;
* causal_lm: ``prompt_template`` and ``response_template`` (``str.format`` over the row's columns) ->
  one sequence ``prompt + response + EOS``; the loss covers the response only (``loss_on="response"``)
  or every token (``loss_on="all"``, plain language modelling, e.g. ``prompt_template="{text}"``,
  ``response_template=""``);
* seq2seq: prompt -> encoder ``input_ids``, response -> decoder ``labels``.
"""

from __future__ import annotations

import string

from peftlab.errors import PeftLabError

IGNORE_INDEX = -100


def template_fields(template: str) -> list[str]:
    """Column names used by a ``str.format`` template."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as err:
        raise PeftLabError(f"invalid template {template!r}: {err}; escape literal braces as {{{{ and }}}}") from err


def render(template: str, row: dict) -> str:
    return template.format(**row) if template else ""


def tokenize_classification(batch, tokenizer, text_column, text_pair_column, max_length):
    texts = [str(t) if t is not None else "" for t in batch[text_column]]
    pairs = None
    if text_pair_column:
        pairs = [str(t) if t is not None else "" for t in batch[text_pair_column]]
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    if "labels" in batch:  # inputs alone (data.predict_source) have none
        enc["labels"] = batch["labels"]
    return dict(enc)


def _rows(batch):
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def tokenize_causal_lm(batch, tokenizer, prompt_template, response_template, loss_on, max_length, prompt_only=False):
    """Prompt + response + EOS; prompt tokens are masked out of the loss unless ``loss_on == 'all'``.

    Over-long examples keep the response and lose the start of the prompt (the response carries the
    loss); a response longer than ``max_length`` is cut at the end.
    """
    out = {"input_ids": [], "attention_mask": [], "labels": [], "_truncated": []}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in _rows(batch):
        prompt_ids = tokenizer(render(prompt_template, row), add_special_tokens=True)["input_ids"]
        full = len(prompt_ids)
        if prompt_only:
            ids = prompt_ids[-max_length:]
            labels = [IGNORE_INDEX] * len(ids)
        else:
            response = render(response_template, row)
            resp_ids = (tokenizer(response, add_special_tokens=False)["input_ids"] if response else []) + eos
            resp_ids = resp_ids[:max_length]
            prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(resp_ids)):] if max_length > len(resp_ids) else []
            full += len(resp_ids)
            ids = prompt_ids + resp_ids
            if loss_on == "all":
                labels = list(ids)
            else:
                labels = [IGNORE_INDEX] * len(prompt_ids) + resp_ids
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["_truncated"].append(int(len(ids) < full))
    return out


def tokenize_seq2seq(batch, tokenizer, prompt_template, response_template, max_length, max_target_length,
                     prompt_only=False):
    rows = _rows(batch)
    enc = tokenizer([render(prompt_template, r) for r in rows], truncation=True, max_length=max_length)
    if prompt_only:
        return dict(enc)
    targets = tokenizer(
        text_target=[render(response_template, r) for r in rows], truncation=True, max_length=max_target_length
    )
    enc["labels"] = targets["input_ids"]
    return dict(enc)
