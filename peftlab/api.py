"""Python API: load a finished run for inference in one call.

    from peftlab.api import load_run
    run = load_run("runs/quickstart/version_0")          # or .../adapter/best, or any exported adapter
    run.predict(["A moving, beautifully shot film.", "Dull and far too long."])
    # [{'label': 'fresh', 'probs': {'rotten': 0.08, 'fresh': 0.92}}, ...]
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftlab.adapters import adapter_directory, load_weights, read_meta
from peftlab.backbones import is_decoder_only
from peftlab.errors import PeftLabError


def build_module(meta: dict, backbone: str | None = None):
    """Rebuild the (untrained) method module described by an adapter's ``peftlab_meta.json``."""
    from peftlab.methods.registry import construct_from_meta

    module = construct_from_meta(meta, backbone)
    try:
        return module.build()
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


def load_adapters(adapters: dict, backbone: str | None = None, device: str | None = None):
    """Load several trained runs or exported adapters onto **one** shared backbone: an
    :class:`~peftlab.adapter_set.AdapterSet` (``predict(texts, adapter="name")``, ``switch``, ``add``, ``remove``).

    Args:
        adapters: ``{name: run directory, adapter directory or a loaded Run}``.
        backbone: use this backbone instead of the recorded one (as in :func:`load_run`).
        device: where the backbone and adapters live (default: where loading put them, usually the CPU).
    """
    from peftlab.adapter_set import AdapterSet

    return AdapterSet(adapters, backbone=backbone, device=device, make_run=run_of)


def run_of(module, meta: dict, directory: Path | None) -> Run:
    """The :class:`Run` of a built, loaded ``module`` and its adapter's ``peftlab_meta.json`` (``{}`` for none)."""
    return Run(module, meta.get("label_names"), directory)


def load_run(path: str, backbone: str | None = None) -> Run:
    """Load a run directory or an exported adapter directory for inference.

    Args:
        path: ``runs/<name>/version_N`` (uses ``adapter/best``, else ``adapter/last``) or an adapter directory.
        backbone: use this backbone instead of the recorded one (e.g. a local copy of a hub model).
    """
    directory = adapter_directory(Path(path))
    meta = read_meta(directory)
    module = build_module(meta, backbone)
    load_weights(module, directory)
    return run_of(module, meta, directory)
