"""How much of the fp32 checkpoint stays memory-mapped after building QLoRA on SmolLM2-135M, with and
without ``release_checkpoint_mapping`` (each in a fresh process):

    python benchmarks/qlora_mapping.py
"""

from __future__ import annotations

import re
import subprocess
import sys

PROBE = """
import gc, re, sys, psutil
import peftlab.methods.qlora as q
if sys.argv[1] == "without":
    q.release_checkpoint_mapping = lambda model: None
model = q.QLoRA(backbone="packaged:SmolLM2-135M-Instruct", task="causal_lm", r=8,
                target_modules=["q_proj", "v_proj"]).build()  # kept alive while memory is read
gc.collect()
mapped, current = 0, ""
for line in open("/proc/self/smaps"):
    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
        current = line.split()[-1] if len(line.split()) >= 6 else ""
    elif line.startswith("Rss:") and current.endswith(".safetensors"):
        mapped += int(line.split()[1])
print(f"{sys.argv[1]}: resident {psutil.Process().memory_info().rss / 2**20:.0f} MiB, "
      f"checkpoint file mapped {mapped / 1024:.0f} MiB")
"""


def main() -> int:
    for mode in ("without", "with"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
        print(next(line for line in out.splitlines() if re.match(r"^(with|without):", line)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
