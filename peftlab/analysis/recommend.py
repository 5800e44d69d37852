"""``peftlab recommend``: the design notes' method choice for your constraints, as a ready config.

The rules combine the two decision tables of peftlab's design notes, reproduced in docs/decision.md: the
*decision tree* and *task table* ("Choosing a Method": a tree of questions, and a rank per task type) and the
*scenario table* ("Prefix / P-Tuning vs LoRA / QLoRA": a method per deployment scenario), checked
in this order, hard constraints first:

====  ==========================================  =================================  ======================
 #    question (flag)                             answer -> method                   source
====  ==========================================  =================================  ======================
 1    API-only access (--api_only)                prompt engineering (no training)   000: API-only
 2    weights may not be modified (--frozen_weights) P-tuning v2                     000: edge / no modif.
 3    latency-critical inference (--latency_critical) LoRA, merged after training    003 tree, question 1
 4    compute extremely limited (--compute_limited)   prompt tuning                  003 tree, question 2
 5    few-shot / very little data (--few_shot)    P-tuning v2                        000: few-shot
 6    max quality at min cost (--max_quality_min_cost) QLoRA, all linear layers     000: max quality
 7    task is classification (--task_type)        LoRA r=4 (or prompt tuning)        003 tree, question 3
 8    combine several tasks (--multi_task combine)   bottleneck adapters             003 tree, question 4
 9    many tasks, hot-swapped (--multi_task hot_swap) LoRA, one adapter per task    000: dozens of tasks
 10   per-layer control (--per_layer_control)     LoRA with explicit targets         000: per-layer tuning
 11   task type instruction/domain/style/code     LoRA r=8 / r=16 / r=8 / r=16 all   003 task-specific
 12   otherwise                                   LoRA r=8, alpha=16 on Q+V          003 tree, default
====  ==========================================  =================================  ======================

The rank and targets of every LoRA answer follow the task type (classification r=4; instruction r=8;
domain adaptation r=16, try 32; style r=8; code r=16 on all attention and feed-forward projections).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from peftlab.errors import PeftLabError

TaskType = Literal["classification", "instruction", "domain", "style", "code", "other"]
MultiTask = Literal["none", "combine", "hot_swap"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
MULTI_TASK: tuple[str, ...] = get_args(MultiTask)
GENERATIVE = ("instruction", "domain", "style", "code")
HEADER = "# Written by `peftlab recommend`"

# task type -> (LoRA rank, target scope, why)
LORA_BY_TASK = {
    "classification": (4, "qv", "classification is simple: a low rank suffices and overfits less "
                                "(task table: LoRA r=4)"),
    "instruction": (8, "qv", "instruction following needs moderate capacity (task table: LoRA r=8-16; start at 8)"),
    "domain": (16, "qv", "domain adaptation must learn new knowledge (task table: LoRA r=16-32; start at 16)"),
    "style": (8, "qv", "style/persona steers behaviour rather than adding knowledge (task table: LoRA r=8)"),
    "code": (16, "attention_ffn", "code is complex and benefits from adapting Q, K, V, O and the FFN "
                                  "(task table: LoRA r=8-16 on all attention weights, maybe FFN)"),
    "other": (8, "qv", "the decision tree's default starting point (LoRA r=8, alpha=16 on Q and V)"),
}

def preset(method: str, **overrides) -> dict[str, Any]:
    """A method's preset settings (``configs/methods/<name>.yaml``, the one source of hyperparameters), with the
    recommendation's own ``overrides`` (a rank chosen for the task type, ...)."""
    from peftlab.analysis.memory import method_class

    args = method_class(method).preset_args()
    args.pop("target_modules", None) if "r" in args else None  # LoRA targets are resolved for the backbone
    return {**args, **overrides}


@dataclass
class Answers:
    """The design notes' questions (docs/decision.md). ``None`` means not answered (asked interactively on a terminal, else ``False``)."""

    api_only: bool | None = None
    frozen_weights: bool | None = None
    latency_critical: bool | None = None
    compute_limited: bool | None = None
    few_shot: bool | None = None
    max_quality_min_cost: bool | None = None
    task_type: str | None = None
    num_tasks: int | None = None
    multi_task: str | None = None
    per_layer_control: bool | None = None


QUESTIONS = {
    "api_only": "Do you only have API access to the model (no weights)?",
    "frozen_weights": "Must the deployed weights stay unmodified (edge device, frozen / shared deployment)?",
    "latency_critical": "Is inference latency critical?",
    "compute_limited": "Is compute extremely limited?",
    "few_shot": "Is this few-shot learning / do you have very little data (hundreds of examples or fewer)?",
    "max_quality_min_cost": "Do you want near full fine-tuning quality at the lowest GPU memory cost?",
    "per_layer_control": "Do you want to choose per layer / module type what is adapted "
                         "(e.g. only attention or only FFN)?",
}


@dataclass
class Recommendation:
    """A method with its starting hyperparameters and the reasoning."""

    rule: str
    method: str
    class_path: str | None
    init_args: dict[str, Any]
    reason: str
    alternatives: str = ""
    targets: str | None = None  # LoRA target scope: qv / attention_ffn (resolved per backbone)
    notes: list[str] = field(default_factory=list)
    serving: str = ""  # how to deploy what is trained, when the rule is about deployment (hot-swapping)

    @property
    def summary(self) -> str:
        if self.class_path is None:  # advice without a method to train
            return self.method
        from peftlab.methods.registry import import_method

        return import_method(self.class_path).describe(self.init_args)


def _lora(rule: str, task_type: str, reason: str, *, qlora: bool = False, alternatives: str = "",
          scope: str | None = None, rank: int | None = None, notes: list[str] | None = None) -> Recommendation:
    r, default_scope, _ = LORA_BY_TASK[task_type]
    r = rank or r
    name = "QLoRA" if qlora else "LoRA"
    # the preset's settings with the rank of the task type; QLoRA is recommended to save memory, so with
    # activation recomputation on as well
    args = preset("qlora" if qlora else "lora", r=r, alpha=2 * r, **({"gradient_checkpointing": True} if qlora else {}))
    return Recommendation(rule, name, f"peftlab.methods.{name}", args, reason, alternatives,
                          targets=scope or default_scope, notes=notes or [])


#: what ``recommend`` prints for the hot-swap rule: the commands that do it (docs/multi-adapter.md)
HOT_SWAP_SERVING = ("train one adapter per task (or all of them in one run on one backbone: model "
                    "peftlab.multitask.MultiTask with data.tasks, configs/multitask_lora.yaml, docs/multi-task.md), "
                    "then load them all on one backbone: "
                    "peftlab.api.load_adapters({'task_a': 'runs/a/version_0', ...}).predict(texts, adapter='task_a'), "
                    "or serve them: peftlab serve task_a=runs/a/version_0 task_b=... (OpenAI API, model = adapter "
                    "name; docs/multi-adapter.md)")


def recommend(a: Answers) -> Recommendation:
    """The decision tables' recommendation for answers ``a`` (unanswered questions count as "no")."""
    task = a.task_type or "other"
    if task not in TASK_TYPES:
        raise PeftLabError(f"--task_type {task!r} is unknown; choose one of {', '.join(TASK_TYPES)}")
    multi = a.multi_task or ("hot_swap" if (a.num_tasks or 1) >= 10 else "none")
    if multi not in MULTI_TASK:
        raise PeftLabError(f"--multi_task {multi!r} is unknown; choose one of {', '.join(MULTI_TASK)}")
    task_why = LORA_BY_TASK[task][2]
    if a.api_only:
        return Recommendation(
            "api_only", "prompt engineering", None, {},
            "with API-only access nothing can be attached to the model: no soft prompts, prefixes or adapters "
            "(scenario table: 'Only API access -> prompt engineering'). Put instructions and a few examples in the "
            "prompt, or use the provider's own fine-tuning service.",
            "if you get the weights: LoRA r=8 on Q+V (run again without --api_only)")
    if a.frozen_weights:
        return Recommendation(
            "frozen_weights", "PTuningV2", "peftlab.methods.PTuningV2",
            preset("p_tuning_v2"),
            "the weights must stay untouched (edge / frozen deployment): P-tuning v2 only prepends virtual tokens "
            "and per-layer K/V prefixes, the model is never modified or repacked (scenario table: 'edge / no model "
            "modification -> Prefix / P-Tuning v2'). Precompute the prefixes after training and drop the MLP.",
            "PrefixTuning (simpler, slightly cheaper, less flexible)")
    if a.latency_critical:
        return _lora("latency_critical", task,
                     "inference latency is critical: LoRA's update folds into the weights after training (W + BA), "
                     f"so the deployed model has zero extra latency (decision tree, question 1); {task_why}. "
                     "After training: peftlab merge RUN_DIR --output MERGED_DIR.",
                     alternatives="QLoRA if GPU memory is short (merge dequantizes)")
    if a.compute_limited:
        return Recommendation(
            "compute_limited", "PromptTuning", "peftlab.methods.PromptTuning",
            preset("prompt_tuning"),
            "compute is extremely limited: prompt tuning trains only N x hidden embeddings, the fewest parameters "
            "and optimizer state of all methods (decision tree, question 2). It needs a large model to "
            "match fine-tuning (Lester et al. 2021: ~10B).",
            "QLoRA if the limit is GPU memory rather than compute")
    if a.few_shot:
        return Recommendation(
            "few_shot", "PTuningV2", "peftlab.methods.PTuningV2",
            preset("p_tuning_v2"),
            "few-shot / very little data: a small prompt-based adapter has little room to overfit (scenario table: "
            "'few-shot / little data -> Prefix / P-Tuning v2'); P-tuning v2 acts on the input and on every "
            "attention layer. peftlab's own measurement does not back this on a small model: on all-MiniLM-L6-v2, "
            "with every method's rate tuned, LoRA learnt most from few examples (docs/results/few_shot.md); try "
            "LoRA too.",
            "PrefixTuning (10 tokens) or LoRA r=4")
    if a.max_quality_min_cost:
        return _lora("max_quality_min_cost", task,
                     "near full fine-tuning quality at the least memory: QLoRA trains LoRA on a 4-bit NF4 backbone "
                     "(scenario table: 'maximum quality with minimum cost -> QLoRA'); the QLoRA paper needs LoRA on all "
                     "linear layers to match 16-bit fine-tuning, hence attention + FFN targets.",
                     qlora=True, scope="attention_ffn", rank=max(16, LORA_BY_TASK[task][0]),
                     alternatives="LoRA in bf16 if memory allows (faster per step)")
    if task == "classification":
        return _lora("simple_task", task,
                     "the task is simple (classification): LoRA r=4 on Q+V, few parameters and little risk of "
                     "overfitting (decision tree, question 3).",
                     alternatives="PromptTuning with 20 tokens (cheaper; weaker on models under ~10B)")
    if multi == "combine":
        return Recommendation(
            "combine_tasks", "BottleneckAdapter", "peftlab.methods.BottleneckAdapter",
            preset("adapters"),
            "several tasks have to be combined: bottleneck adapters are separate modules that are easy to swap and "
            "to stack/combine (decision tree, question 4). They add a little inference latency.",
            "one LoRA per task combined by weighted sum (task table: 'Multiple LoRAs')")
    if multi == "hot_swap":
        rec = _lora("hot_swap", task,
                     "many tasks served by hot-swapping: one small LoRA adapter per task on one shared backbone, "
                     f"loaded on demand (scenario table: 'dozens of tasks with hot-swapping -> LoRA / QLoRA'); {task_why}.",
                     alternatives="QLoRA for 7B+ backbones on small GPUs; bottleneck adapters")
        rec.serving = HOT_SWAP_SERVING
        return rec
    if a.per_layer_control:
        return _lora("per_layer", task,
                     "you want to choose what is adapted per layer type: LoRA takes any set of linear layers "
                     "(target_modules lists attention and FFN projections; delete the ones you do not want) "
                     "(scenario table: 'flexible per-layer tuning -> LoRA').", scope="attention_ffn")
    if task in GENERATIVE:
        return _lora(f"task_{task}", task, f"task-specific recommendation: {task_why}.",
                     alternatives={"domain": "r=32, or bottleneck adapters; consider continued pretraining first",
                                   "style": "PrefixTuning (10-20 tokens)",
                                   "instruction": "r=16 if underfitting",
                                   "code": "r=8 on attention only if memory is short"}[task])
    return _lora("default", task, "no constraint points elsewhere: the decision tree's default, LoRA r=8, alpha=16 on the Q "
                 "and V projections (decision tree: default); adjust from there.",
                 alternatives="PromptTuning for quick experiments")


# ---------------------------------------------------------------------------------------------- the command
def _ask_bool(question: str) -> bool:
    while True:
        reply = input(f"{question} [y/N] ").strip().lower()
        if reply in ("", "n", "no"):
            return False
        if reply in ("y", "yes"):
            return True


def _ask_choice(question: str, choices: tuple[str, ...], default: str) -> str:
    while True:
        reply = input(f"{question} ({'/'.join(choices)}) [{default}] ").strip().lower() or default
        if reply in choices:
            return reply


def fill_answers(a: Answers, interactive: bool) -> Answers:
    """Ask the unanswered questions on a terminal; elsewhere they count as "no" / "other"."""
    for key, question in QUESTIONS.items():
        if getattr(a, key) is None:
            setattr(a, key, _ask_bool(question) if interactive else False)
        if key == "api_only" and a.api_only:
            return a  # nothing else matters
    if a.task_type is None:
        a.task_type = _ask_choice("Task type?", TASK_TYPES, "other") if interactive else "other"
    if a.num_tasks is None:
        a.num_tasks = int(_ask_choice("How many tasks will share the backbone?", ("1", "2", "5", "10", "50"), "1")) \
            if interactive else 1
    if a.multi_task is None and a.num_tasks > 1:
        a.multi_task = _ask_choice("Combine them in one model, or hot-swap one adapter per request?",
                                   ("combine", "hot_swap"), "hot_swap") if interactive else "hot_swap"
    return a


def data_task(task_type: str, backbone: str) -> str | None:
    """``data.task`` for the task type on this backbone (None: keep the base config's)."""
    if task_type not in GENERATIVE:
        return None
    from transformers import AutoConfig

    from peftlab.analysis.memory import default_task
    from peftlab.analysis.params import resolve_backbone
    from peftlab.assets import resolve_model

    task = default_task(backbone)
    if task == "classification":
        model_type = AutoConfig.from_pretrained(resolve_model(resolve_backbone(backbone))).model_type
        raise PeftLabError(f"task type {task_type!r} needs a generative backbone, but {backbone!r} is an encoder "
                           f"({model_type}); give --backbone a decoder or encoder-decoder (e.g. "
                           "packaged:SmolLM2-135M-Instruct, configs/backbones/llama-2-7b, t5-base)")
    return task


def config_text(rec: Recommendation, backbone: str, task: str | None, answers: Answers) -> str:
    """The YAML of ``rec`` for ``backbone``: a model section (plus data.task for generative tasks)."""
    import yaml

    given = ", ".join(f"{k}={v}" for k, v in vars(answers).items() if v not in (None, False, "none", 1))
    model = {"class_path": rec.class_path, "init_args": {"backbone": backbone, **rec.init_args}}
    body: dict[str, Any] = {"model": model}
    if task:
        body["data"] = {"task": task}
    lines = [f"{HEADER} ({given or 'no constraints'}): {rec.summary}",
             f"# Why: {rec.reason}",
             "# Train (layered on a base config that has the trainer and data sections; set your data):",
             "#   peftlab fit --config configs/quickstart.yaml --config THIS_FILE --data.source YOUR_DATA",
             "#   peftlab params --config configs/quickstart.yaml --config THIS_FILE   # exact parameter counts"]
    if task:
        lines.append("# Generative data needs --data.prompt_template / --data.response_template "
                     "(see docs/getting-started.md).")
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def write_config(path: str, text: str, force: bool) -> None:
    """Write ``text`` atomically; refuse to replace a file peftlab recommend did not write unless ``force``."""
    if os.path.exists(path) and not force:
        with open(path, encoding="utf-8") as f:
            if not f.read(len(HEADER)).startswith(HEADER):
                raise PeftLabError(f"{path} exists and was not written by peftlab recommend; pass --force to "
                                   "replace it or --output another file")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def recommend_command(
    *, api_only: bool | None = None, frozen_weights: bool | None = None, latency_critical: bool | None = None,
    compute_limited: bool | None = None, few_shot: bool | None = None, max_quality_min_cost: bool | None = None,
    per_layer_control: bool | None = None, task_type: TaskType | None = None, num_tasks: int | None = None,
    multi_task: MultiTask | None = None, backbone: str | None = None, all_methods: bool = True,
    output: str = "recommended.yaml", force: bool = False,
) -> Recommendation:
    """Recommend a PEFT method from the design notes' decision tables and write its config.

    The design notes' questions are checked in order, hard constraints first (docs/decision.md has the table); the
    answer is written as a ready config for your backbone, with the method's exact trainable parameters.
    Unanswered yes/no questions are asked on a terminal, else count as no.

    Args:
        api_only: Do you only have API access to the model (no weights)?
        frozen_weights: Must the deployed weights stay unmodified (edge device, frozen / shared deployment)?
        latency_critical: Is inference latency critical?
        compute_limited: Is compute extremely limited?
        few_shot: Is this few-shot learning / do you have very little data (hundreds of examples or fewer)?
        max_quality_min_cost: Do you want near full fine-tuning quality at the lowest GPU memory cost?
        per_layer_control: Do you want to choose per layer / module type what is adapted (e.g. only attention
            or only FFN)?
        task_type: what the model must learn
        num_tasks: tasks sharing one backbone (10+ implies hot-swapping)
        multi_task: combine: one model does several tasks at once; hot_swap: one adapter per task, swapped
            per request
        backbone: your model (dir, config.json, shipped shape, packaged:NAME, hub name); default
            packaged:all-MiniLM-L6-v2, or packaged:SmolLM2-135M-Instruct for generative tasks
        all_methods: also list every registered method with its preset's exact trainable parameters
        output: config file to write
        force: replace --output even if peftlab recommend did not write it

    Examples:
        peftlab recommend --task_type code --latency_critical --backbone configs/backbones/llama-2-7b
        peftlab recommend --few_shot --no-api_only --output few_shot.yaml --force
    """
    from peftlab.analysis.params import MethodSpec, build_meta, target_modules_for

    if num_tasks is not None and num_tasks < 1:
        raise PeftLabError(f"--num_tasks must be >= 1 (got {num_tasks})")
    answers = Answers(api_only=api_only, frozen_weights=frozen_weights, latency_critical=latency_critical,
                      compute_limited=compute_limited, few_shot=few_shot, max_quality_min_cost=max_quality_min_cost,
                      task_type=task_type, num_tasks=num_tasks, multi_task=multi_task,
                      per_layer_control=per_layer_control)
    answers = fill_answers(answers, interactive=sys.stdin.isatty())
    rec = recommend(answers)
    out = [f"recommended  {rec.summary}" + (f" ({rec.class_path})" if rec.class_path else "")]
    out.append(f"why          {rec.reason}")
    if rec.alternatives:
        out.append(f"alternative  {rec.alternatives}")
    if rec.serving:
        out.append(f"serving      {rec.serving}")
    if rec.class_path is None:
        out.append("config       none written: there is nothing to train")
        print("\n".join(out))
        return rec
    backbone = backbone or ("packaged:SmolLM2-135M-Instruct" if answers.task_type in GENERATIVE
                            else "packaged:all-MiniLM-L6-v2")
    task = data_task(answers.task_type, backbone)
    if rec.targets:
        rec.init_args["target_modules"] = target_modules_for(backbone, task or "classification", rec.targets)
    spec = MethodSpec(rec.class_path, {"backbone": backbone, "task": task or "classification", **rec.init_args})
    module = build_meta(spec)  # checks the settings on this backbone and gives the exact counts
    hp = ", ".join(f"{k}={v}" for k, v in rec.init_args.items())
    out.insert(1, f"settings     {hp}")
    out.append(f"trainable    {module.trainable_count:,} of {module.total_count:,} parameters "
               f"({100 * module.trainable_count / module.total_count:.4g}%) on {backbone}")
    under, over = type(module).advice
    out.append(f"underfitting {under}")
    out.append(f"overfitting  {over}")
    if all_methods:
        out.append(f"all methods  (their presets, configs/methods/, on {backbone}; trainable parameters)")
        out += [f"  {line}" for line in method_table(backbone, task or "classification")]
    write_config(output, config_text(rec, backbone, task, answers), force)
    out.append(f"config       wrote {output}; train with: peftlab fit --config configs/quickstart.yaml "
               f"--config {output}" + (" --data.source YOUR_DATA ..." if task else ""))
    print("\n".join(out))
    return rec


def method_table(backbone: str, task: str) -> list[str]:
    """One line per registered method: its name, class and exact trainable parameters with its preset on
    ``backbone`` (built on the meta device), or why it does not fit."""
    from peftlab.analysis.memory import method_names, preset_spec
    from peftlab.analysis.params import build_meta

    lines = []
    for name in method_names():
        try:
            module = build_meta(preset_spec(name, backbone, task))
        except PeftLabError as err:
            lines.append(f"{name:<14} does not fit: {str(err)[:100]}")
            continue
        pct = 100 * module.trainable_count / module.total_count
        lines.append(f"{name:<14} {type(module).__name__:<18} {module.trainable_count:>14,} ({pct:.4g}%)")
    return lines
