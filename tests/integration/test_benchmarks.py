"""The benchmarks (benchmarks/run.py) in smoke mode, so they keep working. Benchmarks are not tests: nothing
here asserts a time or a ratio, only that every benchmark produced its entries with sane numbers and that
the report renders (into a temporary file; docs/benchmarks.md comes from the default run)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import ROOT


def _numbers(value):
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


@pytest.mark.slow  # minutes on 2 cores: `bash scripts/test.sh -m slow`
def test_benchmarks_smoke(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import run
        from benchmarks.report import render

        results_file, docs_file = tmp_path / "results.json", tmp_path / "benchmarks.md"
        docs = ROOT / "docs" / "benchmarks.md"
        docs_before = docs.read_text() if docs.is_file() else None
        run.main(["--smoke", "--results", str(results_file), "--docs", str(docs_file)])
    finally:
        sys.path.remove(str(ROOT))
    results = json.loads(results_file.read_text())
    assert (docs.read_text() if docs.is_file() else None) == docs_before  # the committed page is untouched

    assert set(run.NAMES) <= set(results)
    assert results["meta"]["smoke"] is True
    for setting in results["throughput"].values():
        assert set(setting["variants"]) == {"peftlab", "hand", "hf_trainer"}
        assert set(setting["ratios"]) == {"peftlab/hand", "peftlab/hf_trainer", "peftlab/hand per step",
                                          "peftlab/hf_trainer per step"}
        assert setting["same_batches"]  # every loop trained on the very same tokens
        assert {"data", "forward", "backward", "optimizer"} <= set(setting["variants"]["peftlab"]["phases_ms"])
    assert set(results["methods"]) == {"prompt_tuning", "prefix_tuning", "qlora"}
    for padding in results["padding"].values():
        for kind in ("default", "length_grouped", "sorted"):
            assert 0 <= padding[kind]["pad_fraction"] < 1
    for row in results["inference"].values():
        assert {"base", "lora_merged", "lora_unmerged", "prefix", "prompt"} == set(row["ratio"])
    assert {"lora_fp32", "qlora_nf4_dq"} <= set(results["memory"])
    assert results["memory"]["qlora_nf4_dq"]["backbone_bytes"] < results["memory"]["lora_fp32"]["backbone_bytes"]
    assert results["startup"]["help"]["seconds"]["median"] > 0 and results["startup"]["fit"]
    assert results["startup"]["params_70b"]["seconds"]["median"] > 0
    multi = results["multi_adapter"]
    assert set(multi["mixed_lora"]["ratio"]) == {"mixed/one_adapter", "mixed/loop"}
    assert set(multi["mixed_lora"]["routing"].values()) == {"per row"}
    assert set(multi["mixed_prompt"]["routing"].values()) == {"grouped"}
    assert multi["server"]["requests_per_s"]["16_clients"]["median"] > 0
    assert results["multitask_fit"]["ratio"]["separate/multitask"]["median"] > 0

    for name in run.NAMES:
        numbers = list(_numbers(results[name]))
        assert numbers, name
        assert all(math.isfinite(x) for x in numbers), name
    for key in ("samples_per_s", "tokens_per_s", "step_ms"):
        for setting in [*results["throughput"].values(), *results["methods"].values()]:
            assert all(v[key]["median"] > 0 for v in setting["variants"].values())

    text = docs_file.read_text()
    assert text == render(results)
    for heading in ("## Targets", "## 1. Training throughput", "## 2. Step-time breakdown", "## 3. Padding",
                    "## 4. Inference", "## 5. Memory", "## 6. Start-up", "## 8. Many adapters on one backbone"):
        assert heading in text


@pytest.mark.slow  # minutes on 2 cores: `bash scripts/test.sh -m slow`
def test_qlora_mapping_probe_shows_the_checkpoint_released():
    """benchmarks/qlora_mapping.py on the packaged SmolLM2: without the fix the fp32 checkpoint stays mapped,
    with it nothing of the file is resident (a memory fact, not a timing)."""
    import re
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qlora_mapping.py")], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    mapped = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(with|without): .*mapped (\d+) MiB", out, re.M)}
    assert mapped["with"] == 0 and mapped["without"] > 100, out


@pytest.mark.slow  # minutes on 2 cores: `bash scripts/test.sh -m slow`
def test_defaults_and_packing_benchmarks_smoke():
    """benchmarks/defaults.py (#21's ratios) in smoke mode: every variant ran and produced sane numbers (the
    torch.compile part compiles for minutes and is left to the full run)."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import defaults

        record = defaults.main(["--smoke", "--only", "defaults", "packing"])
    finally:
        sys.path.remove(str(ROOT))
    assert set(record["defaults"]["ratios"]) == {"peftlab/hand_random", "peftlab/hf_trainer_default",
                                                 "peftlab/hf_trainer_grouped"}
    assert all(r["median"] > 0 for r in record["defaults"]["ratios"].values())
    assert record["packing"]["packed_examples_per_row"] > 1  # several plot summaries per row
    assert record["packing"]["ratio_target_tokens_per_s"]["median"] > 0
    assert all(math.isfinite(x) for x in _numbers(record["packing"]))
    from benchmarks.report import _defaults, defaults_targets

    # docs/benchmarks.md's section 7 and its goal rows come from this record
    assert [row[0].split(",")[0] for row in defaults_targets(record)] == ["quickstart"] * 3 + ["SmolLM2 causal LM"]
    text = "\n".join(_defaults(record))
    assert "## 7. Defaults" in text and record["command"] in text and "examples per packed row" in text


@pytest.mark.slow  # loads SmolLM2 and runs lm-eval twice (~70 s on a shared CPU)
def test_eval_lm_benchmark_smoke(tmp_path):
    """benchmarks/eval_lm.py (#31: peftlab's lm-eval LM against HFLM on one merged LoRA) in smoke mode: both LMs
    ran both tasks, their log-likelihoods are identical, and section 9 with its goal rows renders from the record."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import eval_lm

        record = eval_lm.main(["--smoke", "--out", str(tmp_path / "eval_lm.json")])
    finally:
        sys.path.remove(str(ROOT))
    assert set(record["ratios"]) == {"peftlab/hflm loglikelihood", "peftlab/hflm generate_until"}
    assert all(r["median"] > 0 for r in record["ratios"].values())
    assert record["same_metrics"] and record["requests_compared"] == 16  # 8 reviews x 2 choices
    assert record["max_loglikelihood_difference"] < 1e-4
    from benchmarks.report import _eval_lm, eval_lm_targets

    assert len(eval_lm_targets(record)) == 2
    text = "\n".join(_eval_lm(record))
    assert "## 9. lm-eval" in text and record["command"] in text and "Scores: equal" in text


@pytest.mark.slow
def test_group_by_length_quality_and_gpu_check_scripts_run(tmp_path):
    """The quality check of length grouping and the GPU check, in their smoke modes (CPU, tiny shapes)."""
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/group_by_length_quality.py"), "--smoke",
                             "--output", str(tmp_path / "gbl.json")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "gbl_smoke.json").read_text())
    assert {r["group_by_length"] for r in record["runs"]} == {True, False}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--smoke", "--out",
                             str(tmp_path / "gpu"), "--only", "lora", "qlora", "fsdp2", "throughput"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "gpu/gpu_check.json").read_text())
    assert [s["method"] for s in record["steps"]] == ["lora", "qlora", "fsdp2"]
    assert all(s["passed"] for s in record["steps"]), record["steps"]
    assert record["throughput"]["ratio_median"] > 0


@pytest.mark.slow  # loads SmolLM2 five times and trains 3 steps each (~5 min on a shared 2-core CPU)
def test_chat_sft_benchmark_smoke(tmp_path):
    """benchmarks/chat_sft.py (#30 item 8: peftlab's chat SFT against TRL's SFTTrainer) in smoke mode: TRL, given
    SmolLM2's template with generation markers, tokenizes every conversation to exactly peftlab's tokens and
    assistant targets; all three runs trained and their ratios and losses are finite."""
    pytest.importorskip("trl", reason="trl is a benchmark-only dependency (pip install -e '.[bench]')")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import chat_sft

        record = chat_sft.main(["--smoke", "--out", str(tmp_path / "chat_sft.json")])
    finally:
        sys.path.remove(str(ROOT))
    check = record["tokenization"]
    assert check["compared"] + check["too_long"] == record["setting"]["train_conversations"] > check["too_long"]
    assert check["same_input_ids"] == check["same_targets"] == check["compared"]
    assert set(record["ratios"]) == {"peftlab_packed/trl_packed", "peftlab_packed/trl_default"}
    assert all(r["median"] > 0 for r in record["ratios"].values())
    assert all(math.isfinite(x) for x in _numbers(record["val_loss_per_target_token"]))
    # trained: every run's validation loss moved off the untrained model's
    assert all(v["median"] != record["val_loss_untrained"] for v in record["val_loss_per_target_token"].values())
