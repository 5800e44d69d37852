"""Pure dataset transforms behind ``PeftDataModule``: label encoding, splitting and few-shot sampling.

Each function takes datasets and settings and returns new datasets (plus what it found out); none keeps
state, writes files or reads the module that calls it, so each can be tested and reused on its own.
Every random draw is seeded by an argument, and the draws are the ones ``PeftDataModule`` has always made,
so a split or a few-shot selection is the same for the same seed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

from peftlab.data.formats import IGNORE_INDEX
from peftlab.errors import PeftLabError, did_you_mean

if TYPE_CHECKING:
    import datasets

ROW_COLUMN = "_row"
"""Column ``split_dataset`` adds to train: each row's position in the source's train split."""

LABELS_COLUMN = "labels"
"""Column ``encode_labels`` adds: the integer class index (a ``datasets.ClassLabel``)."""


def check_columns(columns: Sequence[str], needed: Mapping[str, str], source) -> None:
    """Raise ``PeftLabError`` for the first column of ``needed`` (``{setting: column}``) not in ``columns``.

    ``source`` only names the data in the message.
    """
    for key, column in needed.items():
        if column not in columns:
            raise PeftLabError(
                f"column {column!r} (data.{key}) is not in data source {source!r}; "
                f"its columns are: {', '.join(columns)}.{did_you_mean(column, columns)}"
            )


def encode_labels(
    ds: datasets.DatasetDict, column: str, labels: Sequence[str] | None = None
) -> tuple[datasets.DatasetDict, list[str]]:
    """Add an integer ``labels`` column (a ``ClassLabel``) to every split, encoded from ``column``.

    Args:
        ds: the splits; ``column`` holds strings or integers.
        column: the label column.
        labels: class names in index order. Without them integer labels are their own index (names
            ``"0"``..``"max"``) and strings are sorted. With them string labels are looked up by name and
            integer labels must lie in ``0..len(labels)-1``.

    Returns:
        The encoded ``DatasetDict`` and the class names in index order.

    Raises:
        PeftLabError: empty (``None``) labels, negative integer labels without ``labels``, fewer than 2
            classes, or labels outside ``labels``.
    """
    import datasets

    values = set()
    for split in ds.values():
        values.update(split.unique(column))
    if None in values:
        raise PeftLabError(f"data column {column!r} has empty labels; fill or drop those rows")
    is_int = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    names = labels or None
    if names is None:
        if is_int:
            if min(values) < 0:
                raise PeftLabError(
                    f"label column {column!r} has negative labels {sorted(v for v in values if v < 0)}; "
                    "labels must be 0..num_labels-1 (unlabelled test splits need their own labelled file)"
                )
            names = [str(i) for i in range(max(values) + 1)]
        else:
            names = sorted(str(v) for v in values)
    names = [str(n) for n in names]
    _check_label_spelling(names if labels else [str(v) for v in values], column)
    if len(names) < 2:
        raise PeftLabError(f"classification needs at least 2 labels; column {column!r} has only {names}")
    if is_int and labels:
        bad = sorted(v for v in values if not 0 <= v < len(names))
    else:
        bad = sorted(str(v) for v in values if str(v) not in names)
    if bad:
        raise PeftLabError(
            f"labels {bad[:10]} in column {column!r} are out of range for data.labels {names}; "
            "add them to data.labels or fix the data"
        )
    # a module-level function + plain arguments, so datasets can fingerprint it and cache the result
    fn = partial(_encode_batch, column=column, index=None if is_int else {n: i for i, n in enumerate(names)})
    feature = datasets.ClassLabel(names=names)
    out = {}
    for split, d in ds.items():
        d = d.map(fn, batched=True, desc=f"labels ({split})")
        out[split] = d.cast_column(LABELS_COLUMN, feature)
    return datasets.DatasetDict(out), names


def _check_label_spelling(names: Sequence[str], column: str) -> None:
    """Refuse labels with surrounding whitespace or differing only by case: each would silently be its own class."""
    spaced = sorted(n for n in names if n != n.strip())
    if spaced:
        raise PeftLabError(f"label {spaced[0]!r} in column {column!r} has surrounding whitespace, so it would be a "
                           f"class of its own ({len(spaced)} such label(s)); strip the labels in the data")
    seen: dict[str, str] = {}
    for name in sorted(names):
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise PeftLabError(f"labels {other!r} and {name!r} in column {column!r} differ only by case, so they "
                               "would be two classes; spell them the same in the data")


def check_targets(ds: datasets.DatasetDict, template: str) -> None:
    """Refuse rows whose target (``template`` rendered) is null or empty, naming the first: a JSON ``null``
    would train the word "None", an empty one the end-of-sequence token alone."""
    from peftlab.data.formats import render, template_fields

    fields = template_fields(template)
    for split, d in ds.items():
        columns = [d[f] for f in fields if f in d.column_names]
        for i, values in enumerate(zip(*columns)):
            row = dict(zip(fields, values))
            null = next((f for f, v in row.items() if v is None), None)
            if null is not None:
                raise PeftLabError(f"row {i} of {split}: column {null!r} of data.response_template is null (it "
                                   "would train the word 'None'); fill it or drop the row")
            if not render(template, row).strip():
                raise PeftLabError(f"row {i} of {split}: the response (data.response_template) is empty, so only "
                                   "the end-of-sequence token would be trained; fill it or drop the row")


def _encode_batch(batch, column, index):
    values = batch[column]
    return {LABELS_COLUMN: [int(v) for v in values] if index is None else [index[str(v)] for v in values]}


def split_dataset(
    ds: datasets.DatasetDict,
    *,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    stratify_by: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    group_by: str | None = None,
) -> datasets.DatasetDict:
    """Return train/validation/test: missing splits carved out of train, then capped.

    Train gets a ``_row`` column (``ROW_COLUMN``): each row's position in ``ds["train"]``, so a later
    selection (``few_shot_sample``) can say which source rows it kept.

    Args:
        ds: the source's splits; ``train`` is required, ``validation`` and ``test`` are used when present.
        val_fraction: size of a carved validation split, as a share of the *original* train size.
        test_fraction: the same for test (test is carved first, then validation).
        split_seed: seed of the carving and of the ``max_train_samples`` shuffle.
        stratify_by: ``ClassLabel`` column to stratify the carving by (classification: ``"labels"``). If a
            class is too small to stratify, the split falls back to a plain split with the same seed.
        max_train_samples: keep only the first N training rows after a shuffle with ``split_seed``.
        max_eval_samples: keep only the first N validation and test rows (in order).
        group_by: a column naming each row's group (a conversation id): whole groups are carved, drawn with
            ``split_seed``, so no group is in two splits (instead of stratifying).

    Raises:
        PeftLabError: train has fewer than 3 rows and a split must be carved out of it.
    """
    import datasets

    out = dict(ds)
    n_source = len(ds["train"])
    out["train"] = out["train"].add_column(ROW_COLUMN, list(range(n_source)))
    for name, fraction in (("test", test_fraction), ("validation", val_fraction)):
        if name in out:
            continue
        train = out["train"]
        if len(train) < 3:
            raise PeftLabError(f"data source has only {len(train)} training rows; cannot split off {name}")
        # fraction of the *original* train size, so val/test sizes do not depend on which was missing
        size = max(1, round(fraction * n_source))
        if group_by:
            out["train"], out[name] = _group_split(train, size, split_seed, group_by, name)
            continue
        try:
            parts = train.train_test_split(test_size=size, seed=split_seed, stratify_by_column=stratify_by)
        except ValueError:  # a class too small to stratify: fall back to a plain seeded split
            parts = train.train_test_split(test_size=size, seed=split_seed)
        out["train"], out[name] = parts["train"], parts["test"]
    if max_train_samples:
        out["train"] = out["train"].shuffle(seed=split_seed).select(
            range(min(max_train_samples, len(out["train"])))
        )
    for name in ("validation", "test"):
        if max_eval_samples:
            out[name] = out[name].select(range(min(max_eval_samples, len(out[name]))))
        if ROW_COLUMN in out[name].column_names:  # carved from train; the ids only describe training rows
            out[name] = out[name].remove_columns(ROW_COLUMN)
    return datasets.DatasetDict(out)


def _group_split(train: datasets.Dataset, size: int, seed: int, column: str, name: str):
    """(rest, carved): whole groups of ``column``, in a seeded random order, until ``carved`` has >= ``size`` rows."""
    groups: dict = {}
    for i, g in enumerate(train[column]):
        groups.setdefault(g, []).append(i)
    if len(groups) < 2:
        raise PeftLabError(f"data.group_column {column!r} has {len(groups)} group(s) in train; cannot split off "
                           f"{name} by group")
    order = sorted(groups, key=str)
    random.Random(seed).shuffle(order)
    carved: list[int] = []
    for g in order[:-1]:  # at least one group stays in train
        if len(carved) >= size:
            break
        carved += groups[g]
    chosen = set(carved)
    return train.select([i for i in range(len(train)) if i not in chosen]), train.select(sorted(carved))


def few_shot_sample(
    train: datasets.Dataset,
    *,
    k: int | None = None,
    n: int | None = None,
    seed: int = 0,
    label_column: str = LABELS_COLUMN,
    label_names: Sequence[str] | None = None,
) -> tuple[datasets.Dataset, list[int]]:
    """Keep ``k`` rows per class (stratified) or ``n`` rows in total, drawn with ``seed``.

    Exactly one of ``k`` and ``n`` is given. The kept rows stay in their order in ``train``.

    Args:
        train: the training split.
        k: rows per class of ``label_column`` (integer class indices).
        n: rows in total (any task).
        seed: seed of the draw (a ``random.Random``), independent of the split's seed.
        label_column: the class index column, for ``k``.
        label_names: class names in index order, for ``k``: a class with no rows counts as short, and the
            error names classes by name. Default: the names of ``label_column``'s ``ClassLabel``.

    Returns:
        The selected rows and their ids: the ``_row`` column's values where ``train`` has one (positions
        in the source's train split, see ``split_dataset``), else positions in ``train``.

    Raises:
        PeftLabError: a class has fewer than ``k`` rows, or ``train`` has fewer than ``n``.
    """
    if (k is None) == (n is None):
        raise ValueError("few_shot_sample needs exactly one of k and n")
    rng = random.Random(seed)
    if k is not None:
        if label_names is None:
            label_names = train.features[label_column].names
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(train[label_column]):
            by_class.setdefault(label, []).append(i)
        short = {label_names[c]: len(v) for c, v in by_class.items() if len(v) < k}
        short.update({name: 0 for c, name in enumerate(label_names) if c not in by_class})
        if short:
            raise PeftLabError(
                f"data.few_shot_k={k} but the training split has fewer examples of "
                f"{', '.join(f'{name!r} ({count})' for name, count in sorted(short.items()))}; lower few_shot_k"
            )
        chosen = sorted(i for c in sorted(by_class) for i in rng.sample(by_class[c], k))
    else:
        if n > len(train):
            raise PeftLabError(f"data.few_shot_n={n} but the training split has only "
                               f"{len(train)} examples; lower few_shot_n")
        chosen = sorted(rng.sample(range(len(train)), n))
    subset = train.select(chosen)
    ids = list(subset[ROW_COLUMN]) if ROW_COLUMN in train.column_names else list(chosen)
    return subset, ids


def pack_examples(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                  max_length: int) -> dict[str, list[list[int]]]:
    """Several tokenized causal-LM examples per row, up to ``max_length`` tokens, for training without padding.

    Rows are filled first-fit in order of decreasing length (deterministic; the training sampler shuffles the
    rows). Each example keeps its own ``position_ids`` from 0, from which transformers builds a block-diagonal
    causal mask when no attention mask is given, so no token attends across an example boundary. Each
    example's first label is ignored: in a packed row the position before it is the previous example's last
    token, which must not learn to predict it (unpacked, the first token is never a target either).

    Returns:
        ``{"input_ids", "labels", "position_ids"}``, one list per packed row.
    """
    order = sorted(range(len(input_ids)), key=lambda i: (-len(input_ids[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(input_ids[i])
        if n > max_length:
            raise PeftLabError(f"an example has {n} tokens, more than data.max_length={max_length}, and cannot be packed")
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in rows:
        ids, labs, positions = [], [], []
        for i in sorted(members):  # source order within a row
            ids += list(input_ids[i])
            labs += [IGNORE_INDEX] + list(labels[i][1:])
            positions += list(range(len(input_ids[i])))
        out["input_ids"].append(ids)
        out["labels"].append(labs)
        out["position_ids"].append(positions)
    return out
