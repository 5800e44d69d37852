"""Python API: load a finished run for inference in one call.

    from peftlab.api import load_run
    run = load_run("runs/quickstart/version_0")          # or .../adapter/best, or any exported adapter
    run.predict(["A moving, beautifully shot film.", "Dull and far too long."])
    # [{'label': 'fresh', 'probs': {'rotten': 0.08, 'fresh': 0.92}}, ...]
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftlab.adapters import load_weights, read_meta
from peftlab.backbones import is_decoder_only
from peftlab.errors import PeftLabError


def _adapter_dir(path: Path) -> Path:
    if (path / "adapter_config.json").is_file():
        return path
    for name in ("best", "last"):
        if (path / "adapter" / name / "adapter_config.json").is_file():
            return path / "adapter" / name
    raise PeftLabError(f"{path} is neither an exported adapter nor a run directory with adapter/best or adapter/last")


def build_module(meta: dict, backbone: str | None = None):
    """Rebuild the (untrained) method module described by an adapter's ``peftlab_meta.json``."""
    init_args = dict(meta["init_args"])
    init_args["task"] = meta["task"]
    init_args["num_labels"] = meta.get("num_labels")
    if backbone:
        init_args["backbone"] = backbone
    from peftlab.methods.registry import import_method

    cls = import_method(meta["method"], "the adapter's method")
    try:
        return cls(**init_args).build()
    except TypeError as err:  # a field the method does not take: a hand-edited or foreign peftlab_meta.json
        raise PeftLabError(f"peftlab_meta.json does not fit {cls.__name__}: {err}; export the adapter again") from err
    except PeftLabError as err:
        if backbone and backbone != meta.get("backbone"):
            raise PeftLabError(f"the adapter was trained on {meta.get('backbone')!r} and does not fit backbone "
                               f"{backbone!r}: {err}") from err
        raise


class Run:
    """A trained method ready for inference: ``module`` (a PeftModule in eval mode) and its label names."""

    def __init__(self, module, label_names: list[str] | None, directory: Path, max_length: int = 512):
        self.module = module.eval()
        self.label_names = label_names
        self.directory = directory
        self.max_length = max_length

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 32, max_new_tokens: int | None = None) -> list[dict]:
        """Class and probabilities (classification) or generated text (causal LM / seq2seq) for each text."""
        module, tok = self.module, self.module.tokenizer
        out: list[dict] = []
        # decoder-only models read the last position (classification) or continue it (generation)
        pad_left = module.task == "causal_lm" or (module.task == "classification"
                                                  and is_decoder_only(module.hparams.backbone))
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            tok.padding_side = "left" if pad_left else "right"
            batch = tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            tok.padding_side = "right"
            batch = {k: v.to(module.device) for k, v in batch.items()}
            if module.task == "classification":
                probs = module(**batch).logits.float().softmax(-1).cpu()
                names = self.label_names or [str(i) for i in range(probs.shape[1])]
                out += [{"label": names[int(p.argmax())], "probs": {n: float(q) for n, q in zip(names, p)}}
                        for p in probs]
            else:
                result = module.predict_step(batch, 0) if max_new_tokens is None else \
                    _generate(module, batch, max_new_tokens)
                out += [{"generated": t} for t in result["text"]]
        return out


def _generate(module, batch, max_new_tokens):
    saved = module.hparams.max_new_tokens
    module.hparams.max_new_tokens = max_new_tokens
    try:
        return module.predict_step(batch, 0)
    finally:
        module.hparams.max_new_tokens = saved


def load_run(path: str, backbone: str | None = None) -> Run:
    """Load a run directory or an exported adapter directory for inference.

    Args:
        path: ``runs/<name>/version_N`` (uses ``adapter/best``, else ``adapter/last``) or an adapter directory.
        backbone: use this backbone instead of the recorded one (e.g. a local copy of a hub model).
    """
    directory = _adapter_dir(Path(path))
    meta = read_meta(directory)
    module = build_module(meta, backbone)
    load_weights(module, directory)
    return Run(module, meta.get("label_names"), directory)
