"""``PeftDataModule``: one data pipeline for every method (source -> task format -> tokenized batches).

The dataset transforms (label encoding, splitting, few-shot sampling) are pure functions in
``peftlab.data.transforms``; the module holds their one result (``LoadedData``) and tokenizes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Literal

import lightning as L
import torch

from peftlab.backbones import DATA_TASKS, DataTask, is_decoder_only, load_tokenizer, model_task
from peftlab.data import chat, formats, multitask, transforms
from peftlab.data.loading import ResumableLoader, epoch_length, eval_generator, process_rank, training_sampler
from peftlab.data.sources import PACKAGED_LABELS, load_source
from peftlab.errors import PeftLabError

FEW_SHOT_IDS_NOTE = "row positions in the source's train split (packaged: after keeping fresh/rotten)"


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No datasets progress bars while peftlab reads and tokenizes: its steps (generating, filtering, casting,
    tokenizing) take under a second on the data sizes PEFT runs use, and :meth:`PeftDataModule.summary` says
    what came out of them in one line."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


@dataclass(frozen=True)
class LoadedData:
    """What ``PeftDataModule.load`` computed from the source: everything the module knows about its data.

    Attributes:
        splits: train/validation/test (a ``datasets.DatasetDict``), labels encoded, split, few-shot sampled.
        label_names: class names in index order (classification), else ``None``.
        few_shot_ids: positions in the source's train split of the kept rows (few-shot runs), else ``None``.
    """

    splits: Any
    label_names: tuple[str, ...] | None
    few_shot_ids: tuple[int, ...] | None


class PeftDataModule(L.LightningDataModule):
    """Loads, splits, formats and tokenizes a dataset for classification, causal LM, seq2seq or chat training.

    Args:
        source: ``packaged:rotten_tomatoes`` / ``packaged:rotten_tomatoes_plots``, a local csv/tsv/jsonl/json/
            parquet file, a mapping ``{train: file, validation: file, test: file}``, or a hub dataset name.
        task: ``classification``, ``causal_lm``, ``seq2seq`` or ``chat`` (conversations rendered with the chat
            template, trained as a causal LM; docs/chat.md); the CLI passes it on to the model.
        tokenizer: backbone whose tokenizer to use; the CLI links it to ``model.init_args.backbone``.
        text_column: classification input column.
        text_pair_column: optional second input column (sentence pairs).
        label_column: classification label column (strings or integers).
        labels: label names in class-index order; default: integers as they are, strings sorted
            (packaged sources have a fixed order). Rows with other labels are an error.
        prompt_template: causal_lm/seq2seq input, ``str.format`` over the columns, e.g. ``"Review: {text}\\nSentiment:"``.
        response_template: causal_lm/seq2seq target, e.g. ``" {label}"``; empty for plain language modelling.
        loss_on: causal_lm only: ``response`` masks the prompt tokens out of the loss, ``all`` trains on every token.
        max_length: maximum tokens per input sequence (longer inputs are truncated).
        max_target_length: seq2seq only: maximum target tokens.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default: ``batch_size``).
        val_fraction: share of train split off as validation when the source has no validation split.
        test_fraction: share of train split off as test when the source has no test split.
        split_seed: seed of those splits (stratified by label for classification), so they are fixed.
        max_train_samples: use only the first N (shuffled by ``split_seed``) training examples.
        max_eval_samples: use only the first N validation and test examples.
        num_workers: DataLoader workers (collating in the background); default: 0 without a GPU (tokenization
            happens once, up front, and a CPU run needs every core for the model), 4 (at most half the cores)
            with one, so the GPU never waits for a batch.
        pin_memory: page-locked host memory for faster host-to-GPU copies; default: on when a GPU is present.
        dataset_config: hub dataset configuration name (e.g. ``sst2`` for ``glue``).
        few_shot_k: keep only k training examples per class (classification; stratified). Validation and
            test are untouched. The chosen rows are recorded in ``<run dir>/run.json`` (key ``data.few_shot_ids``).
        few_shot_n: keep only n training examples in total (any task, e.g. generation).
        few_shot_seed: seed of the few-shot draw (independent of ``split_seed``, so the split stays fixed).
        shuffle: reshuffle the training data every epoch (off: dataset order, e.g. to compare runs batch by batch).
        group_by_length: put examples of similar length in the same training batch (sorted within random
            groups of 50 batches), which removes most padding (docs/benchmarks.md: how much, and the quickstart's test
            accuracy with and without it). One process only (ignored under DDP).
        predict_source: a file (or hub dataset) of inputs alone for ``peftlab predict``, instead of the test split:
            no label or response columns needed; every input column is written back beside the prediction.
        group_column: a column naming each row's group (e.g. a conversation id); carved validation and test
            splits never share a group with training.
        chat_format: chat only: ``messages`` (role/content), ``sharegpt`` (from/value in ``conversations``),
            ``alpaca`` (instruction/input/output) or ``auto`` (from the columns).
        chat_template: chat only: a Jinja chat template (a file or the template text) instead of the tokenizer's
            own (required when the tokenizer has none).
        chat_roles: chat only: extra or changed role names, e.g. ``{bot: assistant, human: user}`` (ShareGPT's
            human/gpt/system/tool are known).
        system_prompt: chat only: a system message put first in conversations that have none.
        train_on: chat only: ``assistant`` (every assistant turn, in one sequence), ``last_assistant`` (the last
            one) or ``all`` (every token).
        train_on_eos: chat only: the template's end-of-turn marker after each trained reply is trained too (so the
            model learns to stop).
        packing: causal_lm/chat only: put several training examples in each row, up to ``max_length`` tokens, each
            with its own position ids so attention never crosses examples; the loss is unchanged (each
            example's targets, as unpacked). Methods that add virtual tokens per row (prompt / prefix tuning,
            P-tuning, P-tuning v2, LoRA + prompt) refuse it. Validation and test stay unpacked.
        tasks: several tasks in one run (with :class:`peftlab.multitask.MultiTask` as the model): ``{name:
            {setting: value}}``, each task's data settings over the ones above (``source`` at least), e.g.
            ``{sentiment: {source: a.csv}, topics: {source: b.jsonl, max_length: 64}}``. Every training batch
            holds rows of every task (docs/multi-task.md).
        task_weights: each task's share of a training batch's ``batch_size`` rows (``{name: weight}``, default
            equal; each task gets at least one row). The epoch ends with the task that has the most batches;
            the others cycle.
    """

    def __init__(
        self,
        source: str | dict[str, str] = "packaged:rotten_tomatoes",
        task: DataTask = "classification",
        tokenizer: str = "packaged:all-MiniLM-L6-v2",
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        labels: list[str] | None = None,
        prompt_template: str = "{prompt}",
        response_template: str = "{response}",
        loss_on: Literal["response", "all"] = "response",
        max_length: int = 128,
        max_target_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 42,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        dataset_config: str | None = None,
        few_shot_k: int | None = None,
        few_shot_n: int | None = None,
        few_shot_seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        packing: bool = False,
        predict_source: str | None = None,
        group_column: str | None = None,
        chat_format: chat.ChatFormat = "auto",
        chat_template: str | None = None,
        chat_roles: dict[str, str] | None = None,
        system_prompt: str | None = None,
        train_on: chat.TrainOn = "assistant",
        train_on_eos: bool = True,
        # values typed str first: jsonargparse would read a str under Any as YAML ("Review: {text}" -> a mapping)
        tasks: dict[str, dict[str, str | int | float | bool | list | dict | None]] | None = None,
        task_weights: dict[str, float] | None = None,
    ):
        super().__init__()
        if task not in DATA_TASKS:
            raise PeftLabError(f"data.task {task!r} is unknown; choose one of {', '.join(DATA_TASKS)}")
        for name, value in (("max_length", max_length), ("max_target_length", max_target_length),
                            ("batch_size", batch_size)):
            if value < 1:
                raise PeftLabError(f"data.{name} must be >= 1 (got {value})")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise PeftLabError(f"data.{name} must be between 0 and 1 (got {value})")
        if few_shot_k is not None and few_shot_n is not None:
            raise PeftLabError("set data.few_shot_k (per class) or data.few_shot_n (in total), not both")
        if few_shot_k is not None and (few_shot_k < 1 or task != "classification"):
            raise PeftLabError("data.few_shot_k must be >= 1 and needs task: classification; "
                               "use data.few_shot_n for other tasks")
        if few_shot_n is not None and few_shot_n < 1:
            raise PeftLabError(f"data.few_shot_n must be >= 1 (got {few_shot_n})")
        if val_fraction + test_fraction >= 1.0:
            raise PeftLabError("data.val_fraction + data.test_fraction must leave some training data (< 1)")
        # Lightning refuses a key that model and data both log with different values: chat data's model task is
        # causal_lm, so the data logs its task as chat_task instead
        # and the model's tasks (MultiTask) are its methods, the data's their sources: logged as data_tasks
        self.save_hyperparameters(ignore=["tasks", *(["task"] if task == "chat" else [])])
        if task == "chat":
            self.hparams["chat_task"] = task
        if tasks is not None:
            self.hparams["data_tasks"] = tasks
        self.source = source
        self.task = task
        self.model_task = model_task(task)  # what the model trains: chat data trains a causal LM
        self.tokenizer_name = tokenizer
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self._labels = labels
        self.prompt_template = prompt_template
        self.response_template = response_template
        self.loss_on = loss_on
        self.max_length = max_length
        self.max_target_length = max_target_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        if num_workers is not None and num_workers < 0:
            raise PeftLabError(f"data.num_workers must be >= 0 (got {num_workers})")
        gpu = torch.cuda.is_available()
        self.num_workers = num_workers if num_workers is not None else (min(4, (os.cpu_count() or 2) // 2) if gpu else 0)
        self.pin_memory = pin_memory if pin_memory is not None else gpu
        self.dataset_config = dataset_config
        self.few_shot_k = few_shot_k
        self.few_shot_n = few_shot_n
        self.few_shot_seed = few_shot_seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        if packing and self.model_task != "causal_lm":
            raise PeftLabError(f"data.packing needs task: causal_lm or chat (got {task!r}); set data.packing false")
        self.packing = packing
        self.predict_source = predict_source
        self.group_column = group_column
        self.chat_format = chat_format
        self.chat_template = chat_template
        self.chat_roles = dict(chat_roles) if chat_roles else None
        self.system_prompt = system_prompt
        self.train_on = train_on
        self.train_on_eos = train_on_eos
        self._loaded: LoadedData | None = None  # set by load(), the only place that reads the source
        self.datasets: dict = {}  # tokenized splits, set by setup()
        #: several tasks: one data module per task (``tasks``), built over these settings; None: one task
        self.task_data: dict[str, PeftDataModule] | None = None
        self.task_batch_sizes: dict[str, int] = {}
        if tasks is not None or task_weights is not None:
            self.task_data, self.task_batch_sizes = multitask.task_modules(self, tasks, task_weights)

    # ------------------------------------------------------------------ raw data and labels
    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_name)

    @cached_property
    def pad_left(self) -> bool:
        """Pad on the left for decoder-only classification: with soft prompts the model sees embeddings,
        not ids, and then takes the *last position* as the sequence's summary token."""
        return self.task == "classification" and is_decoder_only(self.tokenizer_name)

    def load(self) -> LoadedData:
        """Read, label-encode, split and few-shot-sample the source, once; later calls return the same result.

        This is the DataModule's only data state (``prepare_data``, ``setup``, ``raw``, ``label_names``,
        ``num_labels`` and ``few_shot_ids`` all go through it). Reading labels does not need the tokenizer,
        so ``num_labels`` works right after construction (the CLI passes it to the model then).
        """
        if self.task_data is not None:  # several tasks: each reads its own source
            for data in self.task_data.values():
                data.load()
            return None
        if self._loaded is None:
            with quiet_progress():
                self._loaded = self._load()
        return self._loaded

    def _load(self) -> LoadedData:
        ds = load_source(self.source, self.dataset_config)
        transforms.check_columns(ds["train"].column_names, self._required_columns(ds["train"].column_names),
                                 self.source)
        names = None
        if self.task == "classification":
            default = PACKAGED_LABELS.get(self.source if isinstance(self.source, str) else "")
            ds, names = transforms.encode_labels(ds, self.label_column, self._labels or default)
        elif self.task == "chat":  # every conversation read once, so a bad row fails here in one line
            chat.check_conversations(ds, self._chat_format_of, roles=self.chat_roles)
        elif self.task in ("causal_lm", "seq2seq") and self.response_template:
            transforms.check_targets(ds, self.response_template)
        if self.group_column:
            transforms.check_columns(ds["train"].column_names, {"group_column": self.group_column}, self.source)
        ds = transforms.split_dataset(
            ds, val_fraction=self.val_fraction, test_fraction=self.test_fraction, split_seed=self.split_seed,
            stratify_by=transforms.LABELS_COLUMN if self.task == "classification" else None,
            max_train_samples=self.max_train_samples, max_eval_samples=self.max_eval_samples,
            group_by=self.group_column,
        )
        ids = None
        if self.few_shot_k or self.few_shot_n:
            ds["train"], ids = transforms.few_shot_sample(
                ds["train"], k=self.few_shot_k, n=self.few_shot_n, seed=self.few_shot_seed, label_names=names
            )
        return LoadedData(
            splits=ds,
            label_names=tuple(names) if names is not None else None,
            few_shot_ids=tuple(ids) if ids is not None else None,
        )

    @property
    def raw(self):
        """The source as a ``DatasetDict`` with train/validation/test and (classification) integer ``labels``;
        train keeps a ``_row`` column: each row's position in the source's train split."""
        return self.load().splits

    @property
    def label_names(self) -> list[str] | None:
        """Class names in index order (classification), read from the data or ``labels``; with ``predict_source``
        and ``labels`` the source is not read (predicting on a file of inputs needs no training file)."""
        if self.task != "classification" or self.task_data is not None:  # several tasks: per task
            return None
        if self._labels and self.predict_source is not None:
            return [str(n) for n in self._labels]
        return list(self.load().label_names)

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification) read from the data; the CLI passes it to the model."""
        names = self.label_names
        return None if names is None else len(names)

    @property
    def few_shot_ids(self) -> list[int] | None:
        """Positions in the source's train split of the rows a few-shot run keeps (``None``: not few-shot)."""
        if not (self.few_shot_k or self.few_shot_n):
            return None
        return list(self.load().few_shot_ids)

    def run_record(self) -> dict:
        """The data a run used, for ``<run dir>/run.json`` (``peftlab.runinfo`` stores it under ``data``).

        JSON-serialisable: the source and its settings, the split sizes, the class names and, for few-shot
        runs, the chosen rows (``few_shot_ids``).
        """
        if self.task_data is not None:
            return {"tasks": {name: data.run_record() for name, data in self.task_data.items()},
                    "task_batch_sizes": self.task_batch_sizes}
        loaded = self.load()
        source = self.source
        record = {
            "source": {str(k): str(v) for k, v in source.items()} if isinstance(source, Mapping) else str(source),
            "dataset_config": self.dataset_config,
            "task": self.task,
            "split_seed": self.split_seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "max_train_samples": self.max_train_samples,
            "max_eval_samples": self.max_eval_samples,
            "split_sizes": {split: len(d) for split, d in loaded.splits.items()},
            "label_names": list(loaded.label_names) if loaded.label_names is not None else None,
            "group_column": self.group_column,
            "prompt_format": self.prompt_format(),
        }
        if loaded.few_shot_ids is not None:
            record.update(
                few_shot_k=self.few_shot_k, few_shot_n=self.few_shot_n, few_shot_seed=self.few_shot_seed,
                few_shot_ids=[int(i) for i in loaded.few_shot_ids], few_shot_ids_note=FEW_SHOT_IDS_NOTE,
            )
        return record

    def prompt_format(self) -> dict | None:
        """How inputs are put to the model, recorded with the run and its adapter so inference uses it too
        (``Run.predict``): the chat template, or the prompt/response templates; ``None`` for classification."""
        if self.task_data is not None:  # each task's own, in its export
            return None
        if self.task == "chat":
            return {"kind": "chat", "chat_template": self.chat_template_text, "system_prompt": self.system_prompt}
        if self.task == "classification":
            return None
        return {"kind": "template", "prompt_template": self.prompt_template,
                "response_template": self.response_template}

    @cached_property
    def chat_template_text(self) -> str:
        """The Jinja chat template conversations are rendered with (``chat_template`` or the tokenizer's)."""
        return chat.resolve_template(self.tokenizer, self.chat_template, self.tokenizer_name)

    def _chat_format_of(self, columns) -> str:
        return chat.detect_format(columns, self.chat_format)

    def _required_columns(self, columns=(), targets: bool = True) -> dict[str, str]:
        """``{setting: column}`` of the columns this task reads from the source (``targets``: labels and
        responses too; not for ``predict_source``)."""
        if self.task == "classification":
            needed = {"text_column": self.text_column}
            if targets:
                needed["label_column"] = self.label_column
            if self.text_pair_column:
                needed["text_pair_column"] = self.text_pair_column
            return needed
        if self.task == "chat":
            fmt = self._chat_format_of(columns)
            needed = {f"chat_format {fmt}": c for c in chat.COLUMNS[fmt]}
            if fmt == "alpaca" and targets:
                needed["chat_format alpaca (the reply)"] = "output"
            return needed
        needed = {}
        for key in ("prompt_template", "response_template") if targets else ("prompt_template",):
            for field in formats.template_fields(getattr(self, key)):
                needed[f"{key} field {{{field}}}"] = field
        return needed

    # ------------------------------------------------------------------ tokenization
    def _tokenize(self, split, prompt_only: bool = False, ds=None):
        """The tokenized ``split`` (or ``ds``), with a ``_truncated`` column (1: the example was shortened)."""
        ds = self.raw[split] if ds is None else ds
        with_indices = False
        if self.task == "classification":
            fn = partial(formats.tokenize_classification, tokenizer=self.tokenizer, text_column=self.text_column,
                         text_pair_column=self.text_pair_column, max_length=self.max_length)
        elif self.task == "chat":
            with_indices = True  # errors name the row
            fn = partial(chat.tokenize_chat, tokenizer=self.tokenizer, template=self.chat_template_text,
                         fmt=self._chat_format_of(ds.column_names), roles=self.chat_roles,
                         system_prompt=self.system_prompt, train_on=self.train_on, train_on_eos=self.train_on_eos,
                         max_length=self.max_length, split=split, prompt_only=prompt_only)
        elif self.task == "causal_lm":
            fn = partial(formats.tokenize_causal_lm, tokenizer=self.tokenizer, prompt_template=self.prompt_template,
                         response_template=self.response_template, loss_on=self.loss_on,
                         max_length=self.max_length, prompt_only=prompt_only)
        else:
            fn = partial(formats.tokenize_seq2seq, tokenizer=self.tokenizer, prompt_template=self.prompt_template,
                         response_template=self.response_template, max_length=self.max_length,
                         max_target_length=self.max_target_length, prompt_only=prompt_only)
        try:
            with quiet_progress():
                return ds.map(fn, batched=True, with_indices=with_indices, remove_columns=ds.column_names,
                              desc=f"tokenizing {split}")
        except (KeyError, IndexError) as err:
            raise PeftLabError(f"could not format {split} rows with the templates: {err}") from err

    def _counted(self, tokenized, split):
        """``tokenized`` without its ``_truncated`` column, after saying how many examples were shortened."""
        if "_truncated" not in tokenized.column_names:
            return tokenized
        count = sum(tokenized["_truncated"])
        if count:
            what = ("lost their oldest turns (system prompt kept) or their end" if self.task == "chat"
                    else "lost the start of their prompt (or the end of the response)")
            print(f"[peftlab] {split}: {count} of {len(tokenized)} examples are longer than data.max_length="
                  f"{self.max_length} and {what}; raise data.max_length to keep them whole")
        return tokenized.remove_columns("_truncated")

    def prepare_data(self) -> None:
        # datasets caches every map on disk, so running this on rank 0 first makes the other ranks' setup cheap
        if self.task_data is not None:
            for data in self.task_data.values():
                data.prepare_data()
            return
        if self.predict_source is None:
            self.load()
            for split in ("train", "validation", "test"):
                self._tokenize(split)

    def setup(self, stage: str | None = None) -> None:
        if self.task_data is not None:
            if stage == "predict":
                raise PeftLabError("peftlab predict runs one task: predict with one task's adapter "
                                   "(<run>/adapter/best/<task>) and its data instead of the multi-task config")
            for data in self.task_data.values():
                data.setup(stage)
            return
        if stage == "predict" and self.predict_source is not None:  # inputs alone: the training data is not read
            if "predict" not in self.datasets:
                self.datasets["predict"] = self._counted(
                    self._tokenize("predict", prompt_only=True, ds=self.predict_rows()), "predict")
            return
        self.load()
        if not self.datasets:
            self.datasets = {split: self._counted(self._tokenize(split), split)
                             for split in ("train", "validation", "test")}
            if process_rank() == 0:
                print(f"[peftlab] data {self.summary()}", flush=True)
            if self.packing:
                import datasets

                train = self.datasets["train"]
                self.datasets["train"] = datasets.Dataset.from_dict(
                    transforms.pack_examples(train["input_ids"], train["labels"], self.max_length))
        if stage == "predict" and "predict" not in self.datasets:
            self.datasets["predict"] = self._counted(
                self._tokenize("test", prompt_only=self.model_task == "causal_lm"), "predict")

    def predict_rows(self):
        """The rows ``peftlab predict`` answers: ``predict_source`` (inputs alone) or the test split."""
        if self.predict_source is None:
            return self.raw["test"]
        if "_predict_rows" not in self.__dict__:
            ds = load_source(self.predict_source)["train"]
            transforms.check_columns(ds.column_names, self._required_columns(ds.column_names, targets=False),
                                     self.predict_source)
            self.__dict__["_predict_rows"] = ds
        return self.__dict__["_predict_rows"]

    def summary(self) -> str:
        """One line about the tokenized data: rows per split, the labels, and how many training rows reach
        ``max_length`` (cut there, or exactly that long)."""
        rows = ", ".join(f"{split} {len(self.datasets[split])}" for split in ("train", "validation", "test"))
        names = self.load().label_names
        full = sum(len(ids) >= self.max_length for ids in self.datasets["train"]["input_ids"])
        labels = f"; labels {', '.join(names)}" if names else ""
        return (f"{rows} rows{labels}; {full} of {len(self.datasets['train'])} training rows at max_length "
                f"{self.max_length} (truncated)")

    # ------------------------------------------------------------------ loaders
    def collate(self, features, pad_left: bool = False):
        """Pad a list of tokenized examples to the longest one (labels padded with -100). Packed rows
        (``position_ids``, no attention mask) get padding as one more segment with its own positions."""
        pad_id = self.tokenizer.pad_token_id
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list] = {}
        for key in features[0]:
            if key == "labels" and self.model_task == "classification":
                batch[key] = [f[key] for f in features]
                continue
            label_width = max(len(f[key]) for f in features) if key == "labels" else width
            fill = formats.IGNORE_INDEX if key == "labels" else (pad_id if key == "input_ids" else 0)
            rows = []
            for f in features:
                n = label_width - len(f[key])
                pad = list(range(n)) if key == "position_ids" else [fill] * n
                rows.append(pad + list(f[key]) if pad_left else list(f[key]) + pad)
            batch[key] = rows
        return {k: torch.tensor(v) for k, v in batch.items()}

    def target_tokens_per_batch(self) -> float:
        """The mean number of loss-carrying tokens in a training batch (from the tokenized training split).
        The model scales its summed causal-LM / seq2seq loss by it (any constant would do; this one keeps
        the loss at the size of a mean)."""
        if not self.datasets:
            self.setup()
        labels = self.datasets["train"]["labels"]
        if self.model_task == "classification" or not labels:
            return float(self.batch_size)
        return self.batch_size * sum(sum(t != formats.IGNORE_INDEX for t in row) for row in labels) / len(labels)

    def _loader(self, split, batch_size=None, pad_left=False):
        if not self.datasets:
            self.setup()
        dataset = self.datasets[split]
        common = dict(batch_size=batch_size or self.eval_batch_size, collate_fn=partial(self.collate, pad_left=pad_left),
                      num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                      pin_memory=self.pin_memory)
        if split == "train":  # resumable mid-epoch, bit-exactly (see peftlab.data.loading)
            lengths = [len(ids) for ids in dataset["input_ids"]] if self.group_by_length else None
            sampler = training_sampler(dataset, self.shuffle, lengths=lengths, batch_size=common["batch_size"])
            return ResumableLoader(dataset, sampler=sampler, **common)
        return torch.utils.data.DataLoader(dataset, generator=eval_generator(), **common)

    def train_dataloader(self):
        if self.task_data is not None:
            loader = multitask.train_loader(self)
        else:
            loader = self._loader("train", batch_size=self.batch_size, pad_left=self.pad_left)
        if self.trainer is not None:  # where an epoch ends under limit_train_batches (exact resume there)
            loader.epoch_length = epoch_length(len(loader), self.trainer.limit_train_batches)
        return loader

    def val_dataloader(self):
        if self.task_data is not None:  # one loader per task, in task order (the model's dataloader_idx)
            return [data.val_dataloader() for data in self.task_data.values()]
        return self._loader("validation", pad_left=self.pad_left)

    def test_dataloader(self):
        if self.task_data is not None:
            return [data.test_dataloader() for data in self.task_data.values()]
        return self._loader("test", pad_left=self.pad_left)

    def predict_dataloader(self):
        self.setup("predict")
        # generation continues the prompt, so decoder-only prompts are padded on the left
        return self._loader("predict", pad_left=self.model_task == "causal_lm" or self.pad_left)

    def predict_texts(self) -> list[str]:
        """The raw inputs behind ``predict_dataloader`` (in order), for writing predictions next to them: the
        text, the rendered prompt, or (chat) the last user turn each reply answers."""
        rows = self.predict_rows()
        if self.task == "classification":
            return [str(t) for t in rows[self.text_column]]
        if self.task == "chat":
            fmt = self._chat_format_of(rows.column_names)
            return [chat.last_user_turn(chat.to_messages(r, fmt, roles=self.chat_roles, where=f"row {i}"))
                    for i, r in enumerate(rows)]
        return [formats.render(self.prompt_template, r) for r in rows]

    def predict_inputs(self) -> list[dict]:
        """Every input column of the predicted rows (ids, ``text_pair``, gold labels...), to write beside each
        prediction; peftlab's own columns (``_row``, encoded ``labels``) are left out."""
        rows = self.predict_rows()
        # classification's text column is the written "input" already
        skip = (transforms.ROW_COLUMN, transforms.LABELS_COLUMN, self.text_column if self.task == "classification" else "")
        keep = [c for c in rows.column_names if c not in skip]
        return rows.select_columns(keep).to_list() if keep else [{} for _ in range(len(rows))]

