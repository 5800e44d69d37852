"""``PredictionWriter``: predict_step outputs written to one .jsonl or .csv file, one row per input, in input order.

``peftlab predict`` adds it (``--predictions_file``; default ``<log_dir>/predictions.jsonl``); from Python::

    trainer = L.Trainer(callbacks=[PredictionWriter("preds.csv")])
    trainer.predict(model, datamodule=data)

Under a multi-process strategy every rank predicts a disjoint share of the rows (Lightning's distributed
sampler: rank r gets rows r, r + W, r + 2W, ...; a padding sampler may repeat a few). Each rank pairs its
outputs with their dataset indices (the ``batch_indices`` Lightning passes to a ``BasePredictionWriter``),
rank 0 gathers all of them, and writes every row exactly once, in input order, next to its input text: the
file is the same as one process writes.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from peftlab.errors import PeftLabError


def prediction_rows(batch: dict, label_names: list[str] | None = None) -> list[dict]:
    """The rows of one ``predict_step`` output: ``{"label", "probs"}`` (classification, with class names when
    known) or ``{"generated"}`` (generation)."""
    if "probs" in batch:
        return [{"label": label_names[p] if label_names else int(p),
                 "probs": {(label_names[i] if label_names else str(i)): round(float(q), 6) for i, q in enumerate(pr)}}
                for p, pr in zip(batch["pred"].tolist(), batch["probs"].tolist())]
    return [{"generated": t} for t in batch["text"]]


def input_columns(columns: dict, prediction: dict) -> dict:
    """An input row's columns to write beside ``prediction``; one whose name a prediction field has (a gold
    ``label`` column beside the predicted ``label``) is written as ``input_<name>``."""
    return {(f"input_{k}" if k in prediction or k == "input" else k): v for k, v in columns.items()}


def write_rows(path: str, rows: list[dict]) -> None:
    """Write ``rows`` atomically as jsonl, or csv when ``path`` ends in .csv (one column per class probability)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            flat = [{**{k: v for k, v in r.items() if k != "probs"},
                     **{f"p_{k}": v for k, v in r.get("probs", {}).items()}} for r in rows]
            writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["input"])
            writer.writeheader()
            writer.writerows(flat)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def _per_dataloader(predictions: list, batch_indices: list) -> list[tuple[list, list]]:
    """[(batch outputs, batch indices)] per dataloader: Lightning passes one dataloader's outputs unnested."""
    if predictions and isinstance(predictions[0], list):  # several dataloaders
        return [(p, i) for p, i in zip(predictions, batch_indices)]
    return [(predictions, batch_indices[0] if batch_indices else [])]


def gather_records(obj: Any, trainer) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere); ``[obj]`` in a single process."""
    import torch.distributed as dist

    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size() if trainer.is_global_zero else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict_step`` outputs to one file, one row per input, in input order, next to the input text.

    Args:
        path: ``.jsonl`` (default) or ``.csv`` file; default ``<trainer.log_dir>/predictions.jsonl``.
            Classification rows are ``{"input", "label", "probs"}`` (csv: one ``p_<class>`` column per class),
            generation rows ``{"input", "generated"}``; ``input`` comes from the datamodule's ``predict_texts()``,
            and every input column of the row (ids, ``text_pair``...; ``predict_inputs()``) comes first, one
            named like a prediction field as ``input_<name>``.
    """

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="epoch")
        self.path = path
        self.written: str | None = None  # where the last predict wrote, on rank 0

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        log_dir = trainer.log_dir  # a collective under a distributed strategy: every rank must ask
        datamodule = trainer.datamodule
        names = getattr(datamodule, "label_names", None)
        mine = []  # (dataloader, row index, row) of this rank
        for dataloader, (outputs, indices) in enumerate(_per_dataloader(predictions or [], batch_indices or [])):
            position = 0
            for b, batch in enumerate(outputs):
                rows = prediction_rows(batch, names)
                if b < len(indices) and len(indices[b]) == len(rows):
                    where = list(indices[b])
                elif trainer.world_size == 1:  # no indices (not a torch DataLoader): one process keeps its order
                    where = list(range(position, position + len(rows)))
                else:
                    raise PeftLabError("cannot tell which inputs the predictions belong to: the predict dataloader "
                                       "does not report batch indices (use a torch DataLoader)")
                position += len(rows)
                mine += [(dataloader, int(i), row) for i, row in zip(where, rows)]
        gathered = gather_records(mine, trainer)
        if not trainer.is_global_zero:
            return
        unique: dict[tuple[int, int], dict] = {}
        for part in gathered:
            for dataloader, index, row in part:
                unique.setdefault((dataloader, index), row)  # a padding sampler repeats rows: keep one
        if not unique:
            return
        texts = datamodule.predict_texts() if hasattr(datamodule, "predict_texts") else None
        inputs = datamodule.predict_inputs() if hasattr(datamodule, "predict_inputs") else None
        out = []
        for (dataloader, index), row in sorted(unique.items()):
            if texts is not None and dataloader == 0 and index < len(texts):
                row = {"input": texts[index], **row}
            if inputs is not None and dataloader == 0 and index < len(inputs):
                row = {**input_columns(inputs[index], row), **row}
            out.append(row)
        path = self.path or os.path.join(log_dir or ".", "predictions.jsonl")
        write_rows(path, out)
        self.written = path
        print(f"[peftlab] wrote {len(out)} predictions to {path}")
