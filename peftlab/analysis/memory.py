"""``peftlab estimate-memory``: training memory of a method on a backbone, without loading weights.

Four parts, each from the method as training would build it (on the meta device, see
:mod:`peftlab.analysis.params`):

* **weights**: every parameter at its storage size: frozen ones in the training precision (QLoRA: 4-bit
  blocks plus their quantization constants for the quantized linear layers, fp32 for the rest, as
  ``prepare_model_for_kbit_training`` leaves them); trainable ones in fp32 for PEFT methods (peft keeps
  adapters in fp32), in the training precision for full fine-tuning (a half-precision working copy);
* **gradients**: one per trainable parameter, in the dtype of that parameter;
* **optimizer states**: AdamW's two moments in fp32 (8 bytes per trainable parameter), or 8-bit
  (bitsandbytes: 2 bytes plus two fp32 scales per block of 256; tensors under 4,096 elements stay
  32-bit); half-precision full fine-tuning adds the fp32 master weights (4 bytes); paged optimizers have
  the same size (they can be evicted to CPU RAM on memory spikes, they are not smaller);
* **activations**: the tensors autograd saves for backward, counted exactly by running the model's
  forward on the meta device (:func:`trace_activations`) for the given batch and sequence length:
  ``fused`` attention (flash / memory-efficient SDPA, what GPUs run) saves q, k, v, the output and a
  log-sum-exp instead of the ``batch x heads x seq x seq`` scores of ``eager`` attention; gradient
  checkpointing keeps every layer's inputs plus one layer's saved tensors (recomputed in backward);
  plus backward's workspace, twice the largest saved tensor (the gradient of an op's output and of its
  input exist together).

docs/decision.md states the formulas and compares them with measured peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from peftlab.analysis.params import (
    MethodSpec,
    adapt_targets,
    build_meta,
    has_config,
    human_bytes,
    parse_fit_config,
    resolve_backbone,
    with_backbone,
)
from peftlab.backbones import torch_dtype
from peftlab.errors import PeftLabError
from peftlab.methods.registry import method_class, method_names  # noqa: F401 - also importable from here

PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}
Precision = Literal["fp32", "bf16", "fp16"]  # the keys of PRECISIONS
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
OPTIMIZER_ALIASES = {"paged": "paged_adamw_32bit", "adam": "adamw", "paged_adamw": "paged_adamw_32bit"}
#: --size: Llama-shaped backbones (shipped shapes; 13B is the Llama-2-13B config)
SIZES = {"1b": "llama-1b", "7b": "llama-2-7b", "13b": "llama-2-13b", "70b": "llama-2-70b"}
LLAMA_2_13B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
               "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 40,
               "num_hidden_layers": 40, "vocab_size": 32000, "max_position_embeddings": 4096,
               "rms_norm_eps": 1e-05, "hidden_act": "silu", "tie_word_embeddings": False,
               "bos_token_id": 1, "eos_token_id": 2}
BNB_OPTIM_BLOCK, BNB_MIN_8BIT_SIZE = 256, 4096


@dataclass
class MemoryEstimate:
    """Training memory of one method, in bytes."""

    method: str
    backbone: str
    task: str
    batch_size: int
    seq_len: int
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    attention: str
    target_len: int | None
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    trainable: int
    total_params: int
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def lines(self) -> list[str]:
        target = f" (decoder {self.target_len})" if self.task == "seq2seq" and self.target_len else ""
        checkpointing = "on" if self.gradient_checkpointing else "off"
        head = (f"{self.method} on {self.backbone} ({self.task}): batch {self.batch_size} x seq {self.seq_len}"
                f"{target}, {self.precision}, {self.optimizer}, gradient checkpointing {checkpointing}, "
                f"{self.attention} attention")
        rows = [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer states", self.optimizer_states), ("activations", self.activations), ("total", self.total)]
        return [head] + [f"  {k:<17} {human_bytes(v):>10}   {self.notes.get(k, '')}".rstrip() for k, v in rows]


# ---------------------------------------------------------------------------------------------- parameters
def optimizer_state_bytes(n: int, optimizer: str) -> int:
    """AdamW moments of one trainable tensor of ``n`` elements (bitsandbytes 8-bit rules for *_8bit)."""
    if optimizer.endswith("8bit") and n >= BNB_MIN_8BIT_SIZE:
        return 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCK)
    return 8 * n


def parameter_memory(module, precision: str, optimizer: str) -> tuple[int, int, int, dict[str, str]]:
    """(weights, gradients, optimizer states) bytes of a built method, and a note per line."""
    from peftlab.methods.base import count_parameters

    half = PRECISIONS[precision] == 2
    full = module.trainable_dtype == "precision"  # trains a working copy in the training precision
    quantized = module.quantized_weights()  # {id: bytes stored} of the weights the backbone keeps quantized
    train_bytes = PRECISIONS[precision] if full else 4
    weights = grads = states = 0
    n_quant = n_frozen = 0
    seen = set()
    for p in module.model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if p.requires_grad:
            weights += train_bytes * n
            grads += train_bytes * n
            states += optimizer_state_bytes(n, optimizer) + (4 * n if full and half else 0)
        elif id(p) in quantized:
            weights += quantized[id(p)]
            n_quant += n
        else:
            weights += (4 if quantized else PRECISIONS[precision]) * n
            n_frozen += n
    trainable, _ = count_parameters(module)
    # state a method keeps per step besides the optimizer's (AdaLoRA's sensitivity statistics), if it declares any
    extra = int(module.training_state_bytes())
    states += extra
    notes = {
        "weights": (f"{n_quant:,} params in 4 bits + {n_frozen:,} frozen in fp32 + {trainable:,} trainable in fp32"
                    if quantized else
                    f"{n_frozen:,} frozen x {PRECISIONS[precision]} B + {trainable:,} trainable x {train_bytes} B"),
        "gradients": f"{trainable:,} x {train_bytes} B",
        "optimizer states": f"{optimizer}: "
                            + ("2 moments (8-bit blocks)" if optimizer.endswith("8bit") else "2 fp32 moments")
                            + (" + fp32 master weights" if full and half else "")
                            + (f" + {human_bytes(extra)} of {type(module).__name__}'s own training state"
                               if extra else ""),
    }
    return weights, grads, states, notes


# ---------------------------------------------------------------------------------------------- activations
class _FusedAttention:
    """Stand-in for ``F.scaled_dot_product_attention`` on the meta device that saves what flash attention
    saves for backward (q, k, v, output, fp32 log-sum-exp) instead of the ``seq x seq`` scores."""

    def __init__(self):
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = q.new_empty(*q.shape[:-1], v.shape[-1])
                lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(q, k, v, out, lse)
                return out

            @staticmethod
            def backward(ctx, grad):  # pragma: no cover - never run on meta tensors
                raise NotImplementedError

        self.fn = Fn

    def __call__(self, query, key, value, *args, **kwargs):
        return self.fn.apply(query, key, value)


@contextlib.contextmanager
def _attention(kind: str):
    import torch

    if kind == "eager":
        yield
        return
    saved = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _FusedAttention()
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = saved


def _layers(model) -> list:
    """The repeated transformer blocks (what gradient checkpointing wraps)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _cast_for_training(module, precision: str) -> None:
    """Give the meta model the dtypes training has: frozen weights in the training precision (QLoRA: quantized
    linear layers compute in it, the rest stays fp32), trainable ones in fp32 except for full fine-tuning."""
    import torch
    from torch import nn

    dtype = torch_dtype(precision)
    if module.trainable_dtype == "precision":
        module.model.to(dtype)  # meta models come in the config's torch_dtype: always cast
        return
    quantized = module.quantized_weights() or None
    for sub in module.model.modules():
        for _name, p in list(sub.named_parameters(recurse=False)):
            keep_fp32 = p.requires_grad or (quantized is not None and id(p) not in quantized)
            p.data = p.data.to(torch.float32 if keep_fp32 else dtype)
        if quantized is not None and type(sub) is nn.Linear and id(sub.weight) in quantized:
            # bitsandbytes' Linear4bit casts its input to the compute dtype
            sub.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))


def meta_batch(task: str, batch_size: int, seq_len: int, target_len: int | None = None) -> dict:
    """A training batch of the right shapes on the meta device (no padding, so no attention mask)."""
    import torch

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    if task == "classification":
        labels = torch.zeros(batch_size, dtype=torch.long, device="meta")
    elif task == "seq2seq":
        labels = torch.zeros(batch_size, target_len or seq_len, dtype=torch.long, device="meta")
    else:
        labels = ids
    return {"input_ids": ids, "labels": labels}


@dataclass
class ActivationTrace:
    """Bytes autograd saves in one training forward, split into transformer blocks and the rest."""

    outside: int
    per_layer: list[int]
    layer_inputs: int
    largest: int = 0

    @property
    def workspace(self) -> int:
        """Backward's working memory on top of the saved tensors: an op's backward holds the gradient of its
        output and produces the gradient of its input, so at most twice the largest saved tensor."""
        return 2 * self.largest

    def saved(self, checkpointing: bool) -> int:
        """Saved for backward at the peak: everything, or with checkpointing the blocks' inputs plus one
        block recomputed."""
        if not checkpointing or not self.per_layer:
            return self.outside + sum(self.per_layer)
        return self.outside + self.layer_inputs + max(self.per_layer)

    def total(self, checkpointing: bool) -> int:
        return self.saved(checkpointing) + self.workspace


class _Saved:
    """What :func:`trace_activations` hands autograd for a saved tensor: the tensor, and a weak reference target that
    lives exactly as long as the graph node keeping it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def trace_activations(module, batch: dict, attention: str = "fused") -> ActivationTrace:
    """Run ``module``'s training forward on the meta device and count the bytes of every tensor autograd
    saves for backward (each storage once; parameters are weights, not activations).

    Only what the loss's graph still holds when the forward returns is counted: a tensor saved by a side
    computation whose graph is dropped during the forward (DoRA builds ``B A`` through an identity matrix to
    take its norm, detached) is freed before backward and is not an activation."""
    import gc
    import weakref

    import torch

    params = {id(p) for p in module.parameters()}
    layers = _layers(module)
    where: dict[str, int | None] = {"layer": None}
    # one entry per storage: [bytes, layer index where first saved, weak references to what the graphs keep]. Bases
    # are held weakly (a strong reference would keep their graph, and what it saved, alive), so an id can come back
    # for another tensor: the weak reference tells them apart.
    entries: list[list] = []
    seen: dict[int, tuple[Any, int]] = {}  # id(base) -> (weak reference to base, index into entries)
    inputs: dict[int, Any] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) in params:
            return t
        known = seen.get(id(base))
        if known is None or known[0]() is not base:
            seen[id(base)] = (weakref.ref(base), len(entries))
            entries.append([base.numel() * base.element_size(), where["layer"], []])
            known = seen[id(base)]
        saved = _Saved(t)
        entries[known[1]][2].append(weakref.ref(saved))
        return saved

    def unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def enter(index):
        def hook(mod, args, kwargs):
            where["layer"] = index
            for value in [*args, *kwargs.values()]:  # what a checkpointed block keeps: its tensor inputs
                if isinstance(value, torch.Tensor) and value.is_floating_point() and id(value) not in params:
                    inputs[id(value)] = value
        return hook

    def leave(mod, args, output):
        where["layer"] = None

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))
    module.train()
    try:
        with _attention(attention), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            output = module(**batch)  # held until counted: it keeps the graph (and what it saved) alive
    except RuntimeError as err:
        raise PeftLabError(f"could not trace {type(module).__name__}'s forward on the meta device ({err}); "
                           "try --attention eager") from err
    finally:
        for h in handles:
            h.remove()
    gc.collect()  # graphs dropped during the forward (reference cycles included) release what they saved
    per_layer = [0] * len(layers)
    outside = largest = 0
    for nbytes, layer, holders in entries:
        if not any(ref() is not None for ref in holders):
            continue
        largest = max(largest, nbytes)
        if layer is None:
            outside += nbytes
        else:
            per_layer[layer] += nbytes
    del output
    layer_inputs = sum(t.numel() * t.element_size() for t in inputs.values())
    return ActivationTrace(outside, per_layer, layer_inputs, largest)


# ---------------------------------------------------------------------------------------------- estimate
def estimate(spec: MethodSpec, *, batch_size: int, seq_len: int, precision: str = "bf16", optimizer: str = "adamw",
             gradient_checkpointing: bool = False, attention: str = "fused", target_len: int | None = None,
             num_labels: int | None = None, label: str | None = None) -> MemoryEstimate:
    """Training memory of the method ``spec`` (as ``peftlab params`` builds it) for one batch shape."""
    if precision not in PRECISIONS:
        raise PeftLabError(f"--precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    optimizer = OPTIMIZER_ALIASES.get(optimizer, optimizer)
    if optimizer not in OPTIMIZERS:
        raise PeftLabError(f"--optimizer {optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)} or paged")
    if batch_size < 1 or seq_len < 1:
        raise PeftLabError(f"--batch_size and --seq_len must be >= 1 (got {batch_size}, {seq_len})")
    if attention not in ("fused", "eager"):
        raise PeftLabError(f"--attention {attention!r} is unknown; choose fused or eager")
    module = build_meta(spec, num_labels)
    weights, grads, states, notes = parameter_memory(module, precision, optimizer)
    _cast_for_training(module, precision)
    trace = trace_activations(module, meta_batch(module.task, batch_size, seq_len, target_len), attention)
    acts = trace.total(gradient_checkpointing)
    block = human_bytes(max(trace.per_layer or [0]))
    notes["activations"] = (f"saved for backward: {len(trace.per_layer)} blocks" +
                            (f" checkpointed (inputs {human_bytes(trace.layer_inputs)} + one block {block})"
                             if gradient_checkpointing else f" x ~{block}") +
                            f" + {human_bytes(trace.outside)} outside them (embeddings, head, loss)"
                            f"; + {human_bytes(trace.workspace)} backward workspace")
    return MemoryEstimate(
        method=label or spec.name, backbone=spec.init_args.get("backbone", ""), task=module.task,
        batch_size=batch_size, seq_len=seq_len, precision=precision, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, attention=attention,
        target_len=(target_len or seq_len) if module.task == "seq2seq" else None, weights=weights, gradients=grads,
        optimizer_states=states, activations=acts, trainable=module.trainable_count, total_params=module.total_count,
        notes=notes)


# ---------------------------------------------------------------------------------------------- specs
def default_task(backbone: str) -> str:
    """causal_lm for decoders, seq2seq for encoder-decoders, classification for encoders."""
    from transformers import AutoConfig

    from peftlab.assets import resolve_model
    from peftlab.backbones import is_decoder_only

    path = resolve_model(resolve_backbone(backbone))
    try:
        if getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False):
            return "seq2seq"
    except Exception as err:  # noqa: BLE001 - transformers raises several types
        raise PeftLabError(f"could not read the config of backbone {backbone!r}: {str(err).splitlines()[0]}") from err
    return "causal_lm" if is_decoder_only(path) else "classification"


def preset_spec(method: str, backbone: str, task: str, *, r: int | None = None,
                target_modules: list[str] | None = None, num_virtual_tokens: int | None = None,
                bottleneck: int | None = None) -> MethodSpec:
    """The method's preset (its ``configs/methods/<name>.yaml``, the one source of its settings) on ``backbone``.

    The preset's LoRA targets name the layers of the backbone it was written for (MiniLM's query/value); on
    another backbone they become the same projections there (:func:`peftlab.analysis.params.adapt_targets`).
    ``r``, ``num_virtual_tokens`` and ``bottleneck`` override the preset where the method scales them
    (:meth:`~peftlab.methods.PeftModule.scaled_preset`: LoRA's ``--r`` also sets ``alpha = 2r``);
    ``target_modules`` replaces the targets of methods that adapt layers."""
    cls = method_class(method)
    # the class says which knobs it scales and whether its targets name layers (a stack asks its parts)
    args: dict[str, Any] = cls.scaled_preset(
        cls.preset_args(), lambda targets: target_modules or adapt_targets(targets, backbone, task), r=r,
        num_virtual_tokens=num_virtual_tokens, bottleneck=bottleneck)
    return MethodSpec(f"{cls.__module__}.{cls.__qualname__}", {**args, "backbone": backbone, "task": task})


@contextlib.contextmanager
def size_backbone(size: str):
    """The backbone path of ``--size`` (a Llama-shaped config; 13B is written to a temporary directory)."""
    key = size.lower()
    if key not in SIZES:
        raise PeftLabError(f"--size {size!r} is unknown; choose one of {', '.join(SIZES)} or give --backbone/--config")
    if key != "13b":
        yield SIZES[key]
        return
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(LLAMA_2_13B, f)
        yield tmp


def _first(*values: Any) -> Any:
    """The first value that is not None (0 is a value: it is rejected later with a clear message)."""
    return next((v for v in values if v is not None), None)


def precision_of(trainer_precision: Any) -> str:
    text = str(trainer_precision or "32")
    return "bf16" if "bf16" in text else "fp16" if text.startswith("16") else "fp32"


def specs_from_args(args: Any, fit_args: Sequence[str], backbone: str | None) -> list[MethodSpec]:
    """The methods to estimate: the config's (or presets on its backbone, with its data/trainer settings), or
    presets on ``backbone``. ``args`` has the command's ``method``, ``task``, ``r``, ``target_modules`` and
    ``num_virtual_tokens``; ``fit_args`` are ``peftlab fit`` arguments (``--config FILE``, overrides)."""
    def presets(methods, backbone: str, task: str, like: MethodSpec | None = None) -> list[MethodSpec]:
        specs = [preset_spec(m, backbone, task, r=args.r, target_modules=args.target_modules,
                             num_virtual_tokens=args.num_virtual_tokens, bottleneck=getattr(args, "bottleneck", None))
                 for m in methods]
        for spec in specs:
            spec.data, spec.trainer = (like.data, like.trainer) if like else ({}, {})
        return specs

    if has_config(fit_args):
        spec = parse_fit_config(with_backbone(fit_args, backbone), prog="peftlab estimate-memory")
        if args.task:
            spec.init_args["task"] = args.task
        same = args.method not in (None, "all") and spec.class_path.endswith("." + method_class(args.method).__name__)
        if args.method is None or same:
            return [spec]
        return presets(method_names() if args.method == "all" else [args.method], spec.init_args["backbone"],
                       spec.task, like=spec)
    if fit_args:
        raise PeftLabError(f"{fit_args[0]} needs --config FILE (it overrides a config); see peftlab estimate-memory "
                           "--help")
    if backbone is None:
        raise PeftLabError("give a backbone: --size 7b, --backbone PATH_OR_NAME or --config FILE")
    return presets(method_names() if args.method in (None, "all") else [args.method], backbone,
                   args.task or default_task(backbone))


def estimate_memory_command(
    *, size: str | None = None, backbone: str | None = None, method: str | None = None,
    task: Literal["classification", "causal_lm", "seq2seq"] | None = None, num_labels: int | None = None,
    batch_size: int | None = None, seq_len: int | None = None, target_len: int | None = None,
    precision: Precision | None = None, optimizer: str | None = None, gradient_checkpointing: bool | None = None,
    attention: Literal["fused", "eager"] = "fused", r: int | None = None, target_modules: list[str] | None = None,
    num_virtual_tokens: int | None = None, bottleneck: int | None = None, json: bool = False,
    fit_args: Sequence[str] = (),
) -> list[MemoryEstimate]:
    """Training memory of a method by component, without loading weights.

    Weights, gradients, optimizer states and activations of full fine-tuning, LoRA, QLoRA, prefix and prompt
    tuning (every registered method), each built as training builds it on the meta device. The backbone is one
    of --size, --backbone or --config; with --config the method and its settings (batch size, max_length,
    precision, optimizer) come from the config. docs/decision.md states the formulas.

    Args:
        size: a Llama-shaped model: 1b, 7b, 13b or 70b
        backbone: model directory, config.json, shipped shape (configs/backbones/), packaged:NAME or hub name
        method: a method's name (full, lora, qlora, prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2,
            adapters, lora_prompt, or any registered method) or all (default: the config's method, else all);
            each with its preset settings (configs/methods/<name>.yaml)
        task: default: data.task of the config, else from the backbone (decoder: causal_lm, ...)
        num_labels: classes for classification (default 2)
        batch_size: default: data.batch_size of the config, else 1
        seq_len: tokens per example (default: data.max_length of the config, else 512)
        target_len: seq2seq decoder length (default: data.max_target_length or seq_len)
        precision: default: trainer.precision of the config, else bf16
        optimizer: adamw, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit or paged (default: the model's,
            else adamw)
        gradient_checkpointing: recompute activations in backward (default: the model's setting, else off)
        attention: fused: flash/memory-efficient SDPA (GPUs, no seq x seq scores); eager: scores saved (eager
            attention, or SDPA with attention dropout on CPU)
        r: LoRA-family rank for --method presets (alpha = 2r; default: the preset's)
        target_modules: LoRA/QLoRA targets for presets (default: Q and V)
        num_virtual_tokens: virtual tokens of the prompt/prefix presets (default: the preset's)
        bottleneck: bottleneck width of the adapter presets (default: the preset's)
        json: print a JSON list of estimates
        fit_args: `peftlab fit`'s arguments: --config FILE and --model.* / --data.* / --trainer.* overrides

    Examples:
        peftlab estimate-memory --size 7b --batch_size 4 --seq_len 1024 --gradient_checkpointing
        peftlab estimate-memory --config configs/quickstart.yaml --precision fp32
        peftlab estimate-memory --backbone llama-2-70b --method qlora --optimizer paged --json
    """
    if size and backbone:
        raise PeftLabError("give either --size or --backbone, not both")
    args = argparse.Namespace(method=method, task=task, r=r, target_modules=target_modules,
                              num_virtual_tokens=num_virtual_tokens, bottleneck=bottleneck)
    with contextlib.ExitStack() as stack:
        chosen = stack.enter_context(size_backbone(size)) if size else backbone
        results = []
        specs = specs_from_args(args, fit_args, chosen)
        skipped: list[tuple[str, Exception]] = []
        for spec in specs:
            data, trainer, model = spec.data, spec.trainer, spec.init_args
            try:
                result = estimate(
                spec,
                batch_size=_first(batch_size, data.get("batch_size"), 1),
                seq_len=_first(seq_len, data.get("max_length"), 512),
                target_len=_first(target_len, data.get("max_target_length")),
                precision=precision or (precision_of(trainer.get("precision")) if trainer else "bf16"),
                optimizer=optimizer or model.get("optimizer") or "adamw",
                gradient_checkpointing=bool(gradient_checkpointing if gradient_checkpointing is not None
                                            else model.get("gradient_checkpointing", False)),
                attention=attention, num_labels=num_labels)
            except Exception as err:  # noqa: BLE001 - a plugin method may fail to build with any error type
                if len(specs) == 1:
                    raise
                # --method all: a registered method that does not apply to this backbone (e.g. BitFit on a model
                # without biases, a plugin targeting modules it lacks) is named and skipped, not allowed to sink
                # the whole table; an error every method hits (a bad option) is raised below
                skipped.append((spec.name, err))
                continue
            results.append(result)
        if skipped and not results:
            raise skipped[0][1]
        for name, err in skipped:
            print(f"estimate-memory: skipped {name}: {type(err).__name__ + ': ' if not isinstance(err, PeftLabError) else ''}"
                  f"{' '.join(str(err).split())[:300]}", file=sys.stderr)
        if size:
            for r_ in results:
                r_.backbone = f"{size} ({SIZES[size.lower()]})"
    if json:
        from json import dumps

        print(dumps([r_.as_dict() for r_ in results]))
    else:
        print("\n\n".join("\n".join(r_.lines()) for r_ in results))
    return results
