"""Test metrics from per-example outcomes, and their bootstrap confidence intervals.

Every test metric peftlab reports is a function of *sums over test examples* of a few per-example columns:
accuracy is ``sum(correct) / sum(1)``, the causal-LM loss ``sum(nll) / sum(tokens)``, macro F1 a function of the
confusion counts, corpus BLEU a function of the clipped n-gram matches and lengths. A seed run saves those
columns for every test example (:mod:`peftlab.compare.callbacks`), so the metric of any resample of the examples
is the same function of *weighted* sums, the weights being how often each example was drawn. That makes the
bootstrap exact for every metric (not an average of per-example scores where the metric is not one) and fast.

The interval has two parts, added as variances: the test examples, by that bootstrap (every seed sees the same
draw of examples; the metric is computed per seed and averaged), and the training seeds, as the standard error of
a mean over seeds with Student's t quantile for ``seeds - 1`` degrees of freedom (docs/compare.md: why t, and the
measured coverage). The paired difference of
two methods uses the same example draws for both and the per-seed differences, so what both methods share (a
hard test set, a lucky seed) cancels. The RNG is seeded (``rng_seed``), so a report is
reproducible to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from peftlab.text_metrics import BLEU_N, bleu_stats, corpus_bleu  # noqa: F401 - the compare columns


# ---------------------------------------------------------------------------------------------- columns
def classification_columns(pred: Sequence[int], label: Sequence[int], ce: Sequence[float],
                           num_classes: int) -> dict[str, np.ndarray]:
    """The per-example columns of a classification test: count, correctness, loss and one-hot confusion cells."""
    pred, label = np.asarray(pred, dtype=np.int64), np.asarray(label, dtype=np.int64)
    cols = {"n": np.ones(len(pred)), "correct": (pred == label).astype(float), "ce": np.asarray(ce, dtype=float)}
    for p in range(num_classes):
        for t in range(num_classes):
            cols[f"cm_{p}_{t}"] = ((pred == p) & (label == t)).astype(float)
    return cols


def macro_f1(sums: Mapping[str, np.ndarray], num_classes: int) -> np.ndarray:
    """Macro F1 from confusion sums, as torchmetrics' ``F1Score(task="multiclass", average="macro")``: classes that
    are neither predicted nor present count as absent (left out of the mean), an undefined F1 is 0."""
    f1s, present = [], []
    for c in range(num_classes):
        tp = sums[f"cm_{c}_{c}"]
        predicted = sum(sums[f"cm_{c}_{t}"] for t in range(num_classes))
        actual = sum(sums[f"cm_{p}_{c}"] for p in range(num_classes))
        fp, fn = predicted - tp, actual - tp
        denom = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            f1s.append(np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0))
        present.append((tp + fp + fn) > 0)
    f1s, present = np.stack(f1s), np.stack(present)
    count = present.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (f1s * present).sum(0) / np.where(count > 0, count, 1), 0.0)


def _ratio(num: str, den: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    def value(sums):
        d = np.asarray(sums[den], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d > 0, np.asarray(sums[num], dtype=float) / np.where(d > 0, d, 1), np.nan)
    return value


def metric_function(metric: str, task: str, num_classes: int = 2) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """``sums of per-example columns -> value`` for a test metric (``test/acc``, ``test/loss``, ...), vectorized
    over any leading dimensions of the sums."""
    name = metric.split("/", 1)[-1]
    if task == "classification":
        if name == "acc":
            return _ratio("correct", "n")
        if name == "loss":
            return _ratio("ce", "n")
        if name == "f1":
            return lambda sums: macro_f1(sums, num_classes)
    else:
        if name == "loss":
            return _ratio("nll", "tokens")
        if name == "ppl":
            loss = _ratio("nll", "tokens")
            return lambda sums: np.exp(np.minimum(loss(sums), 50.0))
        if name == "exact_match":
            return _ratio("tf_exact", "has_target")
        if name in ("gen_exact_match", "rougeL"):
            return _ratio(name, "n")
        if name == "bleu":
            return corpus_bleu
    if task == "lm_eval":  # a mean of per-document scores (peftlab.callbacks.LMEval's outcomes)
        return _ratio(name, "n")
    raise KeyError(f"no per-example form of {metric} for task {task}")


def metric_range(metric: str) -> tuple[float, float]:
    """The values ``metric`` can take: intervals are cut to it (the true value lies inside, so cutting keeps the
    coverage; an uncut t-interval over 2 seeds can reach an accuracy above 1)."""
    name = metric.split("/")[-1]
    bounded = ("acc", "f1", "exact_match", "gen_exact_match", "rougeL", "bleu")
    if name in bounded or name.startswith(("acc_", "exact_match_")):  # (lm-eval's filtered and normalised variants)
        return 0.0, 1.0
    if name in ("loss", "ppl"):
        return 0.0, math.inf
    return -math.inf, math.inf


# ---------------------------------------------------------------------------------------------- bootstrap
@dataclass
class Interval:
    """A point estimate (the mean over seeds of the metric on the whole test set) and its interval."""

    mean: float
    low: float
    high: float
    seeds: int
    examples: int
    per_seed: list[float]

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "seeds": self.seeds,
                "examples": self.examples, "per_seed": self.per_seed}


def _matrix(runs: Sequence[Mapping[str, Sequence[float]]], columns: Sequence[str]) -> np.ndarray:
    """(seeds, examples, columns) array of the given per-example columns."""
    lengths = {len(run[columns[0]]) for run in runs}
    if len(lengths) != 1:
        raise ValueError(f"the seed runs have different numbers of test examples: {sorted(lengths)}")
    return np.stack([np.stack([np.asarray(run[c], dtype=float) for c in columns], -1) for run in runs])


def _example_draws(n_examples: int, reps: int, rng_seed: int, chunk: int = 250):
    """Example weights (chunk, examples) of ``reps`` bootstrap draws of the test examples, in chunks of ``chunk``
    replicates (bounded memory), from one seeded generator."""
    rng = np.random.default_rng(rng_seed)
    for start in range(0, reps, chunk):
        size = min(chunk, reps - start)
        picks = rng.integers(0, n_examples, size=(size, n_examples))
        weights = np.zeros((size, n_examples))
        np.add.at(weights, (np.arange(size)[:, None], picks), 1.0)
        yield weights


def _replicates(x: np.ndarray, columns: Sequence[str], fn, weights: np.ndarray) -> np.ndarray:
    """The seed-mean metric under each example draw: (reps,)."""
    sums = np.einsum("snk,bn->bsk", x, weights)  # (reps, seeds, columns): every seed under every example draw
    values = np.asarray(fn({c: sums[..., i] for i, c in enumerate(columns)}), dtype=float)  # (reps, seeds)
    with np.errstate(invalid="ignore"):
        return np.nanmean(values, axis=1) if values.size else values


def _point(x: np.ndarray, columns: Sequence[str], fn) -> tuple[float, list[float]]:
    sums = x.sum(1)
    per_seed = np.asarray(fn({c: sums[:, i] for i, c in enumerate(columns)}), dtype=float)
    return float(np.nanmean(per_seed)), [float(v) for v in per_seed]


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (closed form for 1 and 2; otherwise the CDF
    integrated with Simpson's rule and inverted by bisection, within 1e-6). scipy is not a dependency of peftlab."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1 (got p={p}, df={df})")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        grid = np.linspace(0.0, t, 2001)
        pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(grid**2 / df))
        return 0.5 + (t / 6000) * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    while high - low > 1e-7:
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def _interval(mean: float, per_seed: Sequence[float], example_replicates: np.ndarray, level: float) -> tuple[float, float]:
    """``mean`` +- sqrt(t^2 * v_seeds + z^2 * v_examples): each part of the uncertainty with its own quantile.

    The seed part ``v_seeds`` is the usual squared standard error of a mean over seeds, estimated from
    ``seeds - 1`` degrees of freedom, hence Student's t (a bootstrap over 2-3 seeds cannot see how far seeds spread).
    The example part ``v_examples`` is the bootstrap variance over the test examples (all seeds see the same draw,
    so what is shared by the seeds is counted once), estimated from hundreds of examples, hence the normal quantile;
    one t for the sum would make two agreeing seeds look hopeless. One seed: the examples' part alone. Measured
    coverage and the versions this replaced: docs/compare.md."""
    with np.errstate(invalid="ignore"):
        var_examples = float(np.nanvar(example_replicates)) if example_replicates.size else 0.0
    seeds = np.asarray([v for v in per_seed if finite(v)], dtype=float)
    var_seeds = float(np.var(seeds, ddof=1)) / len(seeds) if len(seeds) > 1 else 0.0
    t = student_t_quantile((1 + level) / 2, len(seeds) - 1) if len(seeds) > 1 else 0.0
    z = NormalDist().inv_cdf((1 + level) / 2)
    half = math.sqrt(t * t * var_seeds + z * z * var_examples)
    return mean - half, mean + half


def bootstrap(runs: Sequence[Mapping[str, Sequence[float]]], fn, columns: Sequence[str], *, reps: int = 2000,
              rng_seed: int = 0, level: float = 0.95,
              bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """Interval of ``fn`` (sums -> metric) over training seeds and test examples: :func:`_interval` (a t-interval
    over seeds plus a bootstrap over the test examples).

    ``runs``: one mapping per seed of per-example columns (equal lengths: the same test examples, in the same order).
    ``bounds``: the metric's range (:func:`metric_range`); the interval is cut to it.
    """
    x = _matrix(runs, columns)
    mean, per_seed = _point(x, columns, fn)
    values = np.concatenate([_replicates(x, columns, fn, w) for w in _example_draws(x.shape[1], reps, rng_seed)])
    low, high = _interval(mean, per_seed, values, level)
    return Interval(mean, float(max(low, bounds[0])), float(min(high, bounds[1])), x.shape[0], x.shape[1], per_seed)


def seed_interval(per_seed: Sequence[float], level: float = 0.95,
                  bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """The t-interval over seeds alone, for a metric without per-example scores (e.g. an lm-eval corpus metric)."""
    values = [float(v) for v in per_seed if finite(v)]
    mean = float(np.mean(values)) if values else math.nan
    low, high = _interval(mean, values, np.empty(0), level)
    return Interval(mean, float(max(low, bounds[0])), float(min(high, bounds[1])), len(values), 0, values)


def paired_bootstrap(runs_a: Sequence[Mapping[str, Sequence[float]]], runs_b: Sequence[Mapping[str, Sequence[float]]],
                     fn, columns: Sequence[str], *, reps: int = 2000, rng_seed: int = 0,
                     level: float = 0.95, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """Interval of ``metric(A) - metric(B)``, paired by seed (``runs_a[i]`` and ``runs_b[i]`` share seed i: the seed
    part is the spread of the per-seed differences) and by test example (the same draw of examples for both).
    ``bounds``: the metric's range; a difference lies within +-(its width), and the interval is cut to that."""
    if len(runs_a) != len(runs_b):
        raise ValueError("paired runs need the same seeds for both methods")
    xa, xb = _matrix(runs_a, columns), _matrix(runs_b, columns)
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"paired runs need the same test examples ({xa.shape[1]} vs {xb.shape[1]})")
    diff = np.concatenate([_replicates(xa, columns, fn, w) - _replicates(xb, columns, fn, w)
                           for w in _example_draws(xa.shape[1], reps, rng_seed)])
    ma, pa = _point(xa, columns, fn)
    mb, pb = _point(xb, columns, fn)
    per_seed = [a - b for a, b in zip(pa, pb)]
    low, high = _interval(ma - mb, per_seed, diff, level)
    width = bounds[1] - bounds[0]
    return Interval(ma - mb, float(max(low, -width)), float(min(high, width)), xa.shape[0], xa.shape[1], per_seed)


def columns_for(metric: str, task: str, num_classes: int = 2) -> list[str]:
    """The per-example columns :func:`metric_function` reads for ``metric``."""
    name = metric.split("/", 1)[-1]
    if task == "classification":
        if name == "f1":
            return [f"cm_{p}_{t}" for p in range(num_classes) for t in range(num_classes)]
        return {"acc": ["correct", "n"], "loss": ["ce", "n"]}[name]
    if name in ("loss", "ppl"):
        return ["nll", "tokens"]
    if name == "exact_match":
        return ["tf_exact", "has_target"]
    if name in ("gen_exact_match", "rougeL"):
        return [name, "n"]
    if name == "bleu":
        return [f"bleu_{k}{n}" for k in "mt" for n in range(1, BLEU_N + 1)] + ["bleu_pred_len", "bleu_ref_len"]
    raise KeyError(metric)


def finite(value: float) -> bool:
    return value is not None and not (isinstance(value, float) and (math.isnan(value) or math.isinf(value)))
