"""One ``peftlab fit`` run inside the ``peftlab compare`` process, isolated: its output goes to its log, and the
process state a run may change (matmul precision, environment, warning filters, Ctrl-C handler) is restored after it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from peftlab.compare.study import cli_args


@contextlib.contextmanager
def isolated(log_path: Path):
    """Run a fit with its output in ``log_path`` and the process state it may change restored afterwards."""
    import torch

    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    matmul = torch.get_float32_matmul_precision()
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    argv = sys.argv
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    handlers = list({id(h): h for name in ("lightning.pytorch", "lightning.fabric", "lightning")
                     for h in logging.getLogger(name).handlers
                     if type(h) is logging.StreamHandler}.values())  # Lightning's console handlers
    with open(log_path, "a", encoding="utf-8") as log, warnings.catch_warnings():
        streams = [h.setStream(log) for h in handlers]
        sys.argv = ["peftlab"]
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield log
        finally:
            for h, stream in zip(handlers, streams):
                if stream is not None:
                    h.setStream(stream)
            sys.argv = argv
            if sigint is not None:  # Lightning ignores Ctrl-C from the first one it catches on
                signal.signal(signal.SIGINT, sigint)
            os.environ.clear()
            os.environ.update(env)
            torch.set_float32_matmul_precision(matmul)
            torch.set_default_dtype(dtype)
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_fit(run: dict[str, Any], callbacks: list, log_path: Path) -> None:
    """``peftlab fit`` with the arguments ``run`` (:func:`~peftlab.compare.study.run_arguments`) in this process,
    with ``callbacks`` added to the trainer's; output goes to ``log_path``. Raises what the run raises (a
    PeftLabError for the user's errors, as the CLI would print)."""
    from peftlab.cli import run_cli

    args = cli_args(run)
    with isolated(log_path) as log:
        print(f"$ peftlab fit {' '.join(args)}", file=log, flush=True)
        cli = run_cli(["fit", *args], callbacks=callbacks)
        interrupted = cli.trainer.interrupted
        del cli
    if interrupted:  # Lightning turns Ctrl-C into a quiet stop; for the study it is an unfinished run
        raise KeyboardInterrupt("the run was interrupted")
