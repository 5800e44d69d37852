"""Per-example text-generation statistics shared by :class:`peftlab.callbacks.GenerationEval` and
``peftlab compare``'s bootstrap (their own home, so neither imports the other)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

#: BLEU: n-gram orders, as torchmetrics' BLEUScore (n_gram=4, uniform weights, no smoothing)
BLEU_N = 4



def bleu_stats(pred: str, reference: str, n_gram: int = BLEU_N) -> dict[str, float]:
    """One example's BLEU sufficient statistics, tokenized as torchmetrics' BLEUScore does (whitespace): clipped
    n-gram matches ``bleu_m{n}``, candidate n-grams ``bleu_t{n}``, and both lengths. Summed over a corpus they give
    exactly torchmetrics' corpus BLEU (:func:`corpus_bleu`)."""
    p, r = pred.split() if pred else [], reference.split() if reference else []

    def grams(tokens: list[str]) -> Counter:
        return Counter(tuple(tokens[j:j + i]) for i in range(1, n_gram + 1) for j in range(len(tokens) - i + 1))

    pc, clipped = grams(p), grams(p) & grams(r)
    out = {f"bleu_m{n}": 0.0 for n in range(1, n_gram + 1)} | {f"bleu_t{n}": 0.0 for n in range(1, n_gram + 1)}
    for gram, count in clipped.items():
        out[f"bleu_m{len(gram)}"] += count
    for gram, count in pc.items():
        out[f"bleu_t{len(gram)}"] += count
    out.update(bleu_pred_len=float(len(p)), bleu_ref_len=float(len(r)))
    return out


def corpus_bleu(sums: Mapping[str, np.ndarray], n_gram: int = BLEU_N) -> np.ndarray:
    """Corpus BLEU from summed :func:`bleu_stats` (torchmetrics' formula: 0 if any order has no match)."""
    matches = np.stack([np.asarray(sums[f"bleu_m{n}"], dtype=float) for n in range(1, n_gram + 1)])
    totals = np.stack([np.asarray(sums[f"bleu_t{n}"], dtype=float) for n in range(1, n_gram + 1)])
    pred_len, ref_len = np.asarray(sums["bleu_pred_len"], float), np.asarray(sums["bleu_ref_len"], float)
    ok = matches.min(0) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        log_p = np.where(ok, np.log(np.where(ok, matches, 1) / np.where(totals > 0, totals, 1)), 0.0).mean(0)
        bp = np.where(pred_len > ref_len, 1.0, np.exp(1 - ref_len / np.where(pred_len > 0, pred_len, 1)))
    return np.where(ok, bp * np.exp(log_p), 0.0)
