"""``peftlab compare --workers N``: N worker processes of the same command on the same storage."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

from peftlab.compare.study import Study
from peftlab.compare.worker import WORKER_ENV
from peftlab.errors import PeftLabError


def run_workers(study: Study, storage_url: str, n: int, *, smoke: bool, latency: bool, say) -> None:
    """Start ``n`` worker processes of the same command on the same storage and wait for them; their output is
    shown through ``say`` (:func:`peftlab.runinfo.logger`'s) with a ``[wK]`` prefix."""
    cmd = [sys.executable, "-m", "peftlab", "compare", "--config", str(study.path), "--study_dir",
           str(study.study_dir), "--storage", storage_url, "--workers", "1", "--no-report"]
    if smoke:
        cmd.append("--smoke")
    if latency:
        cmd.append("--latency")
    procs = []
    for i in range(n):
        env = dict(os.environ, **{WORKER_ENV: str(i + 1)}, PYTHONUNBUFFERED="1")
        # share the cores instead of every worker's torch taking all of them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    tails: list[list[str]] = [[] for _ in procs]

    def pump(i: int, proc) -> None:
        for line in proc.stdout:
            tails[i] = (tails[i] + [line.rstrip()])[-20:]
            say(line.rstrip(), extra={"verbatim": f"[w{i + 1}] "})

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
        raise
    for t in threads:
        t.join(timeout=5)
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        i, code = failed[0]
        last = next((line for line in reversed(tails[i]) if line.strip()), "")
        raise PeftLabError(f"worker {i + 1} of {n} exited with status {code}: {last}")
