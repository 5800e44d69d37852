"""Python API: load a finished run for inference in one call.

    from peftlab.api import load_run
    run = load_run("runs/quickstart/version_0")          # or .../adapter/best, or any exported adapter
    run.predict(["A moving, beautifully shot film.", "Dull and far too long."])
    # [{'label': 'fresh', 'probs': {'rotten': 0.08, 'fresh': 0.92}}, ...]

Generative runs answer in the format they were trained in (the chat template, or the prompt template), with
generation settings from :mod:`peftlab.generation`; chat runs also answer whole conversations
(``run.chat(messages)``). See docs/chat.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftlab.adapters import adapter_directory, load_weights, read_meta, task_directories
from peftlab.backbones import is_decoder_only
from peftlab.errors import PeftLabError
from peftlab.generation import GenerationSettings, length_groups


def build_module(meta: dict, backbone: str | None = None):
    """Rebuild the (untrained) method module described by an adapter's ``peftlab_meta.json``."""
    from peftlab.methods.registry import construct_from_meta

    module = construct_from_meta(meta, backbone)
    try:
        return module.build()
    except PeftLabError as err:
        if backbone and backbone != meta.get("backbone"):
            raise PeftLabError(f"the adapter was trained on {meta.get('backbone')!r} and does not fit backbone "
                               f"{backbone!r}: {err}") from err
        raise


class Run:
    """A trained method ready for inference: ``module`` (a PeftModule in eval mode), its label names and the
    prompt format it was trained with (``prompt_format``: the chat template or the prompt/response templates,
    from the adapter's ``peftlab_meta.json``), which :meth:`predict` and :meth:`chat` apply."""

    def __init__(self, module, label_names: list[str] | None, directory: Path, max_length: int = 512,
                 prompt_format: dict | None = None):
        self.module = module.eval()
        self.label_names = label_names
        self.directory = directory
        self.max_length = max_length
        self.prompt_format = prompt_format

    @property
    def is_chat(self) -> bool:
        return (self.prompt_format or {}).get("kind") == "chat"

    def format_prompt(self, text) -> str:
        """``text`` as the model saw inputs in training: a user turn in the chat template (chat runs; a list of
        messages is a whole conversation), or ``prompt_template`` filled in (its one field, or a dict of columns)."""
        fmt = self.prompt_format or {}
        if fmt.get("kind") == "chat":
            from peftlab.data import chat

            messages = list(text) if isinstance(text, list) else [{"role": "user", "content": str(text)}]
            if fmt.get("system_prompt") and messages[0].get("role") != "system":
                messages.insert(0, {"role": "system", "content": fmt["system_prompt"]})
            return chat.prompt_text(self.module.tokenizer, fmt["chat_template"], messages)
        if fmt.get("kind") == "template":
            from peftlab.data.formats import render, template_fields

            template = fmt["prompt_template"]
            if isinstance(text, dict):
                return render(template, text)
            fields = sorted(set(template_fields(template)))
            if len(fields) != 1:
                raise PeftLabError(f"the run's prompt_template {template!r} has fields {fields}: pass each input as a "
                                   "dict of them, or raw=True to send the text as it is")
            return render(template, {fields[0]: text})
        return str(text)

    def adds_special_tokens(self, raw: bool = False) -> bool:
        """Whether this run's prompts are tokenized with the tokenizer's special tokens (BOS, ...): a chat template
        writes its own, so a templated chat prompt gets none added; prompt templates were trained with them."""
        return not (self.is_chat and not raw)

    @property
    def pads_left(self) -> bool:
        """Decoder-only models read the last position (classification) or continue it (generation)."""
        module = self.module
        return module.task == "causal_lm" or (module.task == "classification"
                                              and is_decoder_only(module.hparams.backbone))

    def encode(self, texts: list, *, add_special_tokens: bool | list[bool] = True):
        """The model inputs of ``texts`` (already in their final form), padded on the side the task reads and cut
        to ``max_length`` from the side generation does not continue; ``add_special_tokens`` per text or for all."""
        module, tok = self.module, self.module.tokenizer
        chunk = [str(t) for t in texts]
        tok.padding_side = "left" if self.pads_left else "right"
        # an over-long prompt loses its start, never the end that generation continues
        tok.truncation_side = "left" if module.task == "causal_lm" else "right"
        try:
            if not isinstance(add_special_tokens, bool) and len(set(add_special_tokens)) == 1:
                add_special_tokens = bool(add_special_tokens[0])  # one tokenizer call for the batch
            if isinstance(add_special_tokens, bool):
                return tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                           add_special_tokens=add_special_tokens)
            if len(add_special_tokens) != len(chunk):
                raise PeftLabError(f"add_special_tokens has {len(add_special_tokens)} entries for {len(chunk)} texts")
            rows = [tok(t, truncation=True, max_length=self.max_length, add_special_tokens=bool(s))["input_ids"]
                    for t, s in zip(chunk, add_special_tokens)]
            return tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = tok.truncation_side = "right"

    @torch.no_grad()
    def predict(self, texts: list, batch_size: int = 32, max_new_tokens: int | None = None, *, raw: bool = False,
                add_special_tokens: bool | list[bool] | None = None, generation: GenerationSettings | None = None,
                streamer=None, **settings) -> list[dict]:
        """Class and probabilities (classification) or generated text (causal LM / seq2seq / chat) for each text.

        Generative runs put each text in the training format first (:meth:`format_prompt`) unless ``raw``.
        ``add_special_tokens`` (one for all texts, or one per text) overrides :meth:`adds_special_tokens`: pass
        False for a text that already holds them (one a chat template rendered).
        ``generation`` and keyword settings (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
        ``top_k``, ``repetition_penalty``, ``stop``, ``seed``: :class:`peftlab.generation.GenerationSettings`)
        say how text is generated; ``streamer`` (one text only): a transformers streamer that receives the answer's
        tokens as they are generated."""
        module = self.module
        if streamer is not None and (len(texts) != 1 or module.task == "classification"):
            raise PeftLabError(f"Run.predict streams one generated answer at a time; got {len(texts)} texts for a "
                               f"{module.task} run")
        prompts = list(texts) if raw or module.task == "classification" else [self.format_prompt(t) for t in texts]
        special = self.adds_special_tokens(raw) if add_special_tokens is None else add_special_tokens
        special = [special] * len(prompts) if isinstance(special, bool) else list(special)
        if len(special) != len(prompts):
            raise PeftLabError(f"add_special_tokens has {len(special)} entries for {len(prompts)} texts")
        exact = not self.pads_left or type(module).pads_exactly
        lengths = [0] * len(prompts) if exact else \
            [len(self.encode([p], add_special_tokens=s)["input_ids"][0]) for p, s in zip(prompts, special)]
        rows = length_groups(lengths, exact)
        out: list[dict | None] = [None] * len(prompts)
        saved = getattr(module, "generation", None)
        module.generation = GenerationSettings.from_kwargs(generation, max_new_tokens=max_new_tokens, **settings)
        module.streamer = streamer
        try:
            for group in rows:
                for start in range(0, len(group), batch_size):
                    index = group[start:start + batch_size]
                    batch = self.encode([prompts[i] for i in index], add_special_tokens=[special[i] for i in index])
                    batch = {k: v.to(module.device) for k, v in batch.items()}
                    if module.task == "classification":
                        probs = module(**batch).logits.float().softmax(-1).cpu()
                        names = self.label_names or [str(i) for i in range(probs.shape[1])]
                        results = [{"label": names[int(p.argmax())],
                                    "probs": {n: float(q) for n, q in zip(names, p)}} for p in probs]
                    else:
                        results = [{"generated": t} for t in module.predict_step(batch, 0)["text"]]
                    for i, result in zip(index, results):
                        out[i] = result
        finally:
            module.generation, module.streamer = saved, None
        return out

    @torch.no_grad()
    def chat(self, messages: list[dict], *, generation: GenerationSettings | None = None, stream: bool = False,
             **settings) -> str:
        """The model's reply to a conversation (``[{"role", "content"}]``, ending on a user turn) in the run's chat
        template; ``stream`` prints the tokens as they are generated. Settings as for :meth:`predict`."""
        if self.module.task != "causal_lm":
            raise PeftLabError(f"Run.chat needs a causal LM run; this one is {self.module.task}")
        if not self.is_chat:
            raise PeftLabError("this run was not trained on chat data (data.task chat), so it has no chat template; "
                               "use Run.predict")
        if not messages or messages[-1].get("role") != "user":
            raise PeftLabError("Run.chat answers a conversation that ends on a user turn; add the user's message")
        from peftlab.generation import generate

        module, tok = self.module, self.module.tokenizer
        tok.truncation_side = "left"  # a long conversation loses its oldest tokens, never the generation prompt
        batch = tok([self.format_prompt(list(messages))], add_special_tokens=False, return_tensors="pt",
                    truncation=True, max_length=self.max_length)
        tok.truncation_side = "right"
        settings_ = GenerationSettings.from_kwargs(generation, **settings)
        if not settings_.max_new_tokens:
            settings_ = GenerationSettings.from_kwargs(settings_, max_new_tokens=module.hparams.max_new_tokens)
        streamer = None
        if stream:
            from transformers import TextStreamer

            streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        return generate(module.model, tok, batch["input_ids"].to(module.device),
                        batch["attention_mask"].to(module.device), settings_, streamer=streamer)[0]


def load_adapters(adapters: dict | str, backbone: str | None = None, device: str | None = None):
    """Load several trained runs or exported adapters onto **one** shared backbone: an
    :class:`~peftlab.adapter_set.AdapterSet` (``predict(texts, adapter="name")``, ``switch``, ``add``, ``remove``).

    Args:
        adapters: ``{name: run directory, adapter directory or a loaded Run}``, or the directory of a multi-task
            run (:class:`peftlab.multitask.MultiTask`): every task's adapter, named by its task.
        backbone: use this backbone instead of the recorded one (as in :func:`load_run`).
        device: where the backbone and adapters live (default: where loading put them, usually the CPU).
    """
    from peftlab.adapter_set import AdapterSet

    if isinstance(adapters, (str, Path)):
        tasks = task_directories(adapter_directory(Path(adapters)))
        if not tasks:
            raise PeftLabError(f"{adapters} is not a multi-task run; give load_adapters a {{name: run or adapter "
                               "directory}} mapping")
        adapters = {name: str(path) for name, path in tasks.items()}
    return AdapterSet(adapters, backbone=backbone, device=device, make_run=run_of)


def run_of(module, meta: dict, directory: Path | None) -> Run:
    """The :class:`Run` of a built, loaded ``module`` and its adapter's ``peftlab_meta.json`` (``{}`` for none)."""
    return Run(module, meta.get("label_names"), directory, prompt_format=meta.get("prompt_format"))


def load_run(path: str, backbone: str | None = None) -> Run:
    """Load a run directory or an exported adapter directory for inference.

    Args:
        path: ``runs/<name>/version_N`` (uses ``adapter/best``, else ``adapter/last``) or an adapter directory.
        backbone: use this backbone instead of the recorded one (e.g. a local copy of a hub model).
    """
    directory = adapter_directory(Path(path))
    tasks = task_directories(directory)
    if tasks:
        raise PeftLabError(f"{path} is a multi-task run with one adapter per task ({', '.join(tasks)}): load one, "
                           f"load_run('{tasks[next(iter(tasks))]}'), or all of them with load_adapters('{path}')")
    meta = read_meta(directory)
    module = build_module(meta, backbone)
    load_weights(module, directory)
    return run_of(module, meta, directory)


def chat_command(run: str, /, message: str | None = None, system_prompt: str | None = None,
                 backbone: str | None = None, generation: GenerationSettings | None = None) -> str | None:
    """Talk to a trained chat adapter in the terminal, in its chat template, streaming the reply.

    Type a message and press Enter; ``/reset`` starts a new conversation, ``/exit`` (or Ctrl-D) ends. With
    ``--message`` it answers that one message, prints the reply and exits (for scripts).

    Args:
        run: a run directory (``runs/<name>/version_N``) or an exported adapter directory of a ``data.task chat`` run.
        message: answer this one message and exit instead of opening a conversation.
        system_prompt: a system message for the conversation (default: the one the run was trained with, if any).
        backbone: use this backbone instead of the recorded one.
        generation: how replies are generated (``--generation.max_new_tokens 128 --generation.do_sample true``).

    Examples:
        peftlab chat runs/chat_lora/version_0
        peftlab chat runs/chat_lora/version_0 --message "Is this review fresh or rotten? A dull film."
    """
    loaded = load_run(run, backbone)
    if not loaded.is_chat:
        raise PeftLabError(f"{run} was not trained on chat data (data.task chat); use peftlab predict or Run.predict")
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if message is not None:
        reply = loaded.chat([*head, {"role": "user", "content": message}], generation=generation)
        print(reply, flush=True)
        return reply
    history = list(head)
    print("[peftlab] chatting with", loaded.directory, "(/reset: new conversation, /exit: quit)", flush=True)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return None
        if text.strip() in ("/exit", "/quit"):
            return None
        if text.strip() == "/reset":
            history = list(head)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply = loaded.chat(history, generation=generation, stream=True)
        history.append({"role": "assistant", "content": reply})
