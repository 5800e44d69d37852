"""The study file of ``peftlab compare``: reading it, checking it before anything trains, and the ``peftlab fit``
arguments of each run.

A study file (YAML) names the base config layers, the methods (each a config layer plus overrides, with a search
space), the budget, the seeds, the metric to select on and those to report; ``parts`` holds several such
sub-studies in one file (their keys are merged over the top level), ``smoke`` what ``--smoke`` changes.
docs/compare.md describes every key; :func:`load_study` reads and checks a file, raising a one-line
:class:`~peftlab.errors.PeftLabError` for the first problem.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.compare.schema import (
    Bootstrap,
    Budget,
    Forgetting,
    Generation,
    Latency,
    LmEval,
    MethodEntry,
    Tuning,
    check_keys,
    fail,
    read_section,
)
from peftlab.errors import PeftLabError, did_you_mean

TOP_KEYS = {"name", "title", "description", "study_dir", "publish", "base", "overrides", "budget", "seeds", "tuning",
            "select", "report", "baseline", "generation", "forgetting", "latency", "bootstrap", "search", "methods",
            "parts", "smoke", "keep_checkpoints", "expected_duration", "lm_eval", "notes"}
PART_KEYS = TOP_KEYS - {"parts", "study_dir", "publish", "name", "notes"}
SMOKE_ONLY = {"methods", "parts"}
#: dict-valued keys merged key by key over the top level (a part's or smoke's ``overrides`` add to the study's);
#: every other key a part sets replaces the study's (``methods`` included)
MERGED = {"overrides", "budget", "tuning", "search", "generation", "forgetting", "bootstrap", "lm_eval"}
#: what peftlab logs per task (``val/`` and ``test/``); generation adds GENERATED
LOGGED = {"classification": ("acc", "f1", "loss"), "causal_lm": ("loss", "ppl", "exact_match"),
          "seq2seq": ("loss", "ppl", "exact_match")}
GENERATED = ("gen_exact_match", "rougeL", "bleu")
LOWER_IS_BETTER = ("loss", "ppl")
#: the first segment of a study key that is a fit key as written; any other key is a method argument
#: (``model.init_args.<key>``). Not commands.FIT_ROOTS: here ``optimizer`` is PeftModule's own argument
STUDY_FIT_ROOTS = ("model", "data", "trainer", "seed_everything")


def direction(metric: str) -> str:
    """``minimize`` for losses and perplexities, ``maximize`` for the rest."""
    return "minimize" if metric.split("/", 1)[-1] in LOWER_IS_BETTER else "maximize"


def lm_eval_metric(metric: str) -> tuple[str, str, str] | None:
    """(stage, task, metric) of an lm-eval metric name ``<stage>/<task>/<metric>`` (``test/arc_easy/acc``), the names
    :class:`peftlab.callbacks.LMEval` logs; None for peftlab's own ``<stage>/<metric>``."""
    parts = metric.split("/")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def slug(name: str) -> str:
    """A directory / study-name-safe form of a method or part name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name.strip()).strip("_") or "_"


@dataclass
class Param:
    """One dimension of a search space: log-uniform / uniform float or int, or categorical ``choices``."""

    key: str  # fit key: model.init_args.learning_rate
    name: str  # as written in the study file: learning_rate
    low: float | None = None
    high: float | None = None
    log: bool = True
    integer: bool = False
    choices: list | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {self.choices}"
        return f"{self.name} {'log-' if self.log else ''}uniform [{self.low:g}, {self.high:g}]"

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass
class Method:
    name: str
    configs: list[str]
    overrides: dict[str, Any]
    search: list[Param]
    title: str | None = None
    #: filled by :func:`check_methods`: the parsed fit config (peftlab.analysis.params.MethodSpec)
    spec: Any = None

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass
class Part:
    """One comparison: methods x (tuning trials + seeds) on one task, with its metrics and budget."""

    name: str
    title: str
    description: str
    base: list[str]
    overrides: dict[str, Any]
    budget: dict[str, Any]
    seeds: list[int]
    tuning: dict[str, Any]
    select: str
    report: list[str]
    baseline: str | None
    generation: dict[str, Any] | None
    forgetting: dict[str, Any] | None
    latency: dict[str, Any] | None
    bootstrap: dict[str, Any]
    methods: dict[str, Method]
    lm_eval: dict[str, Any] | None = None
    keep_checkpoints: bool = False
    expected_duration: str | None = None
    task: str | None = None  # from the parsed configs (check_methods)

    @property
    def slug(self) -> str:
        return slug(self.name)

    @property
    def direction(self) -> str:
        return direction(self.select)

    @property
    def trials(self) -> int:
        return int(self.tuning.get("trials", 0))

    @property
    def tuning_seed(self) -> int:
        # by default a seed none of the seed runs uses: a seed run equal to the tuning run that won (same
        # initialisation and data order) would carry the selection's luck into the test results
        return int(self.tuning.get("seed", max(self.seeds) + 1))

    def fingerprint(self, method: Method) -> str:
        """What a method's stored results depend on: a different value means the study file changed under them."""
        def contents(paths: list[str]) -> list[str]:  # what the config layers say, not where they are
            return [Path(p).read_text(encoding="utf-8") if os.path.isfile(p) else p for p in paths]

        data = {"base": contents(self.base), "overrides": self.overrides, "budget": self.budget,
                "select": self.select, "tuning": {k: v for k, v in self.tuning.items()},
                "generation": self.generation, "forgetting": self.forgetting, "latency": self.latency,
                **({"lm_eval": self.lm_eval} if self.lm_eval else {}),  # (studies without one keep their fingerprint)
                "configs": contents(method.configs),
                "method_overrides": method.overrides, "search": [vars(p) for p in method.search]}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Study:
    name: str
    path: Path
    title: str
    description: str
    study_dir: Path
    publish: Path | None
    smoke: bool
    parts: list[Part]
    raw: dict = field(default_factory=dict)
    expected_duration: str | None = None
    #: a markdown file written after the study ran (what its numbers mean beside published ones), read into the
    #: results and printed at the end of the report; not part of any method's fingerprint
    notes: Path | None = None

    def method_count(self) -> int:
        return sum(len(p.methods) for p in self.parts)


# ---------------------------------------------------------------------------------------------- reading
def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if key in MERGED and isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def fit_key(key: str) -> str:
    """``learning_rate`` -> ``model.init_args.learning_rate``; ``data.batch_size`` stays; ``model`` (the class) too."""
    key = str(key)
    if key == "model" or key.split(".", 1)[0] in STUDY_FIT_ROOTS:
        return key
    return f"model.init_args.{key}"


def _params(where: str, space: Any) -> list[Param]:
    out = []
    for name, spec in check_keys(where, space, set(space or {})).items():
        here = f"{where}.{name}"
        key = fit_key(name)
        if key.startswith("model.init_args."):
            pass
        elif key.split(".", 1)[0] not in ("data", "trainer") or key == "model":
            raise fail(here, "a search space is over model arguments (learning_rate, head_learning_rate, r, ...) "
                        "or data.* / trainer.* settings")
        if isinstance(spec, list) and len(spec) == 2 and all(isinstance(v, (int, float)) for v in spec):
            p = Param(key, name, float(spec[0]), float(spec[1]))
        elif isinstance(spec, dict) and "choices" in spec:
            check_keys(here, spec, {"choices"})
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise fail(here, "choices must be a non-empty list")
            p = Param(key, name, choices=list(spec["choices"]))
        elif isinstance(spec, dict):
            check_keys(here, spec, {"low", "high", "log", "int"})
            if "low" not in spec or "high" not in spec:
                raise fail(here, "needs low and high (or [low, high], log-uniform, or choices: [...])")
            p = Param(key, name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", True)),
                      integer=bool(spec.get("int", False)))
        else:
            raise fail(here, f"must be [low, high] (log-uniform), {{low, high, log, int}} or {{choices: [...]}} "
                        f"(got {spec!r})")
        if p.choices is None:
            if not p.low < p.high:
                raise fail(here, f"low must be below high (got [{p.low:g}, {p.high:g}])")
            if p.log and p.low <= 0:
                raise fail(here, f"a log-uniform range must be positive (got [{p.low:g}, {p.high:g}]); "
                            "set log: false for a linear one")
        out.append(p)
    return out


def _configs(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise fail(where, f"must be a config file or a list of them (got {value!r})")
    return list(items)


def _resolve(path: str, study_path: Path) -> str:
    """A config path as given (relative to the working directory), else relative to the study file's folder."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    beside = study_path.parent / path
    return str(beside) if beside.exists() else path


def _overrides(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(where, f"must be a mapping of fit keys to values, e.g. {{data.batch_size: 16}} (got {value!r})")
    return {fit_key(k): v for k, v in value.items()}


def load_study(path: str | os.PathLike, *, smoke: bool = False, study_dir: str | None = None) -> Study:
    """Read and check the study file's structure (the configs themselves are checked by :func:`check_methods`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PeftLabError(f"study file {path} does not exist; see docs/compare.md for the format")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise PeftLabError(f"study file {path} is not valid YAML{f' (line {mark.line + 1})' if mark else ''}: "
                           f"{getattr(err, 'problem', None) or err}") from err
    top = check_keys(str(path), raw, TOP_KEYS)
    smoke_top = check_keys(f"{path}: smoke", top.get("smoke"), (PART_KEYS - {"smoke"}) | SMOKE_ONLY)
    name = str(top.get("name") or path.parent.name or path.stem)
    # the study's own title, description and duration are the page's: a part has its own or none
    common = {k: v for k, v in top.items() if k not in ("parts", "smoke", "study_dir", "publish", "name", "title",
                                                        "description", "expected_duration", "notes")}
    parts_raw = top.get("parts")
    if parts_raw is None:
        parts_raw = {"main": {}}
    if not isinstance(parts_raw, dict) or not parts_raw:
        raise fail(f"{path}: parts", "must be a mapping of part names to study keys")
    keep_parts = smoke_top.get("parts") if smoke else None
    parts = []
    for part_name, part_raw in parts_raw.items():
        where = f"{path}: parts.{part_name}" if top.get("parts") is not None else str(path)
        part_raw = check_keys(where, part_raw, PART_KEYS)
        if keep_parts is not None and part_name not in keep_parts:
            continue
        merged = _merge(common, part_raw)
        merged.pop("smoke", None)
        if smoke:
            part_smoke = check_keys(f"{where}: smoke", part_raw.get("smoke"), (PART_KEYS - {"smoke"}) | SMOKE_ONLY)
            merged = _merge(merged, {k: v for k, v in smoke_top.items() if k not in SMOKE_ONLY})
            merged = _merge(merged, {k: v for k, v in part_smoke.items() if k not in SMOKE_ONLY})
            keep = part_smoke.get("methods", smoke_top.get("methods"))
        else:
            keep = None
        parts.append(_part(where, str(part_name), merged, path, keep))
    if not parts:
        raise fail(f"{path}: smoke.parts", "keeps no part")
    default_dir = Path("runs") / "compare" / (slug(name) + ("-smoke" if smoke else ""))
    chosen_dir = Path(study_dir) if study_dir else (
        Path(str(top["study_dir"]) + ("-smoke" if smoke else "")) if top.get("study_dir") else default_dir)
    publish = Path(top["publish"]) if top.get("publish") else None
    notes = Path(top["notes"]) if top.get("notes") else None
    if notes is not None and not notes.is_file():
        raise fail(f"{path}: notes", f"{notes} is not a file (a markdown file, relative to the working directory)")
    return Study(name=name, path=path, title=str(top.get("title") or name),
                 description=str(top.get("description") or "").strip(), study_dir=chosen_dir, publish=publish,
                 smoke=smoke, parts=parts, raw=raw, expected_duration=top.get("expected_duration"), notes=notes)


def _part(where: str, name: str, raw: dict, study_path: Path, keep: list | None) -> Part:
    base = [_resolve(p, study_path) for p in _configs(f"{where}: base", raw.get("base"))]
    if not base:
        raise fail(where, "base must name at least one config layer (e.g. base: [configs/quickstart.yaml])")
    budget = read_section(f"{where}: budget", raw.get("budget"), Budget)
    if not budget.get("max_steps") and not budget.get("max_epochs"):
        raise fail(f"{where}: budget", "needs max_steps or max_epochs (the training budget of every run)")
    vci = budget.get("val_check_interval")
    if vci is not None and not (isinstance(vci, int) and vci > 0 or isinstance(vci, float) and 0 < vci <= 1):
        raise fail(f"{where}: budget.val_check_interval", "must be a number of steps (int) or a fraction of an "
                    f"epoch in (0, 1] (got {vci!r})")
    if isinstance(vci, int) and budget.get("max_steps") and budget["max_steps"] % vci:
        raise fail(f"{where}: budget", f"max_steps ({budget['max_steps']}) must be a multiple of "
                    f"val_check_interval ({vci}), so the last step is validated")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or \
            len(set(seeds)) != len(seeds):
        raise fail(f"{where}: seeds", f"must be a list of distinct integers (got {seeds!r})")
    tuning = read_section(f"{where}: tuning", raw.get("tuning"), Tuning)
    if tuning["trials"] < 1:
        raise fail(f"{where}: tuning.trials", f"must be an integer >= 1 (got {tuning['trials']!r})")
    tuning["overrides"] = _overrides(f"{where}: tuning.overrides", tuning.get("overrides"))
    select = raw.get("select")
    if not isinstance(select, str):
        raise fail(where, "select must name the validation metric to tune on, e.g. select: val/acc")
    report = raw.get("report")
    report = [report] if isinstance(report, str) else report
    if not isinstance(report, list) or not report or not all(isinstance(m, str) for m in report):
        raise fail(where, "report must list the test metrics to report, e.g. report: [test/acc]")
    generation = read_section(f"{where}: generation", raw.get("generation"), Generation, optional=True)
    forgetting = read_section(f"{where}: forgetting", raw.get("forgetting"), Forgetting, optional=True)
    latency = read_section(f"{where}: latency", raw.get("latency"), Latency, optional=True)
    lm_eval = read_section(f"{where}: lm_eval", raw.get("lm_eval"), LmEval, optional=True)
    if lm_eval is not None:
        tasks = lm_eval["tasks"]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise fail(f"{where}: lm_eval.tasks", "must list lm-eval tasks (peftlab_* tasks, lm-eval task names "
                        f"or task YAML files), e.g. tasks: [peftlab_rotten_tomatoes_mc] (got {tasks!r})")
        lm_eval["tasks"] = [_resolve(t, study_path) if t.endswith((".yaml", ".yml")) else t for t in tasks]
    bootstrap = read_section(f"{where}: bootstrap", raw.get("bootstrap"), Bootstrap)
    default_search = raw.get("search") or {}
    methods_raw = raw.get("methods")
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise fail(where, "methods must map method names to {config, overrides, search}")
    methods: dict[str, Method] = {}
    for mname, mraw in methods_raw.items():
        mwhere = f"{where}: methods.{mname}"
        mraw = read_section(mwhere, mraw if mraw is not None else {}, MethodEntry)
        search = {**default_search, **(mraw.get("search") or {})}
        method = Method(name=str(mname), configs=[_resolve(p, study_path) for p in _configs(f"{mwhere}.config",
                                                                                            mraw.get("config"))],
                        overrides=_overrides(f"{mwhere}.overrides", mraw.get("overrides")),
                        search=_params(f"{mwhere}.search", search), title=mraw.get("title"))
        methods[method.name] = method
    slugs = [m.slug for m in methods.values()]
    if len(set(slugs)) != len(slugs):
        raise fail(where, f"method names must differ in letters and digits (their directories: {slugs})")
    if keep is not None:
        unknown = [m for m in keep if m not in methods]
        if unknown:
            raise fail(f"{where}: smoke.methods", f"unknown method(s) {unknown}; methods: {list(methods)}")
        methods = {k: v for k, v in methods.items() if k in keep}
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in methods:
        if keep is not None:
            baseline = None  # a smoke run that leaves the baseline out has no paired differences
        else:
            raise fail(f"{where}: baseline", f"{baseline!r} is not one of the methods ({', '.join(methods)})."
                        f"{did_you_mean(str(baseline), list(methods))}")
    return Part(name=name, title=str(raw.get("title") or (name if name != "main" else "")),
                description=str(raw.get("description") or "").strip(),
                base=base, overrides=_overrides(f"{where}: overrides", raw.get("overrides")), budget=dict(budget),
                seeds=list(seeds), tuning=tuning, select=select, report=list(report), baseline=baseline,
                generation=generation, forgetting=forgetting, latency=latency, bootstrap=bootstrap, methods=methods,
                lm_eval=lm_eval,
                keep_checkpoints=bool(raw.get("keep_checkpoints", False)),
                expected_duration=raw.get("expected_duration"))


# ---------------------------------------------------------------------------------------------- fit arguments
def budget_arguments(part: Part) -> dict[str, Any]:
    """The budget as fit arguments: steps or epochs, the validation interval, the batch size."""
    b = part.budget
    run: dict[str, Any] = {}
    if b.get("max_steps"):
        run["trainer.max_steps"] = int(b["max_steps"])
        run["trainer.max_epochs"] = int(b["max_epochs"]) if b.get("max_epochs") else -1
    elif b.get("max_epochs"):
        run.update({"trainer.max_epochs": int(b["max_epochs"]), "trainer.max_steps": -1})
    vci = b.get("val_check_interval")
    if isinstance(vci, int):  # every vci steps, counted across epochs (few-shot epochs are shorter than that)
        run.update({"trainer.val_check_interval": vci, "trainer.check_val_every_n_epoch": None})
    elif vci is not None:
        run["trainer.val_check_interval"] = vci
    if b.get("batch_size"):
        run["data.batch_size"] = int(b["batch_size"])
    return run


def run_arguments(part: Part, method: Method, *, seed: int, params: dict[str, Any] | None = None,
                  kind: str = "seed", save_dir: str | None = None, version: str | None = None) -> dict[str, Any]:
    """The ``peftlab fit`` arguments of one run, ``{fit key: value}`` (``config``: the list of config layers): the
    study's and the method's overrides, the budget, the trial's parameters, then what ``peftlab compare`` fixes
    (logger, seed, one device, no progress bar). :func:`cli_args` writes them as the command line.

    ``kind`` is ``tune`` (no test, no adapter export: the test split is never looked at while selecting) or ``seed``.
    """
    def value(v: Any) -> Any:
        return seed if v == "{seed}" else v

    run: dict[str, Any] = {"config": [*part.base, *method.configs]}
    overrides = {**part.overrides, **(part.tuning["overrides"] if kind == "tune" else {}), **method.overrides}
    if "model" in overrides:  # the class first: `--model X` keeps the init_args X shares with the config's class
        run["model"] = overrides.pop("model")
    run.update({key: value(v) for key, v in overrides.items()})
    run.update(budget_arguments(part))
    by_name = {p.name: p for p in method.search}
    for name, v in (params or {}).items():
        run[by_name[name].key if name in by_name else fit_key(name)] = value(v)
    run.update({"seed_everything": seed, "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                "trainer.num_sanity_val_steps": 0, "trainer.devices": 1})
    if save_dir is not None:
        run["trainer.logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                 "init_args": {"save_dir": save_dir, "name": method.slug, "version": version}}
    if kind == "tune":
        run.update({"test_after_fit": False, "adapter_export.enabled": False, "last_checkpoint.enabled": False})
    else:  # a seed run is tested, whatever the base config says (its outcomes are the study's results)
        run["test_after_fit"] = True
    return run


def cli_args(run: dict[str, Any]) -> list[str]:
    """``run`` (:func:`run_arguments`) as ``peftlab fit``'s command line: ``--config FILE`` per layer, then
    ``--key=value`` with values as jsonargparse reads them (null, true/false, JSON for lists and mappings)."""
    def text(value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            return json.dumps(value)
        return str(value)

    args: list[str] = []
    for key, value in run.items():
        if key == "config":
            for config in value:
                args += ["--config", config]
        else:
            args.append(f"--{key}={text(value)}")
    return args


# ---------------------------------------------------------------------------------------------- checks
def logged_metrics(task: str, generation: bool) -> list[str]:
    names = list(LOGGED[task]) + (list(GENERATED) if generation and task != "classification" else [])
    return names


def check_methods(study: Study, log=lambda message: None) -> None:
    """Parse every method of every part with ``peftlab fit``'s own parser (as ``peftlab params`` does) and check the
    search spaces, metrics and options against what the method and task have; fills ``method.spec`` and
    ``part.task``. Raises a one-line PeftLabError naming the part and method; nothing is trained or written."""
    from peftlab.analysis.params import parse_fit_config

    for part in study.parts:
        where = f"{study.path}" + (f": parts.{part.name}" if len(study.parts) > 1 or part.name != "main" else "")
        for path in part.base:
            if not os.path.isfile(path):
                raise fail(f"{where}: base", f"config file {path} does not exist")
        tasks = {}
        for method in part.methods.values():
            mwhere = f"{where}: methods.{method.name}"
            for path in method.configs:
                if not os.path.isfile(path):
                    raise fail(mwhere, f"method layer {path} does not exist (methods' layers are in "
                                "configs/methods/: " + ", ".join(sorted(p.name for p in Path("configs/methods").glob(
                                    "*.yaml"))) + ")" if Path("configs/methods").is_dir() else
                                f"method layer {path} does not exist")
            run = run_arguments(part, method, seed=part.seeds[0])
            try:
                spec = parse_fit_config(cli_args(run), prog="peftlab compare")
            except PeftLabError as err:
                raise fail(mwhere, str(err).replace(" (in the config files or overrides given to peftlab compare; ",
                                                     " (")) from err
            method.spec = spec
            tasks[method.name] = spec.task
            for p in method.search:
                root, _, rest = p.key.partition(".")
                if root == "model":
                    arg = rest.removeprefix("init_args.")
                    if arg not in spec.init_args:
                        raise fail(f"{mwhere}.search", f"{spec.name} has no argument {arg!r}."
                                    f"{did_you_mean(arg, sorted(spec.init_args))} (`peftlab fit --model.help "
                                    f"{spec.name}` lists them)")
                    if arg == "head_learning_rate" and spec.task != "classification":
                        raise fail(f"{mwhere}.search", f"head_learning_rate only exists for classification (task "
                                    f"here: {spec.task}: no new head is trained)")
                else:
                    section = spec.data if root == "data" else spec.trainer
                    if rest not in section:
                        raise fail(f"{mwhere}.search", f"{p.key} is not a {root} setting."
                                    f"{did_you_mean(rest, sorted(section))}")
            # the tuning runs' own arguments too (tuning.overrides, a value from every search dimension): a
            # mistake there must stop the study here, not fail every tuning run the same way
            tune_run = run_arguments(part, method, seed=part.tuning_seed, kind="tune",
                                     params={p.name: midpoint(p) for p in method.search})
            try:
                parse_fit_config(cli_args(tune_run), prog="peftlab compare")
            except PeftLabError as err:
                raise fail(f"{mwhere} (tuning runs)", str(err).replace(
                    " (in the config files or overrides given to peftlab compare; ", " (")) from err
        if len(set(tasks.values())) > 1:
            raise fail(where, f"the methods of a comparison must share one task (got {tasks})")
        part.task = next(iter(tasks.values()))
        _check_metrics(where, part)
        _check_options(where, part)
        log(f"checked {len(part.methods)} method(s){' of part ' + part.name if part.name != 'main' else ''}: "
            f"task {part.task}, selecting on {part.select} ({part.direction})")


def _check_metrics(where: str, part: Part) -> None:
    task, gen = part.task, part.generation is not None
    names = logged_metrics(task, gen)
    hint = "" if gen or task == "classification" else \
        f" (generation: {{max_new_tokens: N}} adds {', '.join(GENERATED)})"

    lm_names = _lm_eval_names(where, part)

    def check(metric: str, stage: str, what: str) -> None:
        harness = lm_eval_metric(metric)
        if harness is not None:
            prefix, htask, name = harness
            if lm_names is None:
                raise fail(where, f"{what} metric {metric!r} is an lm-eval metric (<stage>/<task>/<metric>); add "
                            f"an lm_eval section naming its task: lm_eval: {{tasks: [{htask}]}}")
            if prefix != stage:
                raise fail(where, f"{what} metric {metric!r}: {what} uses the {stage} split ({stage}/{htask}/{name})")
            if htask not in lm_names:
                raise fail(where, f"{what} metric {metric!r} names task {htask!r}, which lm_eval.tasks does not "
                            f"run ({', '.join(lm_names)}).{did_you_mean(htask, list(lm_names))}")
            known = lm_names[htask]
            if known is not None and name not in known:
                raise fail(where, f"{what} metric {metric!r}: task {htask} reports "
                            f"{', '.join(f'{stage}/{htask}/{k}' for k in known)}.{did_you_mean(name, known)}")
            return
        prefix, _, name = metric.partition("/")
        allowed = [f"{stage}/{n}" for n in names]
        if prefix != stage or name not in names:
            wrong_stage = name in names and prefix in ("val", "test")
            extra = (f"; {what} uses the {stage} split" if wrong_stage else
                     did_you_mean(metric, allowed))
            raise fail(where, f"{what} metric {metric!r} is never logged for {task}; peftlab logs "
                        f"{', '.join(allowed)}{hint}{extra}")

    check(part.select, "val", "select")
    for metric in part.report:
        check(metric, "test", "report")
    if part.select.split("/", 1)[1] in GENERATED and part.generation is not None:
        part.generation["during_validation"] = True
    if lm_eval_metric(part.select) is not None:
        part.lm_eval["during_validation"] = True


def _lm_eval_names(where: str, part: Part) -> dict[str, list[str] | None] | None:
    """The metrics each of the part's lm-eval tasks reports (``{task: [metric, ...]}``; None for a task from
    lm-eval's index, whose metrics are known when it is built), or None without an ``lm_eval`` section. Task
    names, task files and the lm-eval version are checked here, one line each."""
    if part.lm_eval is None:
        return None
    from peftlab.callbacks.harness import declared_metrics
    from peftlab.evaluate import check_limit, check_lm_eval, resolve_tasks, task_label

    try:
        check_lm_eval()
        check_limit(part.lm_eval.get("limit"))
        specs, _ = resolve_tasks(part.lm_eval["tasks"])
    except PeftLabError as err:
        raise fail(f"{where}: lm_eval", str(err)) from err
    if part.task != "causal_lm":
        raise fail(f"{where}: lm_eval", f"lm-eval tasks score a causal LM's text; this study's task is {part.task}")
    return {task_label(spec): ([n.split("/", 1)[1] for n in declared_metrics(spec)] if isinstance(spec, dict)
                               else None) for spec in specs}


def _check_options(where: str, part: Part) -> None:
    if part.generation is not None:
        if part.task == "classification":
            raise fail(f"{where}: generation", "generated-text metrics need a causal_lm or seq2seq task")
        loss_on = next(iter(part.methods.values())).spec.data.get("loss_on")
        if part.task == "causal_lm" and loss_on != "response":
            raise fail(f"{where}: generation", "generation continues the prompt and scores the response: it needs "
                        f"data.loss_on: response (got {loss_on!r})")
        if not isinstance(part.generation.get("max_new_tokens"), int) or part.generation["max_new_tokens"] < 1:
            raise fail(f"{where}: generation.max_new_tokens", "must be an integer >= 1")
    if part.forgetting is not None and part.task != "causal_lm":
        raise fail(f"{where}: forgetting", "the loss on a reference corpus needs a causal_lm task (an LM head)")
    if part.tuning.get("pruner") == "successive_halving":
        vci = part.budget.get("val_check_interval")
        if vci is None:
            raise fail(f"{where}: budget", "successive halving needs validations during a run: set "
                        "budget.val_check_interval (steps), or tuning.pruner: none")
        if isinstance(vci, float) and not part.tuning.get("min_resource"):
            raise fail(f"{where}: tuning", f"successive halving counts validation steps: with val_check_interval "
                        f"{vci} (a fraction of an epoch) set tuning.min_resource (the steps before the first rung)")
        rf = part.tuning.get("reduction_factor", 3)
        if not isinstance(rf, int) or rf < 2:
            raise fail(f"{where}: tuning.reduction_factor", f"must be an integer >= 2 (got {rf!r})")
        mr = part.tuning.get("min_resource")
        if mr is not None and (not isinstance(mr, int) or mr < 1):
            raise fail(f"{where}: tuning.min_resource", f"must be an integer >= 1 (got {mr!r})")
    level = part.bootstrap.get("level", 0.95)
    if not 0 < float(level) < 1:
        raise fail(f"{where}: bootstrap.level", f"must be in (0, 1) (got {level})")


def midpoint(p: Param) -> Any:
    """A representative value of ``p`` (geometric or arithmetic middle, or the first choice)."""
    if p.choices is not None:
        return p.choices[0]
    value = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
    return int(round(value)) if p.integer else value
