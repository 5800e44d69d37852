"""Crash-safe Lightning checkpoints.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction whose temporary file lives in the
system temp directory; when that is another filesystem than the run directory (node-local ``/tmp``, runs
on NFS or Lustre) the final "move" is a copy, so a crash or a full disk in the middle of it leaves a
truncated checkpoint under the real name, and nothing is fsynced. :class:`AtomicCheckpointIO` writes a
temporary file next to the target, fsyncs it, renames it over the target and fsyncs the directory: after
a crash the target is either the previous good checkpoint or the new complete one. It also reads every
checkpoint with ``torch.load(weights_only=True)``, so a checkpoint file cannot run code.

``PeftModule`` installs it when the strategy uses Lightning's default IO (see ``PeftModule.setup``); a
custom ``CheckpointIO`` plugin given by the user is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from peftlab.errors import PeftLabError


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full_error(path: str, err: OSError) -> PeftLabError:
    return PeftLabError(
        f"no space left on the device while writing {path}; the previous checkpoints and adapters are intact. "
        "Free disk space (or move the run directory to another disk) and resume with --ckpt_path last"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with a same-directory temp file + fsync + rename, and weights-only loading."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = path.removeprefix("file://")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise disk_full_error(path, err) from err
            raise
        fsync_directory(directory)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        if _is_local(str(path)) and not os.path.isfile(str(path).removeprefix("file://")):
            raise PeftLabError(f"--ckpt_path {path} does not exist; give a .ckpt file, or 'last' / 'best'")
        with checkpoint_errors(path):  # never unpickle arbitrary objects from a checkpoint file
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def checkpoint_errors(path):
    """Turn what torch.load raises on a bad file into one clear :class:`PeftLabError`."""
    try:
        yield
    except PeftLabError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError/EOFError on bad files
        if "GLOBAL" in str(err):  # "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module is blocked"
            raise PeftLabError(
                f"{path} holds Python objects that weights-only loading refuses; peftlab never unpickles "
                "arbitrary objects from a checkpoint. Use a checkpoint written by peftlab"
            ) from err
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        raise PeftLabError(f"{path} is corrupt or not a Lightning checkpoint ({type(err).__name__}: {first}); "
                           "use another checkpoint") from err


def install(trainer) -> None:
    """Use :class:`AtomicCheckpointIO` on ``trainer`` unless the user configured their own checkpoint IO."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and type(getattr(strategy, "_checkpoint_io", None) or TorchCheckpointIO()) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
