"""Several processes through Lightning's strategies (issue #10): DDP on 2 CPU processes (gloo) trains the
same adapter as 1 process with the same global batch, syncs metrics, and only rank 0 writes; the FSDP and
DeepSpeed configs load and the pieces peftlab adds for them work.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_distributed.py."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import PEFTLAB, ROOT, write_config


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory, tiny_bert):
    """The tiny BERT with dropout off: 1 and 2 processes then see the same function, batch for batch."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("bert_no_dropout")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    return str(path)


def _run(tmp_path, backbone, source, name, devices, batch_size):
    cfg = write_config(tmp_path, backbone, source, runs=name, name=f"{name}.yaml",
                       model={"dropout": 0.0, "learning_rate": 0.02},
                       data={"batch_size": batch_size, "eval_batch_size": 4, "shuffle": False},
                       trainer={"max_steps": 5, "limit_val_batches": None, "limit_test_batches": None,
                                "val_check_interval": 5, "devices": devices,
                                **({"strategy": "ddp"} if devices > 1 else {})})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([PEFTLAB, "fit", "--config", cfg], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _metrics(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and "/" in k}


def test_ddp_two_processes_matches_one_process(tmp_path, bert_without_dropout, sentiment_csv):
    _run(tmp_path, bert_without_dropout, sentiment_csv, "one", devices=1, batch_size=16)
    two = _run(tmp_path, bert_without_dropout, sentiment_csv, "two", devices=2, batch_size=8)
    log = two.stderr + two.stdout
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log

    # only rank 0 wrote: one run directory, one adapter, one summary
    runs = {name: sorted((tmp_path / name / "r").glob("version_*")) for name in ("one", "two")}
    assert len(runs["two"]) == 1, runs["two"]
    assert (two.stdout + two.stderr).count("[peftlab] fit summary") == 1
    a = load_file(str(runs["one"][0] / "adapter/last/adapter_model.safetensors"))
    b = load_file(str(runs["two"][0] / "adapter/last/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for name in a:  # same global batch of 16 per step: same gradients up to summation order
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(a[name], torch.zeros_like(a[name])))
    assert moved > 0

    # validation and test metrics are over the whole split on both (synced across the 2 ranks)
    m1, m2 = _metrics(runs["one"][0]), _metrics(runs["two"][0])
    for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow  # a benchmark smoke run, like the others in test_benchmarks.py
def test_scaling_benchmark_smoke(tmp_path):
    """benchmarks/ddp_scaling.py in its smoke mode (a few steps of 1 and 2 processes) keeps working."""
    import json
    import sys

    out = tmp_path / "scaling.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ddp_scaling.py"), "--smoke", "--output",
                             str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert set(summary["results"]) == {"1", "2"} and summary["results"]["1"]["ratio"] == 1.0
    assert all(r["samples_per_s"] > 0 for r in summary["results"].values())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_train_what_one_node_of_two_processes_trains(tmp_path, bert_without_dropout,
                                                                            sentiment_csv):
    """Two "nodes" on this machine, one process each, through Lightning's environment variables (MASTER_ADDR,
    MASTER_PORT, NODE_RANK, LOCAL_RANK; num_nodes 2), each in its own working directory: the adapter of 1 node x 2
    processes, and only node 0 writes."""
    _run(tmp_path, bert_without_dropout, sentiment_csv, "one_node", devices=2, batch_size=8)
    cfg = write_config(tmp_path, bert_without_dropout, sentiment_csv, runs="nodes", name="nodes.yaml",
                       model={"dropout": 0.0, "learning_rate": 0.02},
                       data={"batch_size": 8, "eval_batch_size": 4, "shuffle": False},
                       trainer={"max_steps": 5, "limit_val_batches": None, "limit_test_batches": None,
                                "val_check_interval": 5, "devices": 1, "num_nodes": 2, "strategy": "ddp"})
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "NODE_RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([PEFTLAB, "fit", "--config", cfg], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "Starting with 2 processes" in outputs[0] and "distributed_backend=gloo" in outputs[0]
    # only node 0 wrote: one run directory (the config's runs path is absolute), one summary, nothing in node 1's
    assert "".join(outputs).count("[peftlab] fit summary") == 1 and not any((tmp_path / "node1").iterdir())
    (one,) = sorted((tmp_path / "one_node" / "r").glob("version_*"))
    (nodes,) = sorted((tmp_path / "nodes" / "r").glob("version_*"))
    a = load_file(str(one / "adapter/last/adapter_model.safetensors"))
    b = load_file(str(nodes / "adapter/last/adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:  # the same 2 ranks, the same batches: the same adapter
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_the_slurm_example_parses_and_its_command_is_a_valid_run(tmp_path):
    """docs/examples/slurm.sbatch, dry-run: a fake srun records the command the job would start on every task,
    whose --print_config shows the nodes x GPUs and the strategy that the #SBATCH lines ask for."""
    import re

    script = ROOT / "docs" / "examples" / "slurm.sbatch"
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script.read_text(), re.M))
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == directives["gpus-per-node"] == "4"
    assert "requeue" in directives and directives["signal"].startswith("SIGUSR1@")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args"),
           "SLURM_JOB_NUM_NODES": directives["nodes"], "SLURM_NTASKS_PER_NODE": directives["ntasks-per-node"]}
    result = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:2] == ["peftlab", "fit"]
    printed = subprocess.run([PEFTLAB, *args[1:], "--print_config"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    config = yaml.safe_load(printed.stdout)
    assert config["trainer"]["num_nodes"] == 2 and str(config["trainer"]["devices"]) == "4"
    assert config["trainer"]["strategy"]["class_path"] == "peftlab.strategies.FSDP2Strategy"
    assert config["trainer"]["strategy"]["init_args"]["sharded_start"] is True
