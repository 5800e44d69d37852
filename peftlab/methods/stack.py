"""Stacking an additive method with a prompt method: one model, one optimizer, a learning rate per part.

peft's mixed model (``PeftMixedModel``) refuses prompt learning, and one ``PeftModel`` holds either LoRA or prefix
tuning, not both. A stack builds them around one frozen backbone instead:

1. the **additive part** changes the backbone's layers in place: LoRA or one of its variants (``lora``, ``dora``,
   ``rslora``, ``pissa``, ``lora_plus``) through peft, or bottleneck ``adapters``;
2. the **prompt part** acts on the input or on attention, around that backbone:

   * ``prompt_tuning``: peftlab's input tokens (:class:`~peftlab.methods.p_tuning_v2.InputTokensModel`, as
     :class:`LoRAPromptTuning` always did: after [CLS] for classification, encoder input only on encoder-decoders);
   * ``prefix_tuning``: peft's prefix tuning on the same backbone object, so its K/V prefixes reach attention
     layers that hold the LoRA layers / adapters (peft passes them through the model's KV-cache argument);
   * ``p_tuning_v2``: peftlab's P-tuning v2 (input tokens and prefixes from one embedding) likewise.

Each part keeps the settings and the parameter count of the method it names. Saved and restored together
(checkpoints, peftlab-format exports that :func:`peftlab.api.load_run` rebuilds). ``merged_model`` folds a LoRA-family
part into the weights and keeps the prompt part as a small module (:class:`MergedStack`), saved next to the merged
model and loaded with it by :func:`load_merged`.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peftlab.backbones import torch_dtype
from peftlab.errors import PeftLabError, did_you_mean
from peftlab.methods.base import HEAD_NAMES, PeftModule, classification_head
from peftlab.methods.registry import METHODS, method_names

#: the stack's own arguments, given to both parts (not settable per part)
SHARED = ("backbone", "task", "num_labels", "dtype", "trust_remote_code", "revision")
#: training settings of the whole model (one optimizer, one schedule): set on the stack, not in a part
WHOLE_MODEL = ("head_learning_rate", "weight_decay", "optimizer", "warmup_ratio", "scheduler", "max_new_tokens",
               "gradient_checkpointing")
#: settings of the ``prompt_tuning`` part (peftlab's input tokens)
PROMPT_TUNING_ARGS = {"num_virtual_tokens": 20, "init": "vocab",
                      "init_text": "Classify the sentiment of this movie review:"}
MERGED_PROMPT_FILE, MERGED_CONFIG_FILE = "stack_prompt.safetensors", "stack_prompt.json"


def parse_part(spec: dict[str, Any] | None, kind: Literal["additive", "prompt"]) -> dict[str, Any] | None:
    """Check one part's settings (``{method: NAME, learning_rate: ..., <that method's arguments>}``) and return a
    plain copy; ``None`` (no such part) stays ``None``. Values are checked when the part is built."""
    if spec is None:
        return None
    if hasattr(spec, "as_dict"):  # a jsonargparse Namespace
        spec = spec.as_dict()
    allowed = stackable(kind)
    if not isinstance(spec, dict):
        example = allowed[0] if kind == "additive" else allowed[1]
        raise PeftLabError(f"model.{kind} must be a mapping such as {{method: {example}, ...}} (got {spec!r})")
    spec = dict(spec)
    method = spec.get("method")
    if method not in allowed:
        raise PeftLabError(f"model.{kind}.method {method!r} is not a stackable {kind} method; choose one of "
                           f"{', '.join(allowed)}.{did_you_mean(str(method), list(allowed))}")
    lr = spec.get("learning_rate")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise PeftLabError(f"model.{kind}.learning_rate must be > 0 (got {lr!r}); leave it out for model.learning_rate")
    for key in spec:
        if key in SHARED:
            raise PeftLabError(f"model.{kind}.{key}: the parts share the stack's {key}; set model.{key} instead")
        if key in WHOLE_MODEL:
            raise PeftLabError(f"model.{kind}.{key}: one optimizer and schedule train the whole stack; set model.{key}")
    own = set(_part_arguments(method))
    unknown = sorted(set(spec) - own - {"method", "learning_rate"})
    if unknown:
        raise PeftLabError(f"model.{kind}.{unknown[0]} is not an argument of {method}; it takes "
                           f"{', '.join(sorted(own))}.{did_you_mean(unknown[0], sorted(own))}")
    if method == "prompt_tuning":
        from peftlab.methods.prompt_tuning import check_virtual_tokens

        check_virtual_tokens(spec.get("num_virtual_tokens", PROMPT_TUNING_ARGS["num_virtual_tokens"]))
        if spec.get("init", "vocab") not in ("vocab", "text"):
            raise PeftLabError(f"model.prompt.init {spec['init']!r}: choose vocab (random vocabulary embeddings) or "
                               "text (the embeddings of init_text)")
    return spec


def stackable(kind: Literal["additive", "prompt"]) -> list[str]:
    """The registered methods a stack's ``kind`` part may name (their class's ``stack_role``), in display order."""
    return [n for n in method_names() if METHODS[n].stack_role == kind]


def _part_class(method: str) -> type[PeftModule]:
    return METHODS[method]


def _part_arguments(method: str) -> list[str]:
    """The arguments a part may set: the method's own (its class and its method bases up to PeftModule)."""
    import inspect

    if method == "prompt_tuning":
        return list(PROMPT_TUNING_ARGS)
    names = []
    for klass in _part_class(method).__mro__:
        if klass is PeftModule or not (isinstance(klass, type) and issubclass(klass, PeftModule)):
            continue
        for name, p in inspect.signature(klass.__init__).parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in names:
                names.append(name)
    return names


def _part_of(name: str) -> str:
    """Which part a trainable parameter (by name) belongs to: ``head``, ``prompt`` or ``additive``."""
    pieces = name.split(".")
    if any(piece in HEAD_NAMES for piece in pieces):
        return "head"
    if "prompt_encoder" in pieces or pieces[-2:] == ["prompt", "weight"]:
        return "prompt"
    return "additive"


class StackedMethod(PeftModule):
    """The machinery of :class:`Stack` and its presets: a subclass records its parts in ``self._parts`` (``{"additive":
    spec or None, "prompt": spec or None}``, each checked by :func:`parse_part`) after ``super().__init__``."""

    family = "composition"
    supports_packing = False  # a prompt part adds virtual tokens per row
    pads_exactly = False  # virtual positions ahead of the padding
    mergeable = True  # when its additive part is (merge_refusal)
    composable = False  # the prompt part is not a weight update

    # ------------------------------------------------------------------ building
    def _part_module(self, kind: str) -> PeftModule | None:
        """The part's method object (constructed, not built: only its ``attach`` is used), with the stack's shared
        settings and tokenizer."""
        spec = self._parts[kind]
        if spec is None or spec["method"] == "prompt_tuning":
            return None
        h = self.hparams
        settings = {k: v for k, v in spec.items() if k not in ("method", "learning_rate")}
        shared = {k: h[k] for k in SHARED if k in h and k not in ("task", "num_labels")}
        try:
            part = _part_class(spec["method"])(task=self.task, num_labels=self.num_labels,
                                                learning_rate=spec.get("learning_rate") or h.learning_rate,
                                                **shared, **settings)
        except PeftLabError as err:
            raise PeftLabError(f"model.{kind} ({spec['method']}): {err}") from err
        part.tokenizer = self.tokenizer
        return part

    def attach_reads_backbone_weights(self) -> bool:
        """A prompt_tuning part starts from vocabulary embeddings; other parts answer for themselves."""
        prompt = self._parts["prompt"]
        if prompt and prompt["method"] == "prompt_tuning":
            return True
        return any(part.attach_reads_backbone_weights() for part in map(self._part_module, self._parts) if part)

    def attach(self, backbone: nn.Module) -> nn.Module:
        from peftlab.methods.lora import LoRA
        from peftlab.methods.p_tuning_v2 import InputTokensModel, starts_with_cls

        prompt = self._parts["prompt"]
        if prompt and self.hparams.get("gradient_checkpointing") and \
                not _part_class(prompt["method"]).supports_gradient_checkpointing:
            raise PeftLabError(f"model.gradient_checkpointing cannot be used with a {prompt['method']} prompt part: its "
                               "K/V prefixes are in the attention cache and a recomputed layer would add them twice; "
                               "turn gradient_checkpointing off")
        # input tokens first: the embedding draws from the RNG before the additive part, so a seed gives
        # LoRAPromptTuning's checkpoints their start
        embedding = self._prompt_embedding(backbone) if prompt and prompt["method"] == "prompt_tuning" else None
        head_by_prompt = prompt is not None and embedding is None  # peft's prompt model wraps the head itself
        part = self._part_module("additive")
        # kept in a plain dict: as attributes, nn.Module would register them (and their parameters) a second time
        self._handles = {"additive": part, "lora": None}
        if part is None:
            inner = backbone
        elif isinstance(part, LoRA):
            # the LoRA layers go into the backbone's modules in place; the task-specific wrapper (which trains the
            # classification head) only when no prompt part does that
            inner = self._handles["lora"] = part.attach_lora(backbone, None if head_by_prompt else "auto")
        else:  # bottleneck adapters: in place
            inner = part.attach(backbone)
        if embedding is not None:
            model = InputTokensModel(inner, embedding, self.task, after_first=starts_with_cls(self))
        elif prompt is not None:
            additive_trainable = [p for p in backbone.parameters() if p.requires_grad]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="You are trying to modify a model with PEFT for a second")
                model = self._part_module("prompt").attach(backbone)  # peft freezes the whole backbone ...
            for p in additive_trainable:  # ... the additive part trains on
                p.requires_grad_(True)
        else:
            model = inner
        # the new head trains in full: peft does it when a peft model of the task wraps it (LoRA's, or the prompt
        # part's), else the stack does here (the base class would look for it on the outer wrapper)
        self.train_head = False
        if self.task == "classification" and not (head_by_prompt or self._handles["lora"] is not None):
            classification_head(backbone).requires_grad_(True)
        return model

    def _prompt_embedding(self, backbone: nn.Module) -> nn.Embedding:
        """The ``prompt_tuning`` part: ``num_virtual_tokens x hidden`` embeddings, started from random vocabulary
        embeddings (``vocab``) or those of ``init_text`` (``text``)."""
        spec = {**PROMPT_TUNING_ARGS, **self._parts["prompt"]}
        words = backbone.get_input_embeddings().weight
        n = spec["num_virtual_tokens"]
        prompt = nn.Embedding(n, words.shape[1])
        prompt.to(device=words.device, dtype=words.dtype)
        if spec["init"] == "text" and self.tokenizer is not None:
            ids = self.tokenizer(spec["init_text"], add_special_tokens=False)["input_ids"]
            if not ids:
                raise PeftLabError("model.prompt.init_text tokenizes to nothing; give a text or use init: vocab")
            ids = (ids * (n // len(ids) + 1))[:n]
        else:
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, words.shape[0], (n,), generator=generator, device="cpu").tolist()
        with torch.no_grad():
            prompt.weight.copy_(words[ids])
        return prompt

    # ------------------------------------------------------------------ optimization and reporting
    def part_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable ``(name, parameter)`` of each part: ``additive``, ``prompt`` and ``head``."""
        out: dict[str, list] = {"additive": [], "prompt": [], "head": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                out[_part_of(name)].append((name, p))
        return out

    def optimizer_groups(self) -> list[dict]:
        """One group per part at the part's ``learning_rate`` (default ``model.learning_rate``); LoRA+ in the
        additive part puts its ``B`` factors at ``loraplus_lr_ratio`` x the part's rate. The head stays in the default
        group (``head_learning_rate`` moves it to its own)."""
        from peftlab.methods.lora import is_lora_b

        parts = self.part_parameters()
        groups = [{"params": [p for _, p in parts["head"]]}]
        additive_part = self._handles["additive"]
        for kind in ("additive", "prompt"):
            spec = self._parts[kind] or {}
            lr = spec.get("learning_rate")
            extra = {"lr": lr} if lr else {}
            ratio = additive_part.hparams.get("loraplus_lr_ratio") if kind == "additive" and additive_part else None
            params = parts[kind]
            if kind == "additive" and ratio:
                b = [p for n, p in params if is_lora_b(n)]
                groups.append({"params": b, "lr": ratio * (lr or self.hparams.learning_rate)})
                params = [(n, p) for n, p in params if not is_lora_b(n)]
            groups.append({"params": [p for _, p in params], **extra})
        return [g for g in groups if g["params"]]

    def trainable_parts(self) -> dict[str, int]:
        """Trainable parameters of each part, named by its method, and of the head."""
        counts = {k: sum(p.numel() for _, p in v) for k, v in self.part_parameters().items()}
        out = {}
        for kind in ("additive", "prompt"):
            if self._parts[kind]:
                out[f"{kind}: {self._parts[kind]['method']}"] = counts[kind]
        if counts["head"]:
            out["head"] = counts["head"]
        return out

    # ------------------------------------------------------------------ merging
    def adapter_set_refusal(self) -> str | None:
        """The additive part decides (PiSSA / OLoRA rewrite the backbone's weights)."""
        part = self._part_module("additive")
        reason = part.adapter_set_refusal() if part is not None else None
        return f"{type(self).__name__}'s additive part: {reason}" if reason else None

    def merge_refusal(self) -> str | None:
        """Why this stack cannot merge (its parts decide: only a LoRA-family additive part folds into the weights), or
        None; ``peftlab merge`` and ``LoRAMerge`` ask before training / loading anything else."""
        additive = self._parts["additive"]
        if additive is not None and _part_class(additive["method"]).mergeable:
            return None
        what = "it has no additive part" if additive is None else \
            f"its additive part ({additive['method']}) adds layers, nothing folds into the weights"
        return (f"{type(self).__name__} cannot be merged into the backbone: {what}. Deploy the exported adapter "
                "instead (peftlab.api.load_run)")

    def merged_model(self, dtype: str = "float32") -> nn.Module:
        """A LoRA-family additive part folded into the backbone's weights (peft's merge_and_unload: for PiSSA the
        original backbone plus the trained delta, for DoRA the renormalized weights), the prompt part kept as it is
        around that plain model: a :class:`MergedStack`, whose ``save_pretrained`` writes the merged model (loads
        with ``AutoModel*.from_pretrained``) and the prompt part next to it (:func:`load_merged` loads both).
        Bottleneck adapters add layers and are refused."""
        from peftlab.methods.p_tuning_v2 import InputTokensModel

        reason = self.merge_refusal()
        if reason:
            raise PeftLabError(reason)
        self._require_built("merging")
        out_dtype = torch_dtype(dtype)
        prompt = self._parts["prompt"]
        model, lora = copy.deepcopy((self.model, self._handles["lora"]))
        # in place in the copy, so the prompt part's model now runs on the merged backbone; peft also replaces every
        # ModulesToSaveWrapper in it (the prompt part's around the head too) by its trained copy: a plain model
        backbone = lora.merge_and_unload()
        if prompt is None:
            return backbone.to(out_dtype).eval()
        if isinstance(model, InputTokensModel) and model.peft_model is lora:
            model = InputTokensModel(backbone, model.prompt, model.task, model.after_first)
        state = {n: p.detach() for n, p in model.named_parameters() if _part_of(n) == "prompt"}
        merged = MergedStack(model, backbone, state, {"prompt": prompt, "task": self.task,
                                                      "num_labels": self.num_labels})
        return merged.to(out_dtype).eval()


class Stack(StackedMethod):
    """An additive method and a prompt method trained together, each configured by naming it and its settings.

    ``additive`` (``lora``, ``dora``, ``rslora``, ``pissa``, ``lora_plus`` or ``adapters``) changes the backbone's
    layers; ``prompt`` (``prompt_tuning``, ``prefix_tuning`` or ``p_tuning_v2``) acts on the input / attention around
    them. Each part is a mapping with the ``method`` it uses, optionally its own ``learning_rate``, and that
    method's arguments (as in its ``configs/methods/`` preset)::

        additive: {method: lora, r: 8, alpha: 16, target_modules: [query, value], learning_rate: 5.0e-4}
        prompt: {method: prefix_tuning, num_virtual_tokens: 10, learning_rate: 1.0e-2}

    Trainable: the two parts' own counts (as each method alone) plus the head. One optimizer, a group per part.
    Saved, restored and exported together (peftlab's format). With a LoRA-family additive part, ``peftlab merge``
    folds it in and keeps the prompt part as a small module next to the merged model (:func:`load_merged`).
    ``null`` for either part leaves it out.

    Args:
        additive: the additive part: ``{method: ..., learning_rate: ..., <its arguments>}``.
        prompt: the prompt part: ``{method: ..., learning_rate: ..., <its arguments>}``; ``prompt_tuning`` takes
            ``num_virtual_tokens``, ``init`` (``vocab`` or ``text``) and ``init_text``.
        **kwargs: the :class:`PeftModule` arguments (backbone, learning rate for parts without their own, ...).
    """

    name = "stack"
    advice = ("a larger additive part (rank, bottleneck) or more virtual tokens; raise the weaker part's learning rate",
              "a smaller additive part or fewer virtual tokens; dropout in the additive part; fewer epochs")

    @classmethod
    def scaled_preset(cls, args: dict[str, Any], fit_targets=None, **knobs: Any) -> dict[str, Any]:
        """Each part's method scales its own settings (e.g. ``--r`` the LoRA part, ``--num_virtual_tokens`` the
        prompt part)."""
        for kind in ("additive", "prompt"):
            part = args.get(kind)
            if isinstance(part, dict) and part.get("method") in METHODS:
                _part_class(part["method"]).scaled_preset(part, fit_targets, **knobs)
        return args

    def __init__(
        self,
        additive: dict[str, Any] | None = {"method": "lora"},  # noqa: B006 - shown as the CLI default
        prompt: dict[str, Any] | None = {"method": "prefix_tuning"},  # noqa: B006
        **kwargs,
    ):
        parts = {"additive": parse_part(additive, "additive"), "prompt": parse_part(prompt, "prompt")}
        if parts["additive"] is None and parts["prompt"] is None:
            raise PeftLabError("model.additive and model.prompt are both null; a stack needs at least one part")
        super().__init__(**kwargs)
        self._parts = parts


# ---------------------------------------------------------------------------------------------- merged stacks
class MergedStack(nn.Module):
    """A merged stack: ``backbone`` (a plain transformers model with the additive part folded in) inside ``model``
    (the prompt part around it), called like the unmerged module.

    ``save_pretrained(directory)`` writes the backbone as transformers does (``AutoModel*.from_pretrained`` loads
    it, without the prompt part) plus :data:`MERGED_PROMPT_FILE` (the prompt part's parameters) and
    :data:`MERGED_CONFIG_FILE` (its settings); :func:`load_merged` loads both."""

    def __init__(self, model: nn.Module, backbone: nn.Module, prompt_state: dict[str, torch.Tensor], config: dict):
        super().__init__()
        self.model = model
        self.backbone = backbone
        self.prompt_names = sorted(prompt_state)
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def forward(self, **batch):
        return self.model(**batch)

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        self.backbone.save_pretrained(directory, **kwargs)
        params = dict(self.model.named_parameters())
        save_file({n: params[n].detach().cpu().contiguous() for n in self.prompt_names},
                  str(directory / MERGED_PROMPT_FILE))
        (directory / MERGED_CONFIG_FILE).write_text(json.dumps({"format": "peftlab-stack-prompt", **self.config},
                                                               indent=2))


def load_merged(directory: str, **kwargs) -> PeftModule:
    """Load a merged stack written by ``peftlab merge`` / ``LoRAMerge``: the merged model from ``directory`` and its
    prompt part from :data:`MERGED_PROMPT_FILE`, as a prompt-only :class:`Stack` (in eval mode) whose outputs are
    those of the stack before merging. ``kwargs`` go to the Stack (e.g. ``max_new_tokens``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / MERGED_CONFIG_FILE
    if not config_path.is_file():
        raise PeftLabError(f"{directory} has no {MERGED_CONFIG_FILE}: it is not a merged stack (a merged LoRA loads "
                           "with AutoModel*.from_pretrained alone)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    module = Stack(backbone=str(directory), task=config["task"], num_labels=config.get("num_labels"), additive=None,
                   prompt=config["prompt"], **kwargs).build()
    weights = load_file(str(directory / MERGED_PROMPT_FILE))
    params = dict(module.model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise PeftLabError(f"{directory}: the prompt part has parameters this model does not: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return module.eval()
