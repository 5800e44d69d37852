"""Decision support: `peftlab params`, `peftlab estimate-memory`, `peftlab recommend`.

Counts are checked against formulas written out here from the architectures (not from the code under
test); the shipped backbone shapes also against their published parameter counts.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_analysis.py.
"""

from __future__ import annotations

import json

import peft  # noqa: F401 - imports bitsandbytes, whose import-time notice must not land in a captured test
import pytest

from conftest import ROOT, lora_params, run_main
from peftlab.analysis import memory

CONSOLE = """import sys
from peftlab.cli import main
try:
    main()
finally:
    import gc
    print("BITSANDBYTES", "bitsandbytes" in sys.modules, "FROZEN", gc.get_freeze_count() > 0, file=sys.stderr)
"""


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_console_meta_commands_skip_bitsandbytes_with_the_same_counts(method, tmp_path, capsys):
    """Run from the console, `peftlab params` builds without importing bitsandbytes (0.8 s of its ~5 s), QLoRA
    included, and prints exactly what the in-process command (bitsandbytes imported, as in training) prints; it
    leaves its objects out of the interpreter's last garbage collection (another ~1 s)."""
    import subprocess
    import sys

    args = ["params", "--config", str(ROOT / "configs/causal_lm_lora.yaml"), "--config",
            str(ROOT / f"configs/methods/{method}.yaml"), "--backbone", "llama-2-7b",
            "--model.init_args.target_modules", "[q_proj,v_proj]", "--json"]
    proc = subprocess.run([sys.executable, "-c", CONSOLE, *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BITSANDBYTES False FROZEN True" in proc.stderr
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    in_process = json.loads(out.strip().splitlines()[-1])
    import gc

    assert sys.modules.get("bitsandbytes") is not None  # in-process (the module imported peft): untouched
    assert gc.get_freeze_count() == 0  # and the caller's objects stay collectable
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == in_process
    assert in_process["trainable"] == lora_params([(4096, 4096)] * 64, 8)


@pytest.mark.slow
def test_estimate_matches_measured_cpu_peak():
    """experiments/memory/run.py's first case (~40 s): LoRA on all-MiniLM-L6-v2, batch 32 x 128 tokens."""
    import os
    import subprocess
    import sys

    script = ROOT / "experiments" / "memory" / "run.py"
    case = {"method": "lora", "backbone": "packaged:all-MiniLM-L6-v2", "task": "classification", "batch": 32,
            "seq": 128, "attention": "eager", "checkpointing": False}
    out = subprocess.run([sys.executable, str(script), "--one", json.dumps(case)], capture_output=True, text=True,
                         check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, cwd=ROOT)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["total"]
    est = memory.estimate(memory.preset_spec("lora", case["backbone"], "classification"), batch_size=32, seq_len=128,
                          precision="fp32", attention="eager", num_labels=2).total
    assert abs(est - measured) / measured < 0.10
