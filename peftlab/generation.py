"""Generation settings: one home for how text is generated, by ``peftlab predict``, ``peftlab chat``,
``Run.predict`` and ``Run.chat``.

On the command line they are ``--generation.max_new_tokens 64 --generation.do_sample true ...``; from Python
``Run.predict(texts, generation=GenerationSettings(temperature=0.7, do_sample=True))`` or keyword arguments
(``Run.predict(texts, max_new_tokens=64)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

from peftlab.errors import PeftLabError


@dataclass
class GenerationSettings:
    """How text is generated (transformers' ``generate`` underneath).

    Args:
        max_new_tokens: most tokens generated per answer (default: the model's ``max_new_tokens``, 32 unless set).
        do_sample: sample (with temperature / top_p / top_k) instead of greedy decoding.
        temperature: sampling temperature (``do_sample`` only).
        top_p: nucleus sampling: smallest set of tokens whose probabilities add up to ``top_p`` (``do_sample`` only).
        top_k: sample among the ``top_k`` most likely tokens (``do_sample`` only; 0: all).
        repetition_penalty: > 1 discourages repeating tokens (1: off).
        stop: strings that end an answer; the answer is cut before the first one.
        seed: seed of the sampling, so a sampled answer can be reproduced (``None``: the global RNG).
    """

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise PeftLabError(f"generation.max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature <= 0:
            raise PeftLabError(f"generation.temperature must be > 0 (got {self.temperature}); for greedy "
                               "decoding set generation.do_sample false")
        if not 0 < self.top_p <= 1:
            raise PeftLabError(f"generation.top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise PeftLabError(f"generation.top_k must be >= 0 (got {self.top_k})")
        if self.repetition_penalty <= 0:
            raise PeftLabError(f"generation.repetition_penalty must be > 0 (got {self.repetition_penalty})")

    @classmethod
    def coerce(cls, value) -> GenerationSettings | None:
        """``value`` as settings: settings, ``None``, or the dict / namespace a command line parsed."""
        if value is None or isinstance(value, cls):
            return value
        items = value.as_dict() if hasattr(value, "as_dict") else dict(value)
        return cls.from_kwargs(None, **items)

    @classmethod
    def from_kwargs(cls, base: GenerationSettings | None = None, **kwargs) -> GenerationSettings:
        """``base`` (default settings if ``None``) with the given fields replaced; unknown names are refused."""
        base = cls.coerce(base)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise PeftLabError(f"unknown generation setting(s) {unknown}; the settings are {', '.join(sorted(names))}")
        return replace(base or cls(), **{k: v for k, v in kwargs.items() if v is not None})

    def generate_kwargs(self, tokenizer) -> dict:
        """Keyword arguments of ``model.generate``."""
        kwargs = dict(max_new_tokens=self.max_new_tokens or 32, do_sample=self.do_sample,
                      repetition_penalty=self.repetition_penalty, pad_token_id=tokenizer.pad_token_id)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy: no sampling knobs, so transformers does not warn that they are unused
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kwargs

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (generate stops *after* generating one)."""
        for stop in self.stop or ():
            index = text.find(stop)
            if index >= 0:
                text = text[:index]
        return text

    def as_dict(self) -> dict:
        return asdict(self)


def generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             settings: GenerationSettings, *, continues: bool = True, streamer=None) -> list[str]:
    """Generate one answer per row; ``continues``: decoder-only (the output repeats the prompt, which is dropped)."""
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                         **settings.generate_kwargs(tokenizer))
    if continues:
        out = out[:, input_ids.shape[1]:]
    return [settings.cut(t) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def length_groups(lengths: list[int], pads_exactly: bool = True) -> list[list[int]]:
    """The row indices to batch together for generation: all of them when a left-padded batch is exact (the method
    class's ``pads_exactly``), else one group per prompt length (rows of one length need no padding)."""
    if pads_exactly:
        return [list(range(len(lengths)))]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(i)
    return list(groups.values())
