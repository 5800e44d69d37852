"""Chat data (``data.task: chat``): conversations in three formats, rendered with a chat template, masked by turn.

Formats (``data.chat_format``; ``auto`` picks one from the columns):

* ``messages``: OpenAI / Hugging Face ``[{"role": ..., "content": ...}]`` in a ``messages`` column; roles
  ``system``, ``user``, ``assistant``, ``tool``;
* ``sharegpt``: ``[{"from": ..., "value": ...}]`` in a ``conversations`` column; ``human``/``gpt``/``system``/
  ``tool`` are mapped to those roles (``data.chat_roles`` adds or changes names);
* ``alpaca``: ``instruction``, optional ``input`` and ``output`` columns, rendered as one user turn (the input
  after a blank line, only when it is not empty) and one assistant turn.

Every conversation is rendered once with the chat template (the tokenizer's, or ``data.chat_template``) and
tokenized once. The loss mask is found on the rendered text: the characters of assistant turn ``i`` are the ones
the template adds between ``messages[:i]`` with the generation prompt and ``messages[:i + 1]`` (the reply and the
template's end-of-turn marker, trailing whitespace excluded), mapped to tokens through the tokenizer's offset
mapping. Re-tokenizing pieces would break at token boundaries; this never does, and needs no ``{% generation %}``
markers in the template (SmolLM2's has none).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

from peftlab.data.formats import IGNORE_INDEX
from peftlab.errors import PeftLabError, did_you_mean

ChatFormat = Literal["auto", "messages", "sharegpt", "alpaca"]
TrainOn = Literal["assistant", "last_assistant", "all"]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool"}
#: the column each format reads (alpaca: instruction/input/output)
COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output")}


def detect_format(columns: Sequence[str], forced: ChatFormat = "auto") -> str:
    """The chat format of a dataset with these columns (``forced`` unless ``auto``); an error names the options."""
    if forced != "auto":
        missing = [c for c in COLUMNS[forced] if c not in columns]
        if missing:
            raise PeftLabError(f"data.chat_format {forced} reads column(s) {missing}, which the data lacks "
                               f"(it has: {', '.join(columns)}); fix the data or data.chat_format")
        return forced
    for fmt, needed in COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    raise PeftLabError(f"data.task chat found no conversation columns in {', '.join(columns)}; give a 'messages' "
                       "column (role/content), a ShareGPT 'conversations' column (from/value) or Alpaca "
                       "'instruction'/'output' columns")


def resolve_template(tokenizer, chat_template: str | None, tokenizer_name: str = "") -> str:
    """The Jinja chat template to render with: ``chat_template`` (a file or the template itself), else the
    tokenizer's own; a tokenizer without one and no ``chat_template`` is refused naming the option."""
    if chat_template:
        if "{" not in chat_template and os.path.isfile(os.path.expanduser(chat_template)):
            with open(os.path.expanduser(chat_template), encoding="utf-8") as f:
                return f.read()
        if "{" not in chat_template:
            raise PeftLabError(f"data.chat_template {chat_template!r} is neither a file nor a Jinja template; "
                               "give a path to a .jinja file or the template text")
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise PeftLabError(f"the tokenizer of {tokenizer_name or 'this backbone'} has no chat template; set "
                           "data.chat_template to a Jinja template (a file or a string), e.g. ChatML's")
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()))
    return template


def to_messages(row: Mapping, fmt: str, *, roles: Mapping[str, str] | None = None,
                system_prompt: str | None = None, where: str = "a row") -> list[dict]:
    """One row as ``[{"role", "content"}]`` with roles in :data:`ROLES`; ``system_prompt`` is put first when the
    conversation has no system message. ``where`` names the row in errors ("row 3 of train")."""
    roles = {**(SHAREGPT_ROLES if fmt == "sharegpt" else {r: r for r in ROLES}), **(roles or {})}
    if fmt == "alpaca":
        instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
        if instruction is None or not str(instruction).strip():
            raise PeftLabError(f"{where}: 'instruction' is empty; fill it or drop the row")
        user = str(instruction) + (f"\n\n{extra}" if extra is not None and str(extra).strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        column, role_key, content_key = (("messages", "role", "content") if fmt == "messages"
                                         else ("conversations", "from", "value"))
        turns = row.get(column)
        if not isinstance(turns, list) or not turns:
            raise PeftLabError(f"{where}: column {column!r} is {'empty' if not turns else type(turns).__name__}, "
                               f"not a list of {{{role_key}, {content_key}}} turns; fix or drop the row")
        messages = []
        for turn in turns:
            if not isinstance(turn, Mapping) or role_key not in turn:
                raise PeftLabError(f"{where}: a turn {turn!r} has no {role_key!r} key; each turn is "
                                   f"{{{role_key}: ..., {content_key}: ...}}")
            name = turn[role_key]
            if name not in roles:
                raise PeftLabError(f"{where}: unknown role {name!r} (known: {', '.join(sorted(roles))});"
                                   f"{did_you_mean(name, roles)} map it with data.chat_roles {{{name}: assistant}}")
            message = {"role": roles[name], "content": turn.get(content_key)}
            for key in ("tool_calls", "name", "tool_call_id"):  # kept so the template can render tool use
                if fmt == "messages" and turn.get(key) is not None:
                    message[key] = turn[key]
            messages.append(message)
    for m in messages:
        if m["content"] is None and not m.get("tool_calls"):
            raise PeftLabError(f"{where}: the {m['role']} turn has content null (JSON null would train the word "
                               "'None'); fill it or drop the row")
        if m["content"] is not None:
            m["content"] = str(m["content"])
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def check_trainable(messages: list[dict], where: str) -> None:
    """A training conversation needs an assistant turn, non-empty replies and must not end on a user turn."""
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise PeftLabError(f"{where}: the conversation has no assistant turn, so nothing to train on; add the "
                           "reply or drop the row")
    if any(not (m["content"] or "").strip() and not m.get("tool_calls") for m in replies):
        raise PeftLabError(f"{where}: an assistant turn is empty (it would train the end-of-turn token alone); "
                           "fill it or drop the row")
    if messages[-1]["role"] == "user":
        raise PeftLabError(f"{where}: the conversation ends on a user turn with no reply; add the assistant's "
                           "reply or drop the last turn")


def check_conversations(ds, fmt_of, *, roles: Mapping[str, str] | None = None) -> None:
    """Read every conversation of every split (``fmt_of(columns)`` gives its format) and refuse the first bad
    one in one line, before any tokenizing: unknown roles, null turns, no or empty replies, a trailing user turn."""
    for split, d in ds.items():
        fmt = fmt_of(d.column_names)
        columns = [c for c in ("messages", "conversations", "instruction", "input", "output") if c in d.column_names]
        for i, values in enumerate(zip(*(d[c] for c in columns))):
            where = f"row {i} of {split}"
            check_trainable(to_messages(dict(zip(columns, values)), fmt, roles=roles, where=where), where)


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja raises TemplateError, and templates raise_exception(...)
        raise PeftLabError(f"the chat template failed on a conversation: {err}; fix the data or "
                           "data.chat_template") from err


def assistant_spans(tokenizer, template: str, messages: list[dict], *, train_on: TrainOn = "assistant",
                    train_on_eos: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry the loss: each assistant reply with the
    template's end-of-turn marker (``train_on_eos``), found by rendering the conversation prefix by prefix."""
    text = render(tokenizer, template, messages)
    if train_on == "all":
        return text, [(0, len(text))]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, template, messages[:i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise PeftLabError("the chat template does not render a conversation as a continuation of its earlier "
                               "turns (it rewrites them), so the assistant turns cannot be located; use a template "
                               "that does (data.chat_template)")
        end = len(through.rstrip())
        if not train_on_eos:
            content = (message["content"] or "").strip()
            found = through.rfind(content, len(before)) if content else -1
            end = found + len(content) if found >= 0 else end
        spans.append((len(before), end))
    return text, spans[-1:] if train_on == "last_assistant" else spans


def _drop_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """``messages`` without its oldest exchange (system messages kept; it restarts at the next user turn), or
    ``None`` when only the last exchange is left."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    for i in range(1, len(rest)):
        if rest[i]["role"] == "user":
            return head + rest[i:]
    return None


def tokenize_chat(batch, indices, *, tokenizer, template: str, fmt: str, roles: Mapping[str, str] | None,
                  system_prompt: str | None, train_on: TrainOn, train_on_eos: bool, max_length: int,
                  split: str, prompt_only: bool = False) -> dict:
    """A batch of rows as ``input_ids``/``attention_mask``/``labels`` (+ ``_truncated``): one sequence per
    conversation, every assistant turn in the loss at once (see the module docstring).

    Over-long conversations keep the system prompt and drop their oldest exchanges first; one whose last exchange
    alone is too long is cut at the end (``prompt_only``: at the start). ``prompt_only`` (predict) renders the
    conversation up to its last user turn with the generation prompt and no labels."""
    if not getattr(tokenizer, "is_fast", False):
        raise PeftLabError("data.task chat maps the rendered text to tokens by offsets, which needs a fast "
                           "(tokenizers-backed) tokenizer; this backbone's is not")
    keys = list(batch)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "_truncated": []}
    for index, values in zip(indices, zip(*(batch[k] for k in keys))):
        where = f"row {index} of {split}"
        messages = to_messages(dict(zip(keys, values)), fmt, roles=roles, system_prompt=system_prompt, where=where)
        if prompt_only:
            while messages and messages[-1]["role"] == "assistant":  # the reference reply is what gets predicted
                messages = messages[:-1]
            if not messages or messages[-1]["role"] == "system":
                raise PeftLabError(f"{where}: the conversation has no user turn to answer")
        else:
            check_trainable(messages, where)
        truncated = 0
        while True:
            if prompt_only:
                text, spans = render(tokenizer, template, messages, add_generation_prompt=True), []
            else:
                text, spans = assistant_spans(tokenizer, template, messages, train_on=train_on,
                                              train_on_eos=train_on_eos)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) <= max_length:
                break
            truncated = 1
            shorter = _drop_oldest_turn(messages)
            if shorter is None:
                break
            messages = shorter
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                  for tok, (start, _) in zip(ids, offsets)]
        if len(ids) > max_length:  # the last exchange alone is too long
            keep = slice(len(ids) - max_length, None) if prompt_only else slice(0, max_length)
            ids, labels = ids[keep], labels[keep]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["_truncated"].append(truncated)
    return out


def prompt_text(tokenizer, template: str, messages: list[dict]) -> str:
    """The text a model continues to answer ``messages``: the conversation with the generation prompt."""
    return render(tokenizer, template, messages, add_generation_prompt=True)


def last_user_turn(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
