"""An lm-evaluation-harness ``LM`` over any peftlab model: the module ``load_run`` builds (every method, the adapter
applied as in training, no merge), a merged model, or a plain backbone.

    from peftlab.api import load_run
    from peftlab.eval_lm import PeftLabLM
    import lm_eval

    lm = PeftLabLM.from_run(load_run("runs/quickstart/version_0"), batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

Scoring follows lm-eval's own ``HFLM`` (so the numbers agree with ``lm_eval --model hf`` on the same weights):
requests sorted longest first and right-padded into batches, one-token continuations of one context scored once,
rolling windows for perplexity, left-padded batched generation that stops at the task's stop strings. Prompt-family
methods prepend virtual tokens to the logits; only the last positions (the real tokens) are read.

Importing this module imports lm-eval: ``peftlab.evaluate`` checks its version first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator
from transformers import StoppingCriteria, StoppingCriteriaList

from peftlab.generation import length_groups

#: context length when neither the caller nor the model's config says (lm-eval's HFLM uses the same)
DEFAULT_MAX_LENGTH = 2048


class _StopStrings(StoppingCriteria):
    """Stops a row once its generated text contains one of ``stops`` (transformers stops when every row has)."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class PeftLabLM(TemplateLM):
    """lm-eval's LM interface (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) over ``model``.

    Args:
        model: a causal LM ``nn.Module``: ``model(input_ids=...)`` returns ``.logits`` (virtual tokens first, if
            any) and ``model.generate(...)`` continues a left-padded batch (a PeftModule's ``.model``, a merged
            or plain transformers model)
        tokenizer: its tokenizer (a pad token set)
        batch_size: requests per forward pass
        max_length: longest input in tokens (default: the model config's ``max_position_embeddings``, else 2048);
            longer inputs lose their left end, as in lm-eval
        max_gen_toks: tokens generated when a task does not say
        chat: the run was trained on chat-formatted prompts; ``peftlab evaluate`` then applies the chat template
            unless told otherwise (``apply_chat_template`` below is lm-eval's hook for it)
        template: the Jinja chat template to apply (a chat run's recorded one; default: the tokenizer's)
        pads_exactly: a left-padded generation batch gives each row what it gives alone (the method class's
            ``pads_exactly``); False: generation batches hold contexts of one length only
    """

    backend = "causal"

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, chat: bool = False, template: str | None = None,
                 system_prompt: str | None = None, pads_exactly: bool = True):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        config = getattr(model, "config", None) or _inner_config(model)
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)
        self.max_gen_toks = int(max_gen_toks)
        self.chat = chat
        self.template = template or getattr(tokenizer, "chat_template", None)
        self.system_prompt = system_prompt  # a chat run's data.system_prompt: added where a history has none
        self.pads_exactly = pads_exactly

    @classmethod
    def from_run(cls, run, **kwargs) -> PeftLabLM:
        """The LM of a :class:`peftlab.api.Run` (``load_run``): its module's model, adapter applied; a chat run's
        prompts in the chat template it was trained with."""
        chat = bool(getattr(run, "is_chat", False))
        recorded = (getattr(run, "prompt_format", None) or {}) if chat else {}
        return cls(run.module.model, run.module.tokenizer, chat=chat, template=recorded.get("chat_template"),
                   system_prompt=recorded.get("system_prompt"), pads_exactly=type(run.module).pads_exactly, **kwargs)

    # ------------------------------------------------------------------ what lm-eval asks of every LM
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # the context of an empty-context request (rolling perplexity), as in HFLM
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer and its chat template in lm-eval's request cache."""
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The few-shot chat history as one prompt, through the tokenizer's chat template (lm-eval's hook; called
        when ``simple_evaluate(apply_chat_template=True)``); a chat run's system prompt leads, as in training,
        unless the task gave its own."""
        if self.system_prompt and not (chat_history and chat_history[0].get("role") == "system"):
            chat_history = [{"role": "system", "content": self.system_prompt}, *chat_history]
        return self.tokenizer.apply_chat_template(chat_history, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template if chat_template else None

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kwargs["add_special_tokens"] = False  # a chat template wrote the BOS already
        return self.tokenizer.encode(string, **kwargs)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _logits(self, rows: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Log-softmax over right-padded ``rows`` (fp32) and the padded length. Causal attention keeps the
        padding out of every real position, so no attention mask is needed (HFLM passes none either)."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        logits = self.model(input_ids=ids.to(self.device)).logits
        return F.log_softmax(logits.float(), dim=-1), width

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        out = []
        for chunk in order.get_batched(n=self.batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            logprobs, width = self._logits(rows)
            for (key, ctx, cont), lp, row in zip(chunk, logprobs, rows):
                # virtual tokens (prompt tuning, P-tuning) come first: the real tokens end at len(row) + extra
                end = len(row) + lp.shape[0] - width
                lp = lp[end - len(cont):end].unsqueeze(0)
                greedy = lp.argmax(-1)
                for key_, cont_, lp_ in order.get_cache(req_str=key, cxt_toks=ctx, cont_toks=cont, logits=lp):
                    target = torch.tensor(cont_, dtype=torch.long, device=lp_.device).unsqueeze(0)
                    exact = bool((greedy[:, -target.shape[1]:] == target).all())
                    answer = (float(torch.gather(lp_, 2, target.unsqueeze(-1)).sum()), exact)
                    out.append(answer)
                    if key_ is not None:
                        self.cache_hook.add_partial("loglikelihood", key_, answer)
        return order.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens."""
        windows, counts = [], []
        for (text,) in (r.args for r in requests):
            rolling = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            parts = [(None, *lm_utils.make_disjoint_window(w)) for w in rolling]
            windows += parts
            counts.append(len(parts))
        scores = self._loglikelihood_tokens(windows)
        out, start = [], 0
        for request, n in zip(requests, counts):
            total = sum(s for s, _ in scores[start:start + n])
            start += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling settings) generation up to ``max_gen_toks``, cut at the first stop string."""
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        out = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, settings = zip(*chunk)
            kwargs = dict(settings[0])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            kwargs.pop("max_length", None)
            if not kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) == 0.0:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
                kwargs["do_sample"] = False
            encoded = [self.tok_encode(c)[-(self.max_length - max_new):] for c in contexts]
            texts: list[str] = [""] * len(encoded)
            for index in length_groups([len(e) for e in encoded], self.pads_exactly):
                rows = [encoded[i] for i in index]
                for i, row in zip(index, self._generate(rows, pad, until, max_new, kwargs)):
                    texts[i] = row
            for context, text in zip(contexts, texts):
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, settings[0]), text)
        return order.get_original(out)

    def _generate(self, encoded: list[list[int]], pad: int, until: list[str], max_new: int, kwargs: dict) -> list[str]:
        """The continuation of each left-padded row, cut at the first stop string."""
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):  # left padding: every row continues from the last position
            ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e):] = 1
        generated = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new,
            pad_token_id=pad, stopping_criteria=StoppingCriteriaList([_StopStrings(self.tokenizer, until, width)]),
            **kwargs)
        texts = []
        for row in generated[:, width:].tolist():
            text = self.tok_decode(row)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


def _inner_config(model):
    """The transformers config inside a wrapper module (P-tuning v2's input-tokens wrapper, a stack)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "vocab_size"):
            return config
    return None
