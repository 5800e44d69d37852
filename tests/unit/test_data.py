"""PeftDataModule: sources, splits, labels, task formats, and the errors for bad data."""

from __future__ import annotations

import json

import pytest

from conftest import make_data, rotten_rows, write_csv
from peftlab.data.formats import IGNORE_INDEX
from peftlab.data.transforms import ROW_COLUMN, encode_labels, few_shot_sample, split_dataset
from peftlab.errors import PeftLabError


def test_packaged_rotten_tomatoes_split_is_fixed_and_stratified(tiny_bert):
    a = make_data("packaged:rotten_tomatoes", "classification", tiny_bert)
    raw = a.raw
    # 7,403 fresh + 5,405 rotten; 10% test and 10% validation of the whole, by seed
    assert {k: len(v) for k, v in raw.items()} == {"train": 10246, "validation": 1281, "test": 1281}
    assert a.label_names == ["rotten", "fresh"] and a.num_labels == 2
    for split in raw.values():
        fresh = sum(split["labels"]) / len(split)
        assert fresh == pytest.approx(7403 / 12808, abs=0.002)  # stratified
    b = make_data("packaged:rotten_tomatoes", "classification", tiny_bert)
    assert b.raw["test"]["text"][:20] == raw["test"]["text"][:20]
    c = make_data("packaged:rotten_tomatoes", "classification", tiny_bert, split_seed=7)
    assert c.raw["test"]["text"][:20] != raw["test"]["text"][:20]


def test_packaged_plots_for_language_modelling(tiny_llama):
    data = make_data("packaged:rotten_tomatoes_plots", "causal_lm", tiny_llama, prompt_template="{text}",
                     response_template="", loss_on="all", max_length=32)
    assert sum(len(v) for v in data.raw.values()) == 1097
    data.setup()
    row = data.datasets["train"][0]
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) <= 32


def test_label_mapping_from_strings_and_explicit_order(tmp_path, tiny_bert):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["b", "a", "c"] * 10)]
    src = write_csv(tmp_path / "d.csv", rows)
    data = make_data(src, "classification", tiny_bert)
    assert data.label_names == ["a", "b", "c"] and data.num_labels == 3
    data = make_data(src, "classification", tiny_bert, labels=["c", "b", "a"])
    first = data.raw["train"]
    assert all(data.label_names[i] == lab for i, lab in zip(first["labels"], first["label"]))
    with pytest.raises(PeftLabError, match=r"labels \['c'\] in column 'label' are out of range"):
        make_data(src, "classification", tiny_bert, labels=["a", "b"]).num_labels  # noqa: B018 (the property raises)


def test_integer_labels_and_out_of_range(tmp_path, tiny_bert):
    src = write_csv(tmp_path / "d.csv", [{"text": f"t{i}", "label": i % 3} for i in range(30)])
    assert make_data(src, "classification", tiny_bert).label_names == ["0", "1", "2"]
    with pytest.raises(PeftLabError, match="out of range"):
        make_data(src, "classification", tiny_bert, labels=["neg", "pos"]).num_labels  # noqa: B018 (the property raises)
    neg = write_csv(tmp_path / "n.csv", [{"text": f"t{i}", "label": i % 2 - 1} for i in range(30)])
    with pytest.raises(PeftLabError, match="negative labels"):
        make_data(neg, "classification", tiny_bert).num_labels  # noqa: B018 (the property raises)


def test_explicit_splits_and_jsonl(tmp_path, tiny_bert):
    rows = rotten_rows(60)
    files = {}
    for split, part in (("train", rows[:40]), ("dev", rows[40:50]), ("test", rows[50:])):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        files[split] = str(path)
    data = make_data(files, "classification", tiny_bert)
    assert {k: len(v) for k, v in data.raw.items()} == {"train": 40, "validation": 10, "test": 10}


def test_causal_lm_masks_the_prompt(generation_jsonl, tiny_llama):
    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_length=64)
    data.setup()
    row = data.datasets["train"][0]
    tok = data.tokenizer
    n_masked = sum(1 for x in row["labels"] if x == IGNORE_INDEX)
    response = [x for x in row["labels"] if x != IGNORE_INDEX]
    assert row["input_ids"][n_masked:] == response
    assert response[-1] == tok.eos_token_id
    assert tok.decode(response[:-1]).strip() in ("fresh", "rotten")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_long_prompt_keeps_the_response(tmp_path, tiny_llama):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 200, "response": " fresh"}) + "\n" * 1, encoding="utf-8")
    for _ in range(9):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"prompt": "word " * 200, "response": " fresh"}) + "\n")
    data = make_data(str(path), "causal_lm", tiny_llama, max_length=16)
    data.setup()
    row = data.datasets["train"][0]
    assert len(row["input_ids"]) == 16 and row["labels"][-1] == data.tokenizer.eos_token_id
    assert data.tokenizer.decode([x for x in row["labels"] if x != IGNORE_INDEX][:-1]).strip() == "fresh"


def test_seq2seq_targets(generation_jsonl, tiny_t5):
    data = make_data(generation_jsonl, "seq2seq", tiny_t5, max_target_length=4)
    data.setup()
    row = data.datasets["train"][0]
    assert 0 < len(row["labels"]) <= 4 and IGNORE_INDEX not in row["labels"]


def test_max_samples(sentiment_csv, tiny_bert):
    data = make_data(sentiment_csv, "classification", tiny_bert, max_train_samples=10, max_eval_samples=3)
    assert [len(data.raw[s]) for s in ("train", "validation", "test")] == [10, 3, 3]


@pytest.mark.parametrize(
    "setup, kwargs, message",
    [
        (None, {"text_column": "txt"}, r"column 'txt' \(data.text_column\) is not in .*columns are: text, label.*Did you mean 'text'"),
        (None, {"label_column": "sentiment"}, r"column 'sentiment' \(data.label_column\)"),
        ("empty", {}, "is empty"),
        ("missing", {}, "does not exist"),
        ("header_only", {}, "has no rows"),
        ("latin1", {}, "not valid UTF-8"),
        ("one_label", {}, "at least 2 labels"),
        ("bad_ext", {}, "unsupported extension '.txt'"),
        (None, {"val_fraction": 0.0}, "val_fraction must be between 0 and 1"),
        (None, {"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_data_messages(tmp_path, sentiment_csv, tiny_bert, setup, kwargs, message):
    src = sentiment_csv
    if setup == "empty":
        src = str(tmp_path / "empty.csv")
        open(src, "w").close()
    elif setup == "missing":
        src = str(tmp_path / "missing.csv")
    elif setup == "header_only":
        src = str(tmp_path / "h.csv")
        open(src, "w").write("text,label\n")
    elif setup == "latin1":
        src = str(tmp_path / "l.csv")
        open(src, "wb").write(b"text,label\n" + "caf\xe9 cr\xe8me,fresh\n".encode("latin-1") * 20)
    elif setup == "one_label":
        src = write_csv(tmp_path / "o.csv", [{"text": "x", "label": "fresh"}] * 10)
    elif setup == "bad_ext":
        src = str(tmp_path / "d.txt")
        open(src, "w").write("hello\n")
    with pytest.raises(PeftLabError, match=message):
        make_data(src, "classification", tiny_bert, **kwargs).num_labels  # noqa: B018 (the property raises)


def test_template_field_missing(generation_jsonl, tiny_llama):
    with pytest.raises(PeftLabError, match=r"column 'question' \(data.prompt_template field \{question\}\)"):
        make_data(generation_jsonl, "causal_lm", tiny_llama, prompt_template="Q: {question}").raw  # noqa: B018 (the property raises)


def test_parquet_source_and_tokenization_is_cached_on_disk(tmp_path, tiny_bert):
    import datasets

    rows = rotten_rows(40)
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    data = make_data(str(path), "classification", tiny_bert)
    data.setup()
    train = data.datasets["train"]
    assert len(train) + len(data.datasets["validation"]) + len(data.datasets["test"]) == 40
    # the tokenized splits live in datasets' on-disk cache, keyed by fingerprint ...
    assert train.cache_files
    # ... so a second DataModule with the same settings reuses them instead of tokenizing again
    again = make_data(str(path), "classification", tiny_bert)
    again.setup()
    assert again.datasets["train"].cache_files == train.cache_files
    assert again.datasets["train"]["input_ids"] == train["input_ids"]


def test_hub_names_fail_clearly_offline(tiny_bert):
    # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for the suite: the hub path runs and must fail cleanly
    with pytest.raises(PeftLabError, match="could not load dataset 'no-such-org/no-such-data'.*needs internet"):
        make_data("no-such-org/no-such-data", "classification", tiny_bert).raw  # noqa: B018 (the property raises)
    from peftlab.methods import LoRA

    with pytest.raises(PeftLabError, match="could not load tokenizer of backbone 'no-such-org/no-such-model'"):
        LoRA(backbone="no-such-org/no-such-model", num_labels=2).build()


def test_few_shot_k_per_class_is_stratified_seeded_and_leaves_eval_alone(tiny_bert):
    full = make_data("packaged:rotten_tomatoes", "classification", tiny_bert)
    few = make_data("packaged:rotten_tomatoes", "classification", tiny_bert, few_shot_k=8, few_shot_seed=1)
    train = few.raw["train"]
    assert sorted(train["labels"]) == [0] * 8 + [1] * 8
    assert few.raw["test"]["text"] == full.raw["test"]["text"]
    assert few.raw["validation"]["text"] == full.raw["validation"]["text"]
    again = make_data("packaged:rotten_tomatoes", "classification", tiny_bert, few_shot_k=8, few_shot_seed=1)
    other = make_data("packaged:rotten_tomatoes", "classification", tiny_bert, few_shot_k=8, few_shot_seed=2)
    assert again.raw["train"]["text"] == train["text"] and other.raw["train"]["text"] != train["text"]
    # the recorded ids point at the same rows of the source's train split
    assert len(few.few_shot_ids) == 16
    assert [full.raw["train"]["text"][full.raw["train"]["_row"].index(i)] for i in few.few_shot_ids[:3]] == \
        train["text"][:3]


def test_few_shot_n_for_generation_and_errors(generation_jsonl, sentiment_csv, tiny_llama, tiny_bert):
    data = make_data(generation_jsonl, "causal_lm", tiny_llama, few_shot_n=5)
    assert len(data.raw["train"]) == 5
    with pytest.raises(PeftLabError, match=r"fewer examples of 'fresh' \(\d+\), 'rotten' \(\d+\); lower few_shot_k"):
        make_data(sentiment_csv, "classification", tiny_bert, few_shot_k=500).raw  # noqa: B018 (the property raises)
    with pytest.raises(PeftLabError, match="needs task: classification"):
        make_data(generation_jsonl, "causal_lm", tiny_llama, few_shot_k=4)
    with pytest.raises(PeftLabError, match="not both"):
        make_data(sentiment_csv, "classification", tiny_bert, few_shot_k=4, few_shot_n=4)


def test_few_shot_ids_written_to_run_dir(tmp_path, tiny_bert, sentiment_csv, capsys):
    from conftest import run_main, tiny_config

    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    code, _, err = run_main(["fit", "--config", cfg, "--data.few_shot_k", "4", "--test_after_fit", "false"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs/tiny/version_0"
    assert not (run_dir / "few_shot_ids.json").exists()  # the DataModule writes no files of its own
    data = json.loads((run_dir / "run.json").read_text())["data"]
    ids = data["few_shot_ids"]
    assert data["few_shot_k"] == 4 and data["few_shot_n"] is None and data["few_shot_seed"] == 0
    assert len(ids) == 8 and len(set(ids)) == 8 and all(0 <= i < 120 for i in ids)  # rows of the 120-row file
    assert data["few_shot_ids_note"].startswith("row positions in the source's train split")
    # the same draw as a DataModule built outside the CLI, and the eval splits are the unsampled ones
    assert ids == make_data(sentiment_csv, "classification", tiny_bert, few_shot_k=4).few_shot_ids
    assert data["split_sizes"] == {"train": 8, "test": 12, "validation": 12}
    assert data["label_names"] == ["fresh", "rotten"] and data["split_seed"] == 42 and data["task"] == "classification"


def test_group_by_length_cuts_padding_keeps_every_example(tiny_bert):
    import torch

    from peftlab.data.loading import EpochShuffleSampler

    def padding(data):
        data.setup()
        torch.manual_seed(0)
        pads = total = 0
        seen = []
        for batch in data.train_dataloader():
            pads += int((batch["attention_mask"] == 0).sum())
            total += batch["attention_mask"].numel()
            seen += batch["labels"].tolist()
        return pads / total, len(seen)

    plain = make_data("packaged:rotten_tomatoes", "classification", tiny_bert, max_train_samples=800, batch_size=16,
                      group_by_length=False)
    grouped = make_data("packaged:rotten_tomatoes", "classification", tiny_bert, max_train_samples=800,
                        batch_size=16, group_by_length=True)
    (pad_plain, n_plain), (pad_grouped, n_grouped) = padding(plain), padding(grouped)
    assert n_plain == n_grouped == 800
    assert pad_grouped < pad_plain / 4, (pad_grouped, pad_plain)

    lengths = [5, 1, 9, 3, 7, 2, 8, 6, 4, 0]
    sampler = EpochShuffleSampler(list(range(10)), lengths=lengths, batch_size=2, group_batches=2)
    torch.manual_seed(1)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    for start in (0, 4):  # sorted by length, longest first, within each group of 2 batches x 2
        group = [lengths[i] for i in order[start:start + 4]]
        assert group == sorted(group, reverse=True)
    sampler.replay(sampler.epoch_seed)  # resume replays the same grouped order
    assert list(sampler) == order


# ---------------------------------------------------------------------------------------------- pure transforms
def _dd(**splits):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in splits.items()})


def _labelled(labels, names, **extra):
    """A train split with an ``id`` column (0..n-1) and a ``labels`` ClassLabel column."""
    import datasets

    features = datasets.Features({"id": datasets.Value("int64"), "labels": datasets.ClassLabel(names=names),
                                  **{k: datasets.Value("int64") for k in extra}})
    return datasets.Dataset.from_dict({"id": list(range(len(labels))), "labels": labels, **extra}, features=features)


def test_encode_labels_strings_sorted_or_in_the_given_order():
    ds = _dd(train={"label": ["b", "a", "c", "a"]}, test={"label": ["c", "b"]})
    out, names = encode_labels(ds, "label")
    assert names == ["a", "b", "c"]
    assert out["train"]["labels"][:] == [1, 0, 2, 0] and out["test"]["labels"][:] == [2, 1]
    assert out["train"].features["labels"].names == ["a", "b", "c"]
    assert "labels" not in ds["train"].column_names  # the input is left as it was
    out, names = encode_labels(ds, "label", ["c", "b", "a"])
    assert names == ["c", "b", "a"] and out["train"]["labels"][:] == [1, 2, 0, 2]
    with pytest.raises(PeftLabError, match=r"labels \['c'\] in column 'label' are out of range for data.labels "
                                           r"\['a', 'b'\]; add them"):
        encode_labels(ds, "label", ["a", "b"])


def test_encode_labels_integers():
    out, names = encode_labels(_dd(train={"label": [2, 0, 1, 0]}), "label")
    assert names == ["0", "1", "2"] and out["train"]["labels"][:] == [2, 0, 1, 0]
    _, names = encode_labels(_dd(train={"label": [0, 3]}), "label")  # a gap: class 1 and 2 have no rows
    assert names == ["0", "1", "2", "3"]
    out, names = encode_labels(_dd(train={"label": [1, 0, 1]}), "label", ["neg", "pos"])
    assert names == ["neg", "pos"] and out["train"]["labels"][:] == [1, 0, 1]
    with pytest.raises(PeftLabError, match=r"labels \[2, 5\] in column 'label' are out of range for data.labels "
                                           r"\['neg', 'pos'\]"):
        encode_labels(_dd(train={"label": [0, 1, 2, 5]}), "label", ["neg", "pos"])
    with pytest.raises(PeftLabError, match=r"label column 'label' has negative labels \[-2, -1\]; labels must be "
                                           r"0..num_labels-1"):
        encode_labels(_dd(train={"label": [-2, -1, 0, 1]}), "label")


def test_encode_labels_empty_and_single():
    with pytest.raises(PeftLabError, match="data column 'label' has empty labels; fill or drop those rows"):
        encode_labels(_dd(train={"label": ["a", "b"]}, test={"label": ["a", None]}), "label")
    with pytest.raises(PeftLabError, match=r"classification needs at least 2 labels; column 'y' has only \['a'\]"):
        encode_labels(_dd(train={"y": ["a", "a", "a"]}), "y")


def test_split_dataset_sizes_stratification_and_seed():
    import datasets

    train = _labelled([0] * 70 + [1] * 30, ["neg", "pos"])
    ds = datasets.DatasetDict(train=train)
    out = split_dataset(ds, val_fraction=0.1, test_fraction=0.2, split_seed=42, stratify_by="labels")
    assert {k: len(v) for k, v in out.items()} == {"train": 70, "test": 20, "validation": 10}
    assert (sum(out["test"]["labels"]), sum(out["validation"]["labels"])) == (6, 3)  # 30% positive, like the source
    ids = [i for split in ("train", "validation", "test") for i in out[split]["id"]]
    assert sorted(ids) == list(range(100))  # disjoint and complete
    # train records each row's position in the source; the carved eval splits carry no ids
    assert out["train"][ROW_COLUMN][:] == out["train"]["id"][:]
    assert ROW_COLUMN not in out["test"].column_names and ROW_COLUMN not in out["validation"].column_names
    assert ROW_COLUMN not in ds["train"].column_names  # the input is left as it was
    # the draw itself is fixed by the seed (published splits depend on it)
    assert out["test"]["id"][:5] == [66, 43, 49, 99, 45] and out["validation"]["id"][:5] == [23, 37, 94, 52, 64]
    again = split_dataset(ds, val_fraction=0.1, test_fraction=0.2, split_seed=42, stratify_by="labels")
    assert again["test"]["id"][:] == out["test"]["id"][:]
    other = split_dataset(ds, val_fraction=0.1, test_fraction=0.2, split_seed=7, stratify_by="labels")
    assert other["test"]["id"][:5] == [33, 43, 52, 30, 91]


def test_split_dataset_keeps_given_splits_and_caps():
    import datasets

    train = _labelled([0] * 70 + [1] * 30, ["neg", "pos"])
    given = _labelled([0, 1, 0, 1, 0], ["neg", "pos"])
    out = split_dataset(datasets.DatasetDict(train=train, validation=given), val_fraction=0.1, test_fraction=0.2,
                        split_seed=42, stratify_by="labels")
    assert {k: len(v) for k, v in out.items()} == {"train": 80, "validation": 5, "test": 20}
    assert out["validation"]["id"][:] == [0, 1, 2, 3, 4]
    capped = split_dataset(datasets.DatasetDict(train=train), val_fraction=0.1, test_fraction=0.2, split_seed=42,
                           stratify_by="labels", max_train_samples=5, max_eval_samples=3)
    assert {k: len(v) for k, v in capped.items()} == {"train": 5, "test": 3, "validation": 3}
    assert capped["train"]["id"][:] == [10, 48, 74, 41, 5]  # shuffled by split_seed, then the first 5
    assert capped["test"]["id"][:] == [66, 43, 49] and capped["validation"]["id"][:] == [23, 37, 94]  # in order
    # no labels to stratify by (generation)
    plain = split_dataset(_dd(train={"prompt": [f"p{i}" for i in range(10)]}), val_fraction=0.1, test_fraction=0.1,
                          split_seed=0)
    assert {k: len(v) for k, v in plain.items()} == {"train": 8, "test": 1, "validation": 1}


def test_split_dataset_falls_back_to_a_plain_split_when_a_class_is_too_small():
    import datasets

    train = _labelled([0] * 29 + [1], ["a", "b"])  # one 'b': cannot be stratified
    with pytest.raises(ValueError):
        train.train_test_split(test_size=3, seed=42, stratify_by_column="labels")
    out = split_dataset(datasets.DatasetDict(train=train), val_fraction=0.1, test_fraction=0.1, split_seed=42,
                        stratify_by="labels")
    assert {k: len(v) for k, v in out.items()} == {"train": 24, "test": 3, "validation": 3}
    assert out["test"]["id"][:] == train.train_test_split(test_size=3, seed=42)["test"]["id"][:]
    with pytest.raises(PeftLabError, match="data source has only 2 training rows; cannot split off test"):
        split_dataset(_dd(train={"x": [1, 2]}), val_fraction=0.1, test_fraction=0.1, split_seed=0)


def test_few_shot_sample_k_per_class():
    train = _labelled([0] * 10 + [1] * 6 + [2] * 4, ["a", "b", "c"], **{ROW_COLUMN: [100 + i for i in range(20)]})
    sub, ids = few_shot_sample(train, k=3, seed=0)
    assert sub["labels"][:] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # exactly k of each, in their order in train
    assert ids == [100, 106, 109, 112, 113, 114, 117, 118, 119] == sub[ROW_COLUMN][:]  # the source row ids
    assert few_shot_sample(train, k=3, seed=0)[1] == ids
    assert few_shot_sample(train, k=3, seed=1)[1] == [101, 102, 104, 110, 113, 114, 117, 118, 119]
    assert len(train) == 20  # the input is left as it was
    with pytest.raises(PeftLabError, match=r"data.few_shot_k=5 but the training split has fewer examples of "
                                           r"'c' \(4\); lower few_shot_k"):
        few_shot_sample(train, k=5, seed=0)
    # a class with no rows at all is short too (named from label_names, by default the ClassLabel's names)
    missing = _labelled([0] * 5 + [1] * 5, ["a", "b", "d"])
    with pytest.raises(PeftLabError, match=r"fewer examples of 'd' \(0\); lower few_shot_k"):
        few_shot_sample(missing, k=2)


def test_few_shot_sample_n_in_total():
    train = _labelled([0] * 10 + [1] * 6 + [2] * 4, ["a", "b", "c"], **{ROW_COLUMN: [100 + i for i in range(20)]})
    sub, ids = few_shot_sample(train, n=5, seed=0)
    assert ids == [101, 108, 112, 113, 115] and len(sub) == 5
    assert few_shot_sample(train, n=5, seed=0)[1] == ids and few_shot_sample(train, n=5, seed=1)[1] != ids
    # without a _row column the ids are positions in the given split
    assert few_shot_sample(train.remove_columns(ROW_COLUMN), n=5, seed=0)[1] == [1, 8, 12, 13, 15]
    with pytest.raises(PeftLabError, match="data.few_shot_n=21 but the training split has only 20 examples"):
        few_shot_sample(train, n=21)
    with pytest.raises(ValueError, match="exactly one of k and n"):
        few_shot_sample(train, k=2, n=2)


# ---------------------------------------------------------------------------------------------- explicit state
def test_datamodule_state_is_created_only_by_load(sentiment_csv, tiny_bert):
    import dataclasses

    data = make_data(sentiment_csv, "classification", tiny_bert)
    assert data._loaded is None and data.datasets == {}
    before = dict(vars(data))
    assert data.few_shot_ids is None and data._loaded is None  # not few-shot: nothing to load for that
    assert data.num_labels == 2  # works right after construction (the CLI reads it then) ...
    after = dict(vars(data))
    # ... and its only trace is the one explicit result
    assert set(after) == set(before) and [k for k in after if after[k] is not before[k]] == ["_loaded"]
    loaded = data.load()
    assert data.load() is loaded and data.raw is loaded.splits and data.label_names == ["fresh", "rotten"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.label_names = ("x", "y")
    # every property reads the same result: no second load
    data.label_names, data.raw, data.num_labels  # noqa: B018
    assert data._loaded is loaded and set(vars(data)) == set(before)


def test_datamodule_run_record(sentiment_csv, tiny_bert, generation_jsonl, tiny_llama):
    few = make_data(sentiment_csv, "classification", tiny_bert, few_shot_k=3, few_shot_seed=5)
    record = json.loads(json.dumps(few.run_record()))  # JSON as it is
    assert record["few_shot_ids"] == few.few_shot_ids and len(record["few_shot_ids"]) == 6
    assert few.raw["train"][ROW_COLUMN][:] == record["few_shot_ids"]
    assert (record["few_shot_k"], record["few_shot_n"], record["few_shot_seed"]) == (3, None, 5)
    assert record["split_sizes"] == {"train": 6, "test": 12, "validation": 12}
    assert record["source"] == sentiment_csv and record["label_names"] == ["fresh", "rotten"]
    plain = make_data(generation_jsonl, "causal_lm", tiny_llama, max_train_samples=20).run_record()
    assert plain["split_sizes"] == {"train": 20, "test": 12, "validation": 12} and plain["label_names"] is None
    assert "few_shot_ids" not in plain and plain["task"] == "causal_lm" and plain["max_train_samples"] == 20


def test_run_record_has_the_data_only_with_a_datamodule(sentiment_csv, tiny_bert):
    from types import SimpleNamespace

    import lightning as L

    from peftlab.runinfo import data_record

    data = make_data(sentiment_csv, "classification", tiny_bert)
    assert data_record(SimpleNamespace(trainer=SimpleNamespace(datamodule=data))) == data.run_record()
    assert data_record(SimpleNamespace(trainer=SimpleNamespace(datamodule=None))) is None
    assert data_record(L.LightningModule()) is None  # not attached to a trainer
