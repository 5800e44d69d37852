"""``GenerationEval``: metrics of generated text (exact match, ROUGE-L, BLEU) beside the teacher-forced loss, during
training and in ``peftlab test``; the test's generations written to ``generations.jsonl``.

    peftlab fit --config configs/causal_lm_lora.yaml --trainer.callbacks+=peftlab.callbacks.GenerationEval \\
        --trainer.callbacks.every_n_validations=2 --trainer.callbacks.max_batches=4

``peftlab test`` on a causal LM or seq2seq run adds one itself (``--generations_file``, default
``<log_dir>/generations.jsonl``). ``peftlab compare`` uses the same callback for its generated-text metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch

from peftlab.generation import length_groups
from peftlab.text_metrics import BLEU_N, bleu_stats


def _normalise(text: str) -> str:
    return " ".join(text.split())


class GenerationEval(L.Callback):
    """Score generated text: greedy decoding of up to ``max_new_tokens`` from each example's prompt, compared with
    its reference (the response / target), logged as ``<stage>/gen_exact_match`` (whitespace-normalised equality),
    ``<stage>/rougeL`` (F-measure) and ``<stage>/bleu`` (corpus BLEU-4), torchmetrics' ROUGEScore and BLEUScore.
    Under DDP every rank generates its share of the batches and the metrics are reduced over all ranks.

    Args:
        max_new_tokens: tokens generated per example
        stages: where to generate: ``test``, ``val`` or both (generation on a CPU is slow)
        every_n_validations: during fit, generate at every N-th validation only (1: at each)
        max_batches: generate on the first N batches of each validation / test (None: all of them)
        generations_file: write each test example's prompt, reference, generation and scores to this JSONL
            file (``auto``: ``generations.jsonl`` in the run directory; None: no file)
    """

    def __init__(self, max_new_tokens: int = 32, stages: list[str] | tuple[str, ...] = ("val", "test"),
                 every_n_validations: int = 1, max_batches: int | None = None,
                 generations_file: str | None = None):
        super().__init__()
        from peftlab.errors import PeftLabError

        unknown = sorted(set(stages) - {"val", "test"})
        if unknown:
            raise PeftLabError(f"GenerationEval stages {unknown} are unknown; use val and/or test")
        if every_n_validations < 1 or (max_batches is not None and max_batches < 1):
            raise PeftLabError("GenerationEval: every_n_validations and max_batches must be at least 1")
        self.max_new_tokens = int(max_new_tokens)
        self.stages = tuple(stages)
        self.every_n_validations = int(every_n_validations)
        self.max_batches = max_batches
        self.generations_file = generations_file
        self.examples: dict[str, list[dict]] = {"val": [], "test": []}
        self.records: list[dict] = []  # the test's prompt / reference / generation rows, this rank's
        self.written: str | None = None
        self._metrics: dict[str, dict] = {}
        self._validations = 0
        self._active: dict[str, bool] = {"val": False, "test": False}

    # -------------------------------------------------------------- prompts and references of an eval batch
    @staticmethod
    def prompts_and_references(batch: dict, task: str, pad_id: int) -> tuple[dict, list[list[int]]]:
        """(left-padded generation inputs, reference token ids per example) of an evaluation batch.

        A causal-LM example whose labels hold several spans (a chat trained on every assistant reply) is scored on
        its last span: the prompt is everything before it (earlier replies included, as written), the reference
        that span; a single response is its one span."""
        labels = batch["labels"]
        if task == "seq2seq":
            refs = [[int(t) for t in row[row != -100]] for row in labels]
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, refs
        prompts, refs = [], []
        for ids, mask, row in zip(batch["input_ids"], batch["attention_mask"], labels):
            targets = (row != -100).nonzero().flatten().tolist()
            if not targets:
                end = int(mask.sum())
                refs.append([])
            else:
                end, labelled = targets[-1], set(targets)
                while end - 1 in labelled:  # back to the start of the last contiguous span
                    end -= 1
                refs.append([int(t) for t in row[end:targets[-1] + 1]])
            prompts.append(ids[:end][mask[:end].bool()])
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=batch["input_ids"].dtype)
        attention = torch.zeros((len(prompts), width), dtype=batch["attention_mask"].dtype)
        for i, p in enumerate(prompts):
            if len(p):
                input_ids[i, width - len(p):] = p
                attention[i, width - len(p):] = 1
        device = batch["input_ids"].device
        return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}, refs

    def generate(self, pl_module, batch: dict) -> tuple[list[str], list[str]]:
        """(generated texts, reference texts) of an evaluation batch."""
        tok = pl_module.tokenizer
        inputs, refs = self.prompts_and_references(batch, pl_module.task, _pad_id(tok))
        groups = length_groups(inputs["attention_mask"].sum(-1).tolist(),
                               pl_module.task != "causal_lm" or type(pl_module).pads_exactly)
        texts: list[str] = [""] * len(refs)
        for index in groups:
            part = inputs
            if len(groups) > 1:
                width = max(int(inputs["attention_mask"][i].sum()) for i in index)
                part = {k: v[index][:, v.shape[1] - width:] for k, v in inputs.items()}
            out = pl_module.model.generate(**part, max_new_tokens=self.max_new_tokens, do_sample=False,
                                           pad_token_id=_pad_id(tok))
            if pl_module.task == "causal_lm":
                out = out[:, part["input_ids"].shape[1]:]
            for i, text in zip(index, tok.batch_decode(out, skip_special_tokens=True)):
                texts[i] = text
        return texts, tok.batch_decode(refs, skip_special_tokens=True)

    def prompt_texts(self, pl_module, batch: dict) -> list[str]:
        """The prompt (input) text of each example of an evaluation batch, as the model saw it."""
        tok = pl_module.tokenizer
        inputs, _ = self.prompts_and_references(batch, pl_module.task, _pad_id(tok))
        return [tok.decode(ids[mask.bool()], skip_special_tokens=True)
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]

    # -------------------------------------------------------------- hooks
    def _start(self, stage: str, pl_module=None) -> None:
        from torchmetrics import MeanMetric
        from torchmetrics.text import BLEUScore, ROUGEScore

        self.examples[stage] = []
        if stage == "test":
            self.records = []
        metrics = {"exact": MeanMetric(), "rouge": ROUGEScore(rouge_keys="rougeL"),
                   "bleu": BLEUScore(n_gram=BLEU_N)}
        if pl_module is not None:  # states on the module's device: DDP reduces them there
            metrics = {k: m.to(pl_module.device) for k, m in metrics.items()}
        self._metrics[stage] = metrics
        self._active[stage] = True

    def _batch(self, stage: str, pl_module, batch, batch_idx: int = 0) -> None:
        if stage not in self.stages or pl_module.task == "classification" or not self._active.get(stage):
            return
        if self.max_batches is not None and batch_idx >= self.max_batches:
            return
        from torchmetrics.functional.text import rouge_score

        preds, refs = self.generate(pl_module, batch)
        prompts = self.prompt_texts(pl_module, batch) if stage == "test" else [""] * len(preds)
        metrics = self._metrics[stage]
        for pred, ref, prompt in zip(preds, refs, prompts):
            row = {"gen_exact_match": float(_normalise(pred) == _normalise(ref)),
                   "rougeL": float(rouge_score(pred, ref, rouge_keys="rougeL")["rougeL_fmeasure"]),
                   **bleu_stats(pred, ref)}
            if len(self.examples[stage]) < 5:
                row["sample"] = {"generated": pred, "reference": ref}
            self.examples[stage].append(row)
            metrics["exact"].update(row["gen_exact_match"])
            if stage == "test":
                self.records.append({"input": prompt, "reference": ref, "generated": pred,
                                     "gen_exact_match": row["gen_exact_match"], "rougeL": round(row["rougeL"], 6)})
        metrics["rouge"].update(preds, refs)
        metrics["bleu"].update(preds, [[r] for r in refs])

    def _end(self, stage: str, trainer, pl_module) -> None:
        if stage not in self.stages or pl_module.task == "classification" or not self._active.get(stage):
            return
        self._active[stage] = False
        metrics = self._metrics[stage]
        if metrics["exact"].update_count == 0 and not _distributed(trainer):
            return
        # compute() reduces every rank's state, so the values are global and equal on all ranks
        pl_module.log_dict({
            f"{stage}/gen_exact_match": float(metrics["exact"].compute()),
            f"{stage}/rougeL": float(metrics["rouge"].compute()["rougeL_fmeasure"]),
            f"{stage}/bleu": float(metrics["bleu"].compute()),
        }, prog_bar=False, sync_dist=True)

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self._validations += 1
        if trainer.state.fn != "fit" or (self._validations - 1) % self.every_n_validations == 0:
            self._start("val", pl_module)

    def on_test_epoch_start(self, trainer, pl_module):
        self._start("test", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._batch("val", pl_module, batch, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch("test", pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._end("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module):
        self._end("test", trainer, pl_module)

    def on_test_end(self, trainer, pl_module):
        if not self.generations_file or "test" not in self.stages or pl_module.task == "classification":
            return
        path = self.generations_file
        if path == "auto":
            path = os.path.join(trainer.log_dir, "generations.jsonl")  # a collective: every rank asks
        from peftlab.callbacks.predictions import gather_records

        gathered = gather_records(self.records, trainer)
        if gathered is None:  # not rank 0
            return
        rows = [row for part in gathered for row in part]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)
        self.written = str(path)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _distributed(trainer) -> bool:
    return getattr(trainer, "world_size", 1) > 1
