"""The results of a study, collected from its storage: the data ``results.json`` holds and
:mod:`peftlab.compare.report` renders.

:func:`collect` reads every trial and seed run back from the storage (so any machine that can open it can write the
report), computes the bootstrap intervals (:mod:`peftlab.compare.stats`), the paired differences to the baseline,
the exact parameter counts and the estimated training memory (``peftlab estimate-memory``'s estimate, on the meta
device).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftlab.compare import stats
from peftlab.compare.storage import best_trial, done_or_live, unpack
from peftlab.compare.study import Part, Study, lm_eval_metric
from peftlab.runinfo import machine_line

#: what results.json records of peftlab.analysis.memory's MemoryEstimate, in this order
MEMORY_KEYS = ("total", "weights", "gradients", "optimizer_states", "activations", "trainable", "total_params",
               "batch_size", "seq_len", "precision", "optimizer")


def _columns(outcome: dict) -> dict[str, list[float]]:
    cols = dict(outcome["columns"])
    if outcome.get("task") == "classification":
        k = int(outcome.get("num_labels") or 2)
        full = stats.classification_columns([int(v) for v in cols["pred"]], [int(v) for v in cols["label"]],
                                            cols["ce"], k)
        cols = {c: list(v) for c, v in full.items()}
    return cols


def _memory(part: Part, method) -> dict | None:
    """Training memory of the method as its seed runs train it (batch, length, precision, optimizer of the parsed
    config), by peftlab.analysis.memory.estimate on the meta device."""
    from peftlab.analysis.memory import estimate, precision_of
    from peftlab.errors import PeftLabError

    spec = method.spec
    if spec is None:
        return None
    try:
        est = estimate(spec, batch_size=int(spec.data.get("batch_size") or 1),
                       seq_len=int(spec.data.get("max_length") or 512),
                       target_len=spec.data.get("max_target_length"),
                       precision=precision_of(spec.trainer.get("precision")),
                       optimizer=spec.init_args.get("optimizer") or "adamw",
                       gradient_checkpointing=bool(spec.init_args.get("gradient_checkpointing")), label=method.name)
    except (PeftLabError, RuntimeError, ValueError) as err:
        return {"error": str(err).splitlines()[0][:200]}
    data = est.as_dict()
    return {key: data[key] for key in MEMORY_KEYS}


def collect(study: Study, worker) -> dict:
    """Everything the report shows, as plain data (what results.json holds)."""
    from optuna.trial import TrialState

    parts = []
    for part in study.parts:
        methods = []
        runs_by_method: dict[str, dict[int, dict]] = {}
        for method in part.methods.values():
            tune, seeds = worker.studies(part, method)
            trials = []
            for t in sorted(tune.get_trials(deepcopy=False), key=lambda t: t.number):
                if t.user_attrs.get("surplus"):
                    continue
                state = t.state.name.lower()
                if t.user_attrs.get("diverged"):
                    state = "diverged"
                elif t.state == TrialState.FAIL:
                    state = "interrupted" + (" (ran again)" if any(u.user_attrs.get("retry_of") == t.number
                                                                   for u in tune.get_trials(deepcopy=False)) else "")
                trials.append({"number": t.number, "state": state, "params": dict(t.params), "value": t.value,
                               "run": t.user_attrs.get("run"), "seconds": t.user_attrs.get("seconds"),
                               "validations": len(t.user_attrs.get("history") or []),
                               "last_step": t.last_step})
            best = best_trial(tune)
            seed_rows, runs = [], {}
            trainable = total = None
            for t in sorted(seeds.get_trials(deepcopy=False), key=lambda t: t.number):
                if t.user_attrs.get("duplicate") or not done_or_live(t) or t.user_attrs.get("seed") not in part.seeds:
                    continue  # (a seed since removed from the study file is not reported)
                seed = t.user_attrs.get("seed")
                row: dict[str, Any] = {"seed": seed, "state": t.state.name.lower(),
                                       "seconds": t.user_attrs.get("seconds")}
                if t.state == TrialState.COMPLETE and "outcomes" in t.user_attrs:
                    outcome = unpack(t.user_attrs["outcomes"])
                    runs[seed] = outcome
                    row["metrics"] = outcome.get("metrics", {})
                    for key in ("forgetting", "latency", "samples"):
                        if outcome.get(key) is not None:
                            row[key] = outcome[key]
                    trainable = t.user_attrs.get("trainable", trainable)
                    total = t.user_attrs.get("total", total)
                elif t.user_attrs.get("error"):
                    row["error"] = t.user_attrs["error"]
                seed_rows.append(row)
            runs_by_method[method.name] = runs
            memory = tune.user_attrs.get("memory")
            if memory is None or memory.get("fingerprint") != part.fingerprint(method):
                memory = _memory(part, method)
                if memory is not None:
                    memory["fingerprint"] = part.fingerprint(method)
                    tune.set_user_attr("memory", memory)
            if trainable is None and memory and "trainable" in memory:
                trainable, total = memory["trainable"], memory["total_params"]
            spec = method.spec
            methods.append({
                "name": method.name, "title": method.title, "class": spec.class_path if spec else None,
                "configs": method.configs, "overrides": {k: v for k, v in method.overrides.items()},
                "search": [p.describe() for p in method.search], "trainable": trainable, "total": total,
                "memory": memory, "trials": trials,
                "best": {"number": best.number, "params": dict(best.params), "value": best.value} if best else None,
                "seeds": seed_rows})
        _intervals(part, methods, runs_by_method)
        parts.append({
            "name": part.name, "title": part.title, "description": part.description, "task": part.task,
            "select": part.select, "direction": part.direction, "report": part.report, "baseline": part.baseline,
            "seeds": part.seeds, "budget": part.budget, "base": part.base,
            "overrides": {k: v for k, v in part.overrides.items()},
            "tuning": {**part.tuning, "seed": part.tuning_seed}, "generation": part.generation,
            "forgetting": part.forgetting, "lm_eval": part.lm_eval, "bootstrap": part.bootstrap,
            "expected_duration": part.expected_duration,
            "methods": methods})
    return {"study": study.name, "title": study.title, "description": study.description,
            "expected_duration": study.expected_duration, "study_file": str(study.path), "smoke": study.smoke,
            "machine": machine_line(), "parts": parts,
            **({"notes": study.notes.read_text(encoding="utf-8")} if study.notes else {})}


def _intervals(part: Part, methods: list[dict], runs_by_method: dict[str, dict[int, dict]]) -> None:
    base_runs = runs_by_method.get(part.baseline or "", {})
    for m in methods:
        runs = runs_by_method[m["name"]]
        m["test"], m["vs_baseline"] = {}, {}
        if not runs:
            continue
        seeds = sorted(runs)
        columns = {s: _columns(runs[s]) for s in seeds}
        k = int(next(iter(runs.values())).get("num_labels") or 2)
        for metric in part.report:
            harness = lm_eval_metric(metric)
            if harness is not None:
                _lm_eval_interval(part, m, metric, harness[1], runs, base_runs)
                continue
            try:
                fn = stats.metric_function(metric, part.task, k)
                cols = stats.columns_for(metric, part.task, k)
            except KeyError:
                continue
            if not all(c in columns[seeds[0]] for c in cols):
                continue
            paired = part.baseline and m["name"] != part.baseline
            base_cols = {s: _columns(base_runs[s]) for s in seeds if s in base_runs} if paired else {}
            _example_intervals(part, m, metric, columns, base_cols, fn, cols, stats.metric_range(metric),
                               "different test sets")
        forgetting = [r["forgetting"] for r in runs.values() if r.get("forgetting")]
        if forgetting:
            m["forgetting"] = {key: float(np.mean([f[key] for f in forgetting if f.get(key) is not None]))
                               for key in ("before", "after", "delta")}
            m["forgetting"]["source"] = forgetting[0].get("source")
        latency = [r["latency"]["ms_per_batch"] for r in runs.values() if r.get("latency")]
        if latency:
            first = next(r["latency"] for r in runs.values() if r.get("latency"))
            m["latency"] = {"ms_per_batch": float(np.mean(latency)), "batch_size": first["batch_size"],
                            "tokens": first["tokens"]}


def _example_intervals(part: Part, m: dict, metric: str, columns: dict[int, dict], base_columns: dict[int, dict],
                       fn, cols: list[str], bounds: tuple[float, float], differ: str) -> None:
    """``m["test"][metric]`` over the seeds and examples of ``columns`` (per seed, per-example columns), and its
    paired difference to the baseline's ``base_columns`` on the seeds both have (``differ`` when their example
    counts differ)."""
    b = part.bootstrap
    reps, rng_seed, level = int(b["reps"]), int(b["seed"]), float(b["level"])
    seeds = sorted(columns)
    m["test"][metric] = stats.bootstrap([columns[s] for s in seeds], fn, cols, reps=reps, rng_seed=rng_seed,
                                        level=level, bounds=bounds).as_dict()
    shared = [s for s in seeds if s in base_columns]
    if not shared:
        return
    if len({len(columns[s][cols[0]]) for s in shared} | {len(base_columns[s][cols[0]]) for s in shared}) > 1:
        m["vs_baseline"][metric] = {"error": differ}
        return
    m["vs_baseline"][metric] = stats.paired_bootstrap(
        [columns[s] for s in shared], [base_columns[s] for s in shared], fn, cols, reps=reps, rng_seed=rng_seed,
        level=level, bounds=bounds).as_dict()


def _lm_eval_interval(part: Part, m: dict, metric: str, task: str, runs: dict[int, dict],
                      base_runs: dict[int, dict]) -> None:
    """An lm-eval metric's interval: over seeds and the task's documents when it is a mean of per-document scores
    (``result["lm_eval"]``), else over seeds only (lm-eval's own stderr is over documents of one run)."""
    name = metric.split("/", 2)[2]
    bounds = stats.metric_range(name)
    level = float(part.bootstrap["level"])
    seeds = sorted(s for s in runs if metric in runs[s].get("metrics", {}))
    if not seeds:
        return
    paired = bool(part.baseline) and m["name"] != part.baseline
    shared = [s for s in seeds if metric in base_runs.get(s, {}).get("metrics", {})] if paired else []
    per_doc = {s: (runs[s].get("lm_eval") or {}).get(task) or {} for s in seeds}
    base_doc = {s: (base_runs[s].get("lm_eval") or {}).get(task) or {} for s in shared}
    documents = all(name in per_doc[s] for s in seeds)
    paired_documents = documents and all(name in base_doc[s] for s in shared)
    if documents:
        _example_intervals(part, m, metric, per_doc, base_doc if paired_documents else {},
                           stats.metric_function(f"test/{name}", "lm_eval"), [name, "n"], bounds, "different documents")
    else:
        m["test"][metric] = stats.seed_interval([runs[s]["metrics"][metric] for s in seeds], level, bounds).as_dict()
    if shared and not paired_documents:
        m["vs_baseline"][metric] = stats.seed_interval(
            [runs[s]["metrics"][metric] - base_runs[s]["metrics"][metric] for s in shared], level,
            (-(bounds[1] - bounds[0]), bounds[1] - bounds[0])).as_dict()


__all__ = ["collect"]
