"""``peftlab evaluate``: lm-evaluation-harness tasks on a trained run of any method, or on a bare backbone.

    peftlab evaluate runs/quickstart/version_0 --tasks peftlab_rotten_tomatoes_mc --limit 100
    peftlab evaluate --backbone packaged:SmolLM2-135M-Instruct --tasks peftlab_rotten_tomatoes_mc   # the baseline row
    peftlab evaluate RUN --tasks arc_easy hellaswag --num_fewshot 5                         # standard tasks (hub data)
    peftlab evaluate RUN --tasks my_task.yaml                                              # a task file of your own

The run's model is the one :func:`peftlab.api.load_run` builds, wrapped as an lm-eval LM
(:class:`peftlab.eval_lm.PeftLabLM`). Everything a user can get wrong (the lm-eval version, the run, the tasks and
their files, ``--limit``) is checked, one line each, before a model is loaded. Results go to
``RUN/eval/<timestamp>/``: ``results.json`` (lm-eval's per-task metrics with their stderr, the task configs, this
command's arguments, library versions) and, with ``--log_samples``, ``samples_<task>.jsonl``.

Tasks shipped with peftlab (``peftlab/eval_tasks/``, offline, over packaged data) are named ``peftlab_*``. Relative
``data_files`` in a task YAML (shipped or yours) are read relative to that YAML, not to the working directory.
"""

from __future__ import annotations

import functools
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from peftlab.errors import PeftLabError, did_you_mean

#: the lm-eval releases peftlab's wrapper is written against (``pip install 'peftlab[eval]'``)
LM_EVAL_RANGE = ("0.4", "0.5")
TASKS_DIR = Path(__file__).parent / "eval_tasks"
#: lm-eval task types that need the model's token distribution (a causal LM, not a classifier's head)
LM_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


def check_lm_eval() -> str:
    """The installed lm-eval version, or one line saying how to install a supported one."""
    try:
        version = metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise PeftLabError("peftlab evaluate needs lm-eval: pip install 'peftlab[eval]' "
                           f"(lm-eval>={LM_EVAL_RANGE[0]},<{LM_EVAL_RANGE[1]})") from None
    low, high = (_version_tuple(v) for v in LM_EVAL_RANGE)
    if not low <= _version_tuple(version) < high:
        raise PeftLabError(f"lm-eval {version} is installed; peftlab evaluate supports lm-eval>={LM_EVAL_RANGE[0]},"
                           f"<{LM_EVAL_RANGE[1]}: pip install 'lm-eval>={LM_EVAL_RANGE[0]},<{LM_EVAL_RANGE[1]}'")
    return version


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# ---------------------------------------------------------------------------------------------- tasks
def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML file of the tasks shipped in ``peftlab/eval_tasks``."""
    import yaml

    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        out[yaml.safe_load(path.read_text(encoding="utf-8"))["task"]] = path
    return out


def _load_yaml(path: Path) -> dict:
    """A task YAML as lm-eval reads it (``include:`` merged, ``!function`` resolved), across lm-eval 0.4.x."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10

        return load_yaml(path)
    except ImportError:
        from lm_eval.utils import load_yaml_config

        return load_yaml_config(yaml_path=str(path))


def task_config(path: Path) -> dict:
    """The config of the task YAML at ``path`` with its relative data paths made absolute (relative to the YAML),
    or one line naming what is wrong with the file."""
    if not path.is_file():
        raise PeftLabError(f"task file {path} does not exist")
    try:
        config = _load_yaml(path)
    except Exception as err:  # noqa: BLE001 - yaml errors, a !function naming a missing module, ...
        first = " ".join(str(err).split())[:200]
        raise PeftLabError(f"task file {path} cannot be read: {first}; check its YAML syntax") from err
    if not isinstance(config, dict) or not config.get("task"):
        raise PeftLabError(f"task file {path} has no `task:` name; an lm-eval task YAML names its task")
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is not None:
        def absolute(name: str) -> str:
            p = Path(name).expanduser()
            p = p if p.is_absolute() else path.parent / p
            if "://" not in name and not p.exists():
                raise PeftLabError(f"task {config['task']!r} ({path}) names data file {name!r}, which does not "
                                   f"exist (looked for {p}); relative data_files are read relative to the YAML")
            return str(p) if "://" not in name else name

        if isinstance(files, dict):
            kwargs["data_files"] = {split: [absolute(f) for f in (v if isinstance(v, list) else [v])]
                                    for split, v in files.items()}
        else:
            kwargs["data_files"] = [absolute(f) for f in (files if isinstance(files, list) else [files])]
        config["dataset_kwargs"] = kwargs
    elif str(config.get("dataset_path", "")) in ("json", "csv", "parquet", "text"):
        raise PeftLabError(f"task {config['task']!r} ({path}) reads dataset_path {config['dataset_path']!r} but "
                           "names no dataset_kwargs.data_files; add the file(s) it should read")
    return config


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None, index_lm_eval: bool = True):
    """lm-eval's TaskManager, once per process: its index of lm-eval's ~15,000 task names takes seconds to build,
    so it is skipped (where lm-eval allows: ``include_defaults``, lm-eval >= 0.4.10) when every task is peftlab's
    or a YAML file."""
    from lm_eval.tasks import TaskManager

    kwargs = {"include_path": include_path} if include_path else {}
    if not index_lm_eval:
        try:
            return TaskManager(include_defaults=False, **kwargs)
        except TypeError:  # an older lm-eval indexes its tasks always
            pass
    return TaskManager(**kwargs)


def resolve_tasks(tasks: list[str], include_path: str | None = None) -> tuple[list[str | dict], Any]:
    """(what ``simple_evaluate`` takes for each of ``tasks``, lm-eval's TaskManager): a shipped task's or a task
    YAML's config (dict), or the name of a task in lm-eval's index; an unknown name fails naming the closest."""
    shipped = shipped_tasks()
    resolved: list[str | dict] = []
    named = [t for t in tasks if not t.endswith((".yaml", ".yml")) and t not in shipped]
    manager = task_manager(include_path, index_lm_eval=bool(named or include_path))
    for name in tasks:
        if name.endswith((".yaml", ".yml")):
            resolved.append(task_config(Path(name)))
        elif name in shipped:
            resolved.append(task_config(shipped[name]))
        elif name in manager.all_tasks:
            resolved.append(name)
        else:
            raise PeftLabError(f"unknown task {name!r}.{did_you_mean(name, [*shipped, *manager.all_tasks])} "
                               f"peftlab's own: {', '.join(shipped)}; lm-eval's: `lm-eval ls tasks`; or give a task "
                               "YAML file")
    return resolved, manager


def check_limit(limit: float | None) -> float | int | None:
    """``limit`` as lm-eval reads it (a whole count of documents, or a fraction below 1.0), or a one-line error."""
    if limit is not None and limit <= 0:
        raise PeftLabError(f"--limit must be positive (examples per task, or a fraction below 1.0), got {limit}; "
                           "leave it out to evaluate every example")
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise PeftLabError(f"--limit {limit}: a count of examples is a whole number (a fraction is below 1.0)")
        return int(limit)
    return limit


def _output_type(spec: str | dict, manager) -> str | None:
    if isinstance(spec, dict):
        return spec.get("output_type")
    return None  # an indexed task or group: lm-eval reads its type when it builds it


def task_label(spec: str | dict) -> str:
    return spec["task"] if isinstance(spec, dict) else spec


# ---------------------------------------------------------------------------------------------- the command
def evaluate_command(
    run: str | None = None,
    /,
    tasks: list[str] | None = None,
    backbone: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    gen_kwargs: dict[str, Any] | None = None,
    apply_chat_template: bool | None = None,
    log_samples: bool = False,
    include_path: str | None = None,
    output_dir: str | None = None,
    device: str = "auto",
) -> dict:
    """Run lm-evaluation-harness tasks on a trained run of any method (or a bare backbone).

    The run is scored as it was trained: the adapter applied, nothing merged.

    Args:
        run: run directory (``runs/<name>/version_N``) or exported adapter directory; leave out and pass
            ``--backbone`` for the base model's row
        tasks: task names (peftlab's ``peftlab_*`` tasks, any lm-eval task) or task YAML files
        backbone: with a run: load the adapter onto this backbone instead of the recorded one; alone: evaluate
            this backbone without an adapter
        limit: examples per task (an integer), or a fraction of each task below 1.0, as lm-eval reads it
        num_fewshot: few-shot examples per prompt (default: the task's own setting)
        batch_size: requests per forward pass
        seed: seed of lm-eval's few-shot sampling and of python/numpy/torch
        max_length: longest input in tokens (default: the model's ``max_position_embeddings``)
        max_gen_toks: tokens generated when a generation task does not say
        gen_kwargs: generation settings that override the tasks' (e.g. ``{do_sample: true, temperature: 0.7}``)
        apply_chat_template: format prompts with the tokenizer's chat template (default: when the run is a chat run)
        log_samples: also write every example's prompt, model output and score (``samples_<task>.jsonl``)
        include_path: a folder of your own task YAMLs for lm-eval's index
        output_dir: where results go (default: ``RUN/eval/<timestamp>``, for a backbone alone
            ``eval/<backbone>/<timestamp>``)
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...

    Examples:
        peftlab evaluate runs/quickstart/version_0 --tasks peftlab_rotten_tomatoes_mc --limit 100
        peftlab evaluate --backbone packaged:SmolLM2-135M-Instruct --tasks peftlab_rotten_tomatoes_mc --limit 100
    """
    # everything that can be wrong is found before a model is loaded
    lm_eval_version = check_lm_eval()
    if not tasks:
        raise PeftLabError("name at least one task: --tasks peftlab_rotten_tomatoes_mc (or any lm-eval task)")
    limit = check_limit(limit)
    if batch_size < 1:
        raise PeftLabError(f"--batch_size must be at least 1, got {batch_size}")
    if run is None and backbone is None:
        raise PeftLabError("name a run (peftlab evaluate RUN --tasks ...) or, for the base model alone, --backbone")
    meta = _run_meta(run) if run is not None else None
    if meta is not None and meta.get("task") != "causal_lm":
        raise PeftLabError(f"run {run} is a {meta.get('task')} run: lm-eval tasks ({', '.join(tasks)}) score a "
                           "causal LM's text (log-likelihoods, generations); evaluate a run trained with "
                           "data.task causal_lm")
    specs, manager = resolve_tasks(list(tasks), include_path)
    for spec in specs:
        kind = _output_type(spec, manager)
        if kind is not None and kind not in LM_OUTPUT_TYPES:
            raise PeftLabError(f"task {task_label(spec)!r} has output_type {kind!r}; lm-eval's are "
                               f"{', '.join(LM_OUTPUT_TYPES)}")

    import torch

    from peftlab.eval_lm import PeftLabLM

    target = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    if run is not None:
        from peftlab.api import load_run

        loaded = load_run(run, backbone=backbone)
        loaded.module.to(target)
        lm = PeftLabLM.from_run(loaded, batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks)
    else:
        from peftlab.backbones import load_backbone, load_tokenizer

        model = load_backbone(backbone, "causal_lm").to(target)
        lm = PeftLabLM(model, load_tokenizer(backbone), batch_size=batch_size, max_length=max_length,
                       max_gen_toks=max_gen_toks)
    chat = lm.chat if apply_chat_template is None else apply_chat_template
    if chat and not lm.template:
        raise PeftLabError(f"--apply_chat_template: the tokenizer of {backbone or meta.get('backbone')!r} has no "
                           "chat template; leave the option out or use a chat model's tokenizer")
    results = run_tasks(lm, specs, manager, limit=limit, num_fewshot=num_fewshot, seed=seed, gen_kwargs=gen_kwargs,
                        apply_chat_template=bool(chat), log_samples=log_samples)
    directory = _output_directory(output_dir, run, backbone)
    arguments = {"run": run, "tasks": list(tasks), "backbone": backbone, "limit": limit, "num_fewshot": num_fewshot,
                 "batch_size": batch_size, "seed": seed, "max_length": lm.max_length, "max_gen_toks": max_gen_toks,
                 "gen_kwargs": gen_kwargs, "apply_chat_template": bool(chat), "device": str(target)}
    write_results(directory, results, arguments, lm_eval_version)
    print(results_table(results))
    print(f"[peftlab] results in {directory}")
    return {"directory": str(directory), "results": results["results"]}


def results_table(results: dict) -> str:
    """A Markdown table of lm-eval's per-task metrics: task, filter, n-shot, metric, value, stderr, documents.

    Ours, not ``lm_eval.utils.make_table``: with pytablewriter 0.38 that table's headers print as A, B, C, ..."""
    lines = ["| Task | Filter | n-shot | Metric | Value | Stderr | Docs |", "|---|---|--:|---|--:|--:|--:|"]
    for task, values in (results.get("results") or {}).items():
        shots = (results.get("n-shot") or {}).get(task, "")
        docs = ((results.get("n-samples") or {}).get(task) or {}).get("effective", "")
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            shown = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-"
            lines.append(f"| {task} | {filt} | {shots} | {metric} | {value:.4f} | {shown} | {docs} |")
    return "\n".join(lines)


def run_tasks(lm, specs: list[str | dict], manager, *, limit=None, num_fewshot=None, seed: int = 0,
              gen_kwargs: dict | None = None, apply_chat_template: bool = False, log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` with ``lm`` on the resolved task ``specs``: lm-eval's results dict."""
    import lm_eval

    settings = ",".join(f"{k}={v}" for k, v in (gen_kwargs or {}).items()) or None
    return lm_eval.simple_evaluate(
        model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        gen_kwargs=settings, apply_chat_template=apply_chat_template, log_samples=log_samples)


def _run_meta(run: str) -> dict:
    from peftlab.adapters import adapter_directory, read_meta

    return read_meta(adapter_directory(Path(run)))


def _output_directory(output_dir: str | None, run: str | None, backbone: str | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if output_dir:
        return Path(output_dir)
    if run is not None:
        base = Path(run) / "eval"
    else:
        base = Path("eval") / "".join(c if c.isalnum() or c in "-_." else "_" for c in str(backbone))
    directory, n = base / stamp, 1
    while directory.exists():  # two evaluations in one second
        directory, n = base / f"{stamp}-{n}", n + 1
    return directory


def write_results(directory: Path, results: dict, arguments: dict, lm_eval_version: str) -> None:
    """``results.json`` (metrics with stderr, task configs, arguments, versions) and any per-sample logs."""
    from lm_eval.utils import handle_non_serializable

    from peftlab.runinfo import library_versions

    directory.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    record = {key: results.get(key) for key in ("results", "groups", "group_subtasks", "configs", "versions",
                                                 "n-shot", "higher_is_better", "n-samples") if key in results}
    record["arguments"] = arguments
    record["versions_of_libraries"] = {**library_versions(), "lm_eval": lm_eval_version}
    (directory / "results.json").write_text(json.dumps(record, indent=2, default=handle_non_serializable) + "\n",
                                            encoding="utf-8")
    for task, rows in samples.items():
        with open(directory / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable) + "\n")
    if samples:
        results["samples"] = samples
