"""The report of a study: ``report.md``, ``results.json`` and Pareto plots.

:func:`render` turns a study's results (:func:`peftlab.compare.results.collect`, the content of ``results.json``)
into markdown and PNGs, so a committed ``results.json`` regenerates its page exactly; :func:`write` collects and
renders into the study directory, :func:`publish` into the docs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peftlab.compare import stats
from peftlab.compare.results import collect
from peftlab.compare.study import Study, slug

PCT = 100.0


# ---------------------------------------------------------------------------------------------- render
def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ci(iv: dict | None, digits: int = 4, signed: bool = False) -> str:
    if not iv:
        return ""
    if "error" in iv:
        return f"({iv['error']})"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{fmt.format(iv['mean'])} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def _bytes(n: int | None) -> str:
    if not n:
        return "n/a"
    from peftlab.analysis.params import human_bytes

    return human_bytes(n)


def _params(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()) or "-"


def _pareto(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (fewer x, better y), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if maximize else points[i][1]))
    front, best = [], None
    for i in order:
        y = points[i][1]
        if best is None or (y > best if maximize else y < best):
            front.append(i)
            best = y
    return front


def plot_part(part: dict, path: Path, title: str | None = None) -> bool:
    """Quality (the first report metric, with its interval) against trainable parameters and against estimated
    training memory, both log scale; the Pareto front dashed. False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = part["report"][0]
    rows = [m for m in part["methods"] if metric in m["test"] and m.get("trainable")]
    if not rows:
        return False
    maximize = part["direction"] == "maximize" if metric.split("/")[-1] == part["select"].split("/")[-1] else \
        metric.split("/")[-1] not in ("loss", "ppl")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (key, xlabel) in zip(axes, (("trainable", "trainable parameters (log)"),
                                        ("memory", "estimated training memory, bytes (log)"))):
        pts, names = [], []
        for m in rows:
            x = m["trainable"] if key == "trainable" else ((m.get("memory") or {}).get("total"))
            if not x:
                continue
            iv = m["test"][metric]
            ax.errorbar([x], [iv["mean"]], yerr=[[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]], fmt="o",
                        capsize=3)
            ax.annotate(m["name"], (x, iv["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            pts.append((float(x), float(iv["mean"])))
            names.append(m["name"])
        if pts:
            front = _pareto(pts, maximize)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="grey", linewidth=1,
                    label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (mean, 95% CI)")
    fig.suptitle(title or part["title"] or "quality vs cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(results: dict, out_dir: Path, image_prefix: str = "") -> str:
    """report.md's text for ``results`` (results.json's content); writes the PNGs into ``out_dir`` (named
    ``<image_prefix>pareto[-part].png``) and links them relative to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {results['title']}", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    lines += [f"Made by `peftlab compare --config {results['study_file']}{' --smoke' if results['smoke'] else ''}` "
              f"(docs/compare.md). Machine: {results['machine']}."]
    if results["smoke"]:
        lines += ["", "**Smoke run**: a few steps per run, to check the study runs end to end; the numbers mean "
                  "nothing."]
    elif results.get("expected_duration"):
        lines += ["", f"Duration of the default budget: {results['expected_duration']}."]
    lines.append("")
    several = len(results["parts"]) > 1
    for part in results["parts"]:
        lines += _render_part(part, out_dir, image_prefix, several=several,
                              plot_title=None if several else results["title"])
    lines += _render_summary(results)
    if results.get("notes"):
        lines += ["", results["notes"].strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def _t_note(part: dict) -> str:
    """The t quantile the seeds give, so that a reader sees why 2 seeds give wide intervals."""
    n = len(part["seeds"])
    if n < 2:
        return ""
    q = stats.student_t_quantile((1 + float(part["bootstrap"]["level"])) / 2, n - 1)
    return f": t = {q:.2f} for {n} seeds"


def _render_part(part: dict, out_dir: Path, image_prefix: str, several: bool,
                 plot_title: str | None = None) -> list[str]:
    lines = []
    if several or part["title"]:
        lines += [f"## {part['title'] or part['name']}", ""]
    if part.get("description"):
        lines += [part["description"], ""]
    b, t = part["budget"], part["tuning"]
    budget = ", ".join(f"{k} {v}" for k, v in b.items())
    pruner = (f"successive halving (reduction factor {t.get('reduction_factor', 3)}, first rung at step "
              f"{t.get('min_resource') or b.get('val_check_interval')})" if t.get("pruner") == "successive_halving"
              else "no pruning")
    level = int(round(100 * float(part["bootstrap"]["level"])))
    lines += [
        f"Task: {part['task']}. Base config: {', '.join(f'`{c}`' for c in part['base'])}"
        + (f"; overrides: {', '.join(f'`{k}={v}`' for k, v in part['overrides'].items())}" if part["overrides"]
           else "") + f". Budget per run: {budget}.",
        f"Tuning: {t['trials']} trials per method ({t.get('sampler', 'tpe')} sampler, {pruner}) on "
        f"**{part['select']}** ({part['direction']}), seed {t.get('seed', part['seeds'][0])}"
        + (f", tuning runs with {', '.join(f'`{k}={v}`' for k, v in t['overrides'].items())}" if t.get("overrides")
           else "") + "; the test split is never used to select.",
        f"Then every seed ({', '.join(str(s) for s in part['seeds'])}) trains at the best trial's settings and is "
        f"tested (at the checkpoint the base config's ModelCheckpoint selects on validation). Intervals: {level}% "
        f"mean +- sqrt((t x standard error over seeds)^2 + (z x standard error over test examples)^2) (Student's t, "
        f"seeds - 1 degrees of freedom{_t_note(part)}; the examples' part by bootstrap, "
        f"{part['bootstrap']['reps']} resamples, RNG seed {part['bootstrap']['seed']}), cut to the metric's range "
        f"(e.g. [0, 1] for accuracy); differences are paired by seed and example"
        + (f" against **{part['baseline']}**" if part["baseline"] else "") + ".",
        ""]
    harness = part.get("lm_eval")
    if harness:
        limit = "every document" if harness.get("limit") is None else f"limit {harness['limit']}"
        shots = "" if harness.get("num_fewshot") is None else f", {harness['num_fewshot']}-shot"
        lines += [f"lm-eval tasks ({', '.join(f'`{t}`' for t in harness['tasks'])}; {limit}{shots}) "
                  "score each seed run's tested checkpoint through `peftlab.callbacks.LMEval` (`peftlab evaluate`'s "
                  "model); their intervals resample the task's documents where the metric is a mean over them.", ""]
    if part.get("expected_duration"):
        lines += [f"Expected duration of the default budget: {part['expected_duration']}.", ""]
    metrics = part["report"]
    head = ["method", "trainable", "%", "est. memory", "chosen settings", f"{part['select']} (best trial)"]
    head += [f"{m} mean [{level}% CI]" for m in metrics]
    if part["baseline"]:
        head += [f"Δ{metrics[0]} vs {part['baseline']} [{level}% CI]"]
    extra_forgetting = any(m.get("forgetting") for m in part["methods"])
    extra_latency = any(m.get("latency") for m in part["methods"])
    if extra_forgetting:
        head += ["reference loss before → after"]
    if extra_latency:
        head += ["latency ms/batch"]
    head += ["seeds", "trials (pruned)"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in part["methods"]:
        pct = f"{PCT * m['trainable'] / m['total']:.3f}" if m.get("trainable") and m.get("total") else "n/a"
        mem = (m.get("memory") or {}).get("total")
        best = m.get("best")
        ok = [s for s in m["seeds"] if "metrics" in s]
        failed = [s for s in m["seeds"] if s.get("error")]
        cells = [m["name"], f"{m['trainable']:,}" if m.get("trainable") else "n/a", pct, _bytes(mem),
                 _params(best["params"]) if best else "no completed trial", _num(best["value"]) if best else "n/a"]
        cells += [_ci(m["test"].get(metric)) or "n/a" for metric in metrics]
        if part["baseline"]:
            cells.append("baseline" if m["name"] == part["baseline"] else
                         (_ci(m["vs_baseline"].get(metrics[0]), signed=True) or "n/a"))
        if extra_forgetting:
            f = m.get("forgetting")
            cells.append(f"{f['before']:.4f} → {f['after']:.4f}" if f else "")
        if extra_latency:
            cells.append(_num((m.get("latency") or {}).get("ms_per_batch"), 1))
        n_pruned = sum(1 for tr in m["trials"] if tr["state"] in ("pruned", "diverged"))
        n_trials = sum(1 for tr in m["trials"] if tr["state"] in ("complete", "pruned", "diverged"))
        cells += [f"{len(ok)}/{len(part['seeds'])}" + (f" ({len(failed)} failed)" if failed else ""),
                  f"{n_trials} ({n_pruned})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    name = f"{image_prefix}pareto{'-' + slug(part['name']) if part['name'] != 'main' else ''}.png"
    if plot_part(part, out_dir / name, plot_title):
        lines += [f"![{part['report'][0]} against trainable parameters and estimated memory]({name})", ""]
    lines += ["Trainable parameters are exact (counted in the trained module); memory is `peftlab estimate-memory`'s "
              "estimate for the runs' batch, length, precision and optimizer (weights + gradients + optimizer states "
              "+ activations).", ""]
    failures = [(m["name"], s) for m in part["methods"] for s in m["seeds"] if s.get("error")]
    for name_, s in failures:
        lines.append(f"- {name_} seed {s['seed']}: {s['error']}")
    if failures:
        lines.append("")
    lines += ["<details><summary>Every tuning trial</summary>", "",
              f"| method | trial | settings | {part['select']} | state | validations | seconds |",
              "|---|---:|---|---:|---|---:|---:|"]
    for m in part["methods"]:
        for tr in m["trials"]:
            lines.append(f"| {m['name']} | {tr['number']} | {_params(tr['params'])} | {_num(tr['value'])} | "
                         f"{tr['state']} | {tr['validations']} | {_num(tr['seconds'], 0)} |")
    lines += ["", "</details>", ""]
    samples = [(m["name"], s["samples"][:2]) for m in part["methods"] for s in m["seeds"][:1] if s.get("samples")]
    if samples:
        lines += ["Generated text (seed " + str(part["seeds"][0]) + ", first test examples):", ""]
        for name_, rows in samples:
            for r in rows:
                lines.append(f"- {name_}: `{r['generated'].strip()[:80]}` (reference `{r['reference'].strip()[:80]}`)")
        lines.append("")
    return lines


def _render_summary(results: dict) -> list[str]:
    """Methods x parts table of each part's first report metric, when parts share method names (e.g. few-shot)."""
    parts = results["parts"]
    if len(parts) < 2:
        return []
    names: list[str] = []
    for p in parts:
        names += [m["name"] for m in p["methods"] if m["name"] not in names]
    shared = [n for n in names if sum(any(m["name"] == n for m in p["methods"]) for p in parts) > 1]
    if not shared:
        return []
    lines = ["## Summary", "", "Each part's first report metric, mean [95% CI]:", "",
             "| method | " + " | ".join(p["title"] or p["name"] for p in parts) + " |",
             "|---|" + "---:|" * len(parts)]
    for n in shared:
        cells = []
        for p in parts:
            m = next((m for m in p["methods"] if m["name"] == n), None)
            cells.append(_ci(m["test"].get(p["report"][0]), 3) if m and m["test"] else "n/a")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def write(study: Study, worker, say) -> dict:
    """Collect, then write ``report.md``, ``results.json`` and the PNGs into the study directory; publish them too
    when the study file says so and this is a complete, non-smoke run."""
    results = collect(study, worker)
    out = study.study_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = render(results, out)
    (out / "report.md").write_text(text)
    say(f"report: {out / 'report.md'} (+ results.json, PNGs)")
    if study.publish and not study.smoke:
        complete = all(len([s for s in m["seeds"] if "metrics" in s]) == len(p["seeds"])
                       for p in results["parts"] for m in p["methods"])
        if complete:
            publish(results, study)
            say(f"published: {study.publish}")
        else:
            say(f"not published to {study.publish}: some seed runs are missing or failed")
    return results


def publish(results: dict, study: Study) -> None:
    """The report as ``study.publish`` (a docs page; PNGs beside it, prefixed with its name) and results.json beside
    the study file (``<study file>.results.json``), from which :func:`render` regenerates the page."""
    page = study.publish
    prefix = page.stem + "-"
    text = render(results, page.parent, image_prefix=prefix)
    page.write_text(text)
    study.path.with_suffix(".results.json").write_text(json.dumps(results, indent=1, default=str))


def rerender(results_path: Path, page: Path) -> str:
    """The page :func:`publish` wrote, regenerated from its results.json (tests compare it with the committed one)."""
    results = json.loads(results_path.read_text())
    return render(results, page.parent, image_prefix=page.stem + "-")


__all__ = ["publish", "render", "rerender", "write"]
