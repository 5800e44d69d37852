"""Many adapters on one backbone: hot-swapping and mixed-adapter batches for inference.

    from peftlab.api import load_adapters
    adapters = load_adapters({"sentiment": "runs/sentiment/version_0", "topics": "exports/topics"})
    adapters.predict(["A moving film."], adapter="sentiment")
    adapters.predict(["A moving film.", "Stocks fell."], adapter=["sentiment", "topics"])   # a mixed batch

How: the backbone is loaded **once**. Each adapter gets its own module tree, a structural copy of the backbone
whose parameters and buffers *are* the shared backbone's tensors (``copy.deepcopy`` with every tensor in the memo),
onto which the adapter's method attaches itself exactly as it does in :func:`peftlab.api.load_run`. So memory is one
backbone plus the adapters, every family that leaves the backbone's weights alone works unchanged (LoRA family and
QLoRA on its 4-bit base, bottleneck adapters, prompt tuning, P-tuning, prefix tuning, P-tuning v2, stacks), and
an adapter's outputs in the set are those of the same run loaded alone. A method says whether it can share a
backbone (:meth:`~peftlab.methods.PeftModule.adapter_set_refusal`) and what its backbone depends on
(:meth:`~peftlab.methods.PeftModule.shared_backbone_key`); the set asks, it never checks a method's name.

Mixed batches (rows naming different adapters, or ``None`` for the plain backbone):

* **per row, in one pass** for the adapters whose method gives a per-row config
  (:meth:`~peftlab.methods.PeftModule.per_row_config`: the LoRA family, DoRA and QLoRA included): they are also
  loaded, under their own names, into one peft model on another shared copy of the backbone (the *pool*), their
  weights tied to the adapters' own (no copy), and peft's ``adapter_names`` sends each row through its LoRA while the
  backbone runs once for the whole batch; rows with no adapter go through ``__base__``;
* **grouped per adapter inside the batch** for the others (prompt tuning, P-tuning, prefix tuning, P-tuning v2,
  bottleneck adapters, stacks) and for classification adapters whose label count is not the backbone's: each
  adapter's rows run through its own module tree as one sub-batch.

Either way the results come back in row order and equal each row run alone (tests/integration/test_adapter_set_runs.py).
:meth:`AdapterSet.routing` says which adapter is routed how.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peftlab.adapters import adapter_directory, load_weights, read_meta
from peftlab.backbones import load_tokenizer
from peftlab.errors import PeftLabError
from peftlab.methods.base import PeftModule, classification_head
from peftlab.methods.registry import construct_from_meta

#: the ``adapter`` value that names the plain backbone (also ``None``)
BASE = "base"


def shared_copy(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone``'s module tree whose parameters and buffers are the very tensors of ``backbone``: a
    method attaching to it replaces or wraps the copy's modules, never the original's, and no weight is copied."""
    memo = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    return copy.deepcopy(backbone, memo)


def build_on_shared(module: PeftModule, backbone: nn.Module, tokenizer) -> PeftModule:
    """Build ``module`` on a :func:`shared_copy` of ``backbone`` (with a head of its own label count): its new
    parameters are its own, every frozen weight is ``backbone``'s (an adapter set, a multi-task run)."""
    model = shared_copy(backbone)
    if module.task == "classification" and module.num_labels:
        _fit_head(model, module.num_labels)
    module.build(model, tokenizer)
    _untie_trainable(module.model, {id(p) for p in backbone.parameters()})
    # a method that trains backbone tensors in place (LoRA's bias: all) set them trainable on the shared backbone
    # too; its own copies are now untied, so the shared ones are frozen again for every other user
    backbone.requires_grad_(False)
    return module


def _fit_head(model: nn.Module, num_labels: int) -> None:
    """Give a classification backbone copy a head with ``num_labels`` outputs (the adapter's trained head is loaded
    into it, so its start does not matter); the shared backbone keeps its own."""
    head = classification_head(model)
    old = model.config.num_labels
    if old == num_labels:
        return
    for name, layer in list(head.named_modules()) or [("", head)]:
        if isinstance(layer, nn.Linear) and layer.out_features == old:
            new = nn.Linear(layer.in_features, num_labels, bias=layer.bias is not None,
                            device=layer.weight.device, dtype=layer.weight.dtype)
            if name:
                parent_name, _, child = name.rpartition(".")
                setattr(head.get_submodule(parent_name) if parent_name else head, child, new)
            else:
                for owner in model.modules():
                    for child, module in owner.named_children():
                        if module is head:
                            setattr(owner, child, new)
    model.config.num_labels = num_labels


def _untie_trainable(model: nn.Module, shared: set[int]) -> None:
    """A parameter the adapter trains (a classification head its method trains in place) becomes the adapter's own
    copy: loading its trained value must not change the shared backbone or the other adapters."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and id(param) in shared:
                setattr(module, name, nn.Parameter(param.detach().clone()))


#: peft's name for "no adapter" in ``adapter_names``
BASE_PEFT = "__base__"


class _Routed(nn.Module):
    """The pool, with ``adapter_names`` (one per row of the next batch) passed to its forward and generate."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool
        self.adapter_names: list[str] = []

    @property
    def config(self):
        return self.pool.config

    def forward(self, **batch):
        return self.pool(**batch, adapter_names=self.adapter_names)

    def generate(self, **kwargs):
        return self.pool.generate(**kwargs, adapter_names=self.adapter_names)


def _tie(pool: nn.Module, model: nn.Module, name: str) -> None:
    """Make adapter ``name``'s parameters in the pool the very tensors of its own model (peft names them with the
    adapter's name where the adapter's own model, built alone, says ``default``)."""
    pool_params = dict(pool.named_parameters())
    own = {n.replace(".default.", f".{name}."): p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(own) - set(pool_params))
    untied = sorted(n for n in pool_params if f".{name}." in n and n not in own)
    if missing or untied:  # never silently: a pool adapter with random weights would answer wrong
        raise PeftLabError(f"adapter {name!r} does not map onto the per-row model (missing {missing[:2]}, untied "
                           f"{untied[:2]}); this is a peftlab bug, please report it")
    for key, param in own.items():
        owner, _, leaf = key.rpartition(".")
        setattr(pool.get_submodule(owner), leaf, param)


def _source_directory(source) -> Path:
    if getattr(source, "directory", None) is not None and hasattr(source, "predict"):  # a loaded Run
        return Path(source.directory)
    path = Path(source)
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise PeftLabError(f"{path} is a merged model (its update is folded into the backbone's weights), which "
                           "cannot share a backbone; add the adapter it was merged from instead")
    return adapter_directory(path)


class AdapterSet:
    """Adapters sharing one frozen backbone (see the module docstring); build it with
    :func:`peftlab.api.load_adapters`.

    Args:
        adapters: ``{name: run directory, adapter directory or a loaded Run}``.
        backbone: use this backbone instead of the recorded one.
        device: where the backbone and adapters live (default: where loading put them).
        make_run: ``(module, peftlab_meta, directory) -> Run``: how :mod:`peftlab.api` makes the Run of a loaded
            module (``load_adapters`` passes :func:`peftlab.api.run_of`), so an adapter in the set predicts exactly
            as ``load_run`` does.
    """

    def __init__(self, adapters: dict | None = None, backbone: str | None = None, device: str | None = None, *,
                 make_run: Callable):
        self.make_run = make_run
        self.backbone_override = backbone
        self.device = device
        self.backbone: nn.Module | None = None  # the shared, frozen backbone (None until the first adapter)
        self.key: dict | None = None
        self.runs: dict = {}  # name -> peftlab.api.Run on a shared copy of the backbone
        self._base = None
        self._pool_cache = None  # (peft model or None, member names, router Run); rebuilt after add / remove
        self.active: str | None = None
        for name, source in (adapters or {}).items():
            self.add(name, source)

    # ------------------------------------------------------------------ adding and removing
    def add(self, name: str, source) -> None:
        """Load the run / export ``source`` onto the shared backbone as adapter ``name`` (no backbone is loaded
        again, none is copied). Refused in one line: a taken name, a method that changes the backbone, another
        backbone."""
        if not isinstance(name, str) or not name or name == BASE:
            raise PeftLabError(f"adapter name {name!r} is not allowed: give a non-empty name other than {BASE!r} "
                               "(which names the plain backbone)")
        if name in self.runs:
            raise PeftLabError(f"adapter {name!r} is already in the set; remove('{name}') first to replace it")
        directory = _source_directory(source)
        meta = read_meta(directory)
        module = construct_from_meta(meta, self.backbone_override)
        reason = module.adapter_set_refusal()
        if reason:
            raise PeftLabError(f"adapter {name!r} ({directory}) cannot join the set: {reason}")
        key = {k: v for k, v in module.shared_backbone_key().items()}
        if self.key is None:
            self._load_backbone(module, key)
        elif key != self.key:
            diff = ", ".join(f"{k} {key.get(k)!r} (the set's: {self.key.get(k)!r})"
                             for k in sorted(set(key) | set(self.key)) if key.get(k) != self.key.get(k))
            raise PeftLabError(f"adapter {name!r} ({directory}) needs a different backbone: {diff}; an adapter set "
                               "holds adapters of one backbone, load the others in a set of their own")
        build_on_shared(module, self.backbone, self.tokenizer)  # one tokenizer: loading it is most of add
        if self.device:
            module.to(self.device)
        load_weights(module, directory)
        self.runs[name] = self.make_run(module, meta, directory)
        self._pool_cache = None

    def _load_backbone(self, module, key: dict) -> None:
        backbone = module.load_backbone()  # the method's own loading (QLoRA's 4-bit), once for the whole set
        backbone.requires_grad_(False)
        self.backbone = backbone.to(self.device).eval() if self.device else backbone.eval()
        self.key = key
        h = module.hparams
        self.tokenizer = load_tokenizer(h.backbone, trust_remote_code=h.trust_remote_code, revision=h.revision)
        self._template = module

    def remove(self, name: str) -> None:
        """Drop adapter ``name``; its parameters are freed, the shared backbone stays."""
        self._run(name)
        del self.runs[name]
        self._pool_cache = None
        if self.active == name:
            self.active = None

    def switch(self, name: str | None) -> None:
        """Make ``name`` (or ``None`` / ``"base"``: the plain backbone) the adapter ``predict`` uses by default."""
        self._run(name)
        self.active = None if name in (None, BASE) else name

    @property
    def names(self) -> list[str]:
        return list(self.runs)

    def _run(self, name: str | None):
        if name in (None, BASE):
            return self.base_run()
        if name not in self.runs:
            raise PeftLabError(f"no adapter {name!r} in the set; it has: {', '.join(self.runs) or 'none'} "
                               f"(and {BASE!r}, the plain backbone)")
        return self.runs[name]

    def run(self, name: str | None):
        """The :class:`peftlab.api.Run` of adapter ``name`` (``None`` / ``"base"``: the plain backbone)."""
        return self._run(name)

    def base_run(self):
        """A :class:`peftlab.api.Run` over the plain shared backbone (rows that name no adapter)."""
        if self.backbone is None:
            raise PeftLabError("the adapter set is empty; add an adapter first")
        if self._base is None:
            h = self._template.hparams
            base = PeftModule(backbone=h.backbone, task=self._template.task, num_labels=self._template.num_labels,
                              max_new_tokens=h.max_new_tokens)
            base.model, base.tokenizer = self.backbone, self.tokenizer
            self._base = self.make_run(base, {}, None)
        return self._base

    # ------------------------------------------------------------------ per-row routing (the pool)
    def _pool(self):
        """(peft model holding every per-row adapter, their names, a Run over it), built on first use."""
        if self._pool_cache is not None:
            return self._pool_cache
        from peft import get_peft_model  # peft is imported by the methods anyway; here only when a pool is built

        members = {name: run for name, run in self.runs.items()
                   if run.module.num_labels == self._template.num_labels and run.module.per_row_config() is not None}
        # the pool's own adapter names: a user's name could be a module's ("q_proj") or start like peft's keys
        inner = {name: f"set{i}" for i, name in enumerate(members)}
        pool = None
        for name, run in members.items():
            config = copy.deepcopy(run.module.per_row_config())
            config.inference_mode = True
            if pool is None:
                pool = get_peft_model(shared_copy(self.backbone), config, adapter_name=inner[name])
            else:
                pool.add_adapter(inner[name], config)
        router = None
        if pool is not None:
            for name, run in members.items():
                _tie(pool, run.module.model, inner[name])
            h = self._template.hparams
            module = PeftModule(backbone=h.backbone, task=self._template.task, num_labels=self._template.num_labels,
                                max_new_tokens=h.max_new_tokens)
            module.model, module.tokenizer = _Routed(pool), self.tokenizer
            router = self.make_run(module, {}, None)
        self._pool_cache = (pool, inner, router)
        return self._pool_cache

    def routing(self) -> dict[str, str]:
        """How each adapter's rows of a mixed batch run: ``per row`` (one pass, peft's ``adapter_names``) or
        ``grouped`` (a sub-batch of their own)."""
        members = self._pool()[1] if self.runs else set()
        return {name: "per row" if name in members else "grouped" for name in self.runs}

    def _groups(self, adapter: list) -> list[tuple[str | None, list[int]]]:
        """(adapter name or ``"*routed"``, row indices) of a mixed batch, in first-seen order."""
        members = self._pool()[1]
        routed = [i for i, a in enumerate(adapter) if a in members or a in (None, BASE)]
        if len({adapter[i] or BASE for i in routed}) < 2 or not members:
            routed = []  # one adapter only: its own module, no routing
        groups = [("*routed", routed)] if routed else []
        rest = [i for i in range(len(adapter)) if i not in set(routed)]
        for name in dict.fromkeys(adapter[i] for i in rest):
            groups.append((name, [i for i in rest if adapter[i] == name]))
        return groups

    # ------------------------------------------------------------------ inference
    def predict(self, texts: list, adapter=None, batch_size: int = 32, max_new_tokens: int | None = None, *,
                raw: bool = False, **settings) -> list[dict]:
        """:meth:`peftlab.api.Run.predict` through adapter ``adapter`` (default: the one :meth:`switch` chose), or a
        **mixed batch**: a list with one adapter name (or ``None`` for the plain backbone) per text, routed per row or
        grouped per adapter (module docstring); the results come back in the order of ``texts``. ``raw``,
        ``add_special_tokens`` and the generation settings are :meth:`peftlab.api.Run.predict`'s; each row gets its
        own run's prompt format and special tokens."""
        texts = list(texts)
        common = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, raw=raw, **settings)
        if adapter is None or isinstance(adapter, str):
            return self._run(adapter or self.active).predict(texts, **common)
        if settings.get("streamer") is not None:
            raise PeftLabError("predict streams one answer of one adapter: pass adapter as a name, not one per text")
        adapter = list(adapter)
        if len(adapter) != len(texts):
            raise PeftLabError(f"predict got {len(texts)} texts but {len(adapter)} adapter names; give one per text "
                               "(None for the plain backbone)")
        for name in set(adapter):
            self._run(name)  # an unknown name fails before anything runs
        out: list[dict | None] = [None] * len(texts)
        for name, rows in self._groups(adapter):
            if name == "*routed":
                results = self._routed_predict([texts[i] for i in rows], [adapter[i] for i in rows], common)
            else:
                results = self._run(name).predict([texts[i] for i in rows], **common)
            for i, result in zip(rows, results):
                out[i] = result
        return out

    def _peft_names(self, names: list) -> list[str]:
        inner = self._pool()[1]
        return [BASE_PEFT if n in (None, BASE) else inner[n] for n in names]

    def _routed_predict(self, texts, names, common: dict) -> list[dict]:
        router = self._pool()[2]
        common = dict(common)
        special = common.pop("add_special_tokens", None)
        if not common["raw"] and router.module.task != "classification":  # each row in its own run's prompt format
            texts = [self._run(n).format_prompt(t) for t, n in zip(texts, names)]
        if special is None:  # and its own special tokens (none added to a chat-templated row)
            special = [self._run(n).adds_special_tokens(common["raw"]) for n in names]
        elif isinstance(special, bool):
            special = [special] * len(texts)
        batch_size = common["batch_size"]
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = names[start:start + batch_size]
            router.module.model.adapter_names = self._peft_names(chunk)
            results = router.predict(texts[start:start + batch_size], **{**common, "raw": True},
                                     add_special_tokens=special[start:start + batch_size])
            for name, result in zip(chunk, results):
                labels = self._run(name).label_names
                if "probs" in result and labels:  # the router knows no label names: each row gets its adapter's
                    result = {"label": labels[int(result["label"])],
                              "probs": {labels[int(k)]: v for k, v in result["probs"].items()}}
                out.append(result)
        return out

    @torch.no_grad()
    def forward(self, batch: dict, adapter) -> torch.Tensor:
        """Logits of a tokenized ``batch`` through ``adapter`` (a name, or one name / ``None`` per row, routed or
        grouped as in :meth:`predict`)."""
        if adapter is None or isinstance(adapter, str):
            return self._run(adapter).module(**batch).logits
        adapter = list(adapter)
        out = None
        for name, rows in self._groups(adapter):
            index = torch.tensor(rows)
            sub = {k: v[index] for k, v in batch.items()}
            if name == "*routed":
                logits = self._pool()[0](**sub, adapter_names=self._peft_names([adapter[i] for i in rows])).logits
            else:
                logits = self._run(name).module(**sub).logits
            if out is None:
                out = logits.new_zeros((len(adapter), *logits.shape[1:]))
            if logits.shape[1:] != out.shape[1:]:
                raise PeftLabError("forward over a mixed batch needs adapters with outputs of one shape (prompt "
                                   "methods add virtual positions); call predict, or one adapter at a time")
            out[index] = logits
        return out

    # ------------------------------------------------------------------ reporting
    def parameter_count(self) -> int:
        """Parameters held by the set: each tensor counted once (the shared backbone once, plus every adapter);
        4-bit packed weights count as their unpacked number, as in :func:`peftlab.methods.base.count_parameters`."""
        seen: dict[int, nn.Parameter] = {}
        pool = self._pool_cache[0] if self._pool_cache else None  # its LoRA weights are the adapters' own
        for module in [self.backbone, pool, *(run.module for run in self.runs.values())]:
            if module is not None:
                for p in module.parameters():
                    seen.setdefault(id(p), p)
        return sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
                   for p in seen.values())

    def __repr__(self) -> str:
        return f"AdapterSet({', '.join(self.runs)} on {self.key.get('backbone') if self.key else None})"
