"""Exports that serving engines load: a trained run written as a plain LoRA adapter (``peftlab export-lora``).

vLLM's multi-LoRA server (``--enable-lora``) and most engines load plain LoRA only: no DoRA magnitudes, no
PiSSA/OLoRA residual backbone, no trained biases, no fully trained modules beside the LoRA factors.

* A run whose export already is a plain LoRA (LoRA, rsLoRA, QLoRA) is written as it is, and a PiSSA/OLoRA run as
  the exact rank-``2r`` LoRA on the original backbone (:meth:`peftlab.methods.LoRA.export`).
* Any other run whose update folds into the weights (DoRA, AdaLoRA, IA3, VeRA, a LoRA stack) is converted: its
  delta ``W_merged - W`` in every changed linear layer is factored by truncated SVD into a LoRA of the chosen rank
  (scaling 1, ``alpha = r``), zero-padded where a layer is smaller than the rank, so every layer has one rank. The
  fidelity is measured, never assumed: the largest logit difference, the KL divergence and the agreement of the
  top token between the run and the written adapter, loaded by plain peft on a freshly loaded backbone as an engine
  would, on sample texts.
* Methods whose update is not a weight delta (prompt and prefix tuning, P-tuning v2, bottleneck adapters) or that
  change tensors a LoRA cannot carry (biases, norms, a head) are refused in one line naming ``peftlab serve``.

Why not peft's ``convert_to_lora``: in peft 0.21 it factors each layer's ``get_delta_weight``, which for a DoRA
layer is ``s B A`` without the magnitude rescaling, so a DoRA adapter converts silently wrong; the merged-minus-base
delta is exact for every mergeable method and needs no per-layer support.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from torch import nn

from peftlab.adapters import PEFT_TASK, adapter_directory, peftlab_meta, read_meta, rewrite_meta, write_meta
from peftlab.api import load_run
from peftlab.assets import resolve_model
from peftlab.errors import PeftLabError
from peftlab.export import atomic_directory, export_adapter
from peftlab.merge import probe_batch
from peftlab.methods import PeftModule

#: vLLM's ``--max-lora-rank`` choices (``LoRAConfig.max_lora_rank``); an adapter's rank must not exceed the flag
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SAMPLE_TEXTS = ["A moving, beautifully shot film.", "Dull, predictable and far too long.",
                "The cast is wonderful but the script lets them down.",
                "Explain in one sentence why the sky is blue.", "def add(a, b):\n    return a + b"]


def export_lora_command(run: str, /, *, output: str, rank: int = 16, backbone: str | None = None,
                        texts: list[str] | None = None) -> dict:
    """Write a trained run as a plain LoRA adapter that serving engines load (vLLM --enable-lora), converting other methods.

    LoRA, rsLoRA and QLoRA runs are written as they are; PiSSA/OLoRA runs as the exact plain LoRA of rank 2r on the
    original backbone. DoRA, AdaLoRA, IA3, VeRA and other methods whose update folds into the weights are converted
    to a LoRA of rank ``--rank`` by truncated SVD of each layer's weight change. Every export is then loaded by
    plain peft on a fresh backbone and compared with the run on sample texts: the report prints the largest logit
    difference, the KL divergence and how often the top token agrees, and the ``vllm serve`` line that loads it.
    Prompt/prefix methods and bottleneck adapters cannot be a LoRA: they are refused, naming ``peftlab serve``.

    Args:
        run: run directory (runs/NAME/version_N) or an exported adapter directory
        output: directory to write the LoRA adapter to (replaced atomically if it exists)
        rank: rank of the converted LoRA (methods that are converted; a plain LoRA keeps its own rank)
        backbone: use this backbone instead of the one recorded with the adapter
        texts: sample texts for the fidelity measurement (default: five short English and code snippets)

    Examples:
        peftlab export-lora runs/lora/version_0 --output served/lora
        peftlab export-lora runs/dora/version_0 --output served/dora --rank 32
    """
    if rank < 1:
        raise PeftLabError(f"--rank must be >= 1 (got {rank}); vLLM's --max-lora-rank takes "
                           + ", ".join(map(str, VLLM_MAX_LORA_RANKS)))
    loaded = load_run(run, backbone=backbone)
    report = export_lora(loaded.module, output, rank=rank, source=adapter_directory(Path(run)), texts=texts)
    print(json.dumps(report, indent=2))
    return report


def export_lora(module, output, *, rank: int = 16, source: Path | None = None,
                texts: list[str] | None = None) -> dict:
    """Write ``module`` (a built, trained method) as a plain LoRA in ``output``; return the report (see the command).

    ``source``: the adapter directory ``module`` was loaded from; its ``peftlab_meta.json`` (prompt format, labels)
    and ``peftlab_config.yaml`` are carried into the export."""
    module.eval()
    refusal = module.serving_engine_refusal()
    if refusal is None:
        config_file = source / "peftlab_config.yaml" if source else None
        config_yaml = config_file.read_text() if config_file and config_file.is_file() else None
        trained = read_meta(source) if source else {}  # the loaded module has no trainer to ask for these
        export_adapter(module, output, config_yaml=config_yaml, label_names=trained.get("label_names"),
                       prompt=trained.get("prompt_format"))
        if trained.get("converted_from"):  # converted when the run exported it (PiSSA / OLoRA): keep the record
            rewrite_meta(output, converted_from=trained["converted_from"])
        conversion = "exact" if read_meta(output).get("converted_from") else "none"
        report = {"conversion": conversion, "method": type(module).__name__}
    else:
        report = _convert(module, Path(output), rank, source, refusal)
    config = json.loads((Path(output) / "adapter_config.json").read_text())
    report["rank"] = int(config["r"])
    report["directory"] = str(output)
    report["fidelity"] = fidelity(module, output, texts)
    report["vllm"] = vllm_command(module.hparams.backbone, output, report["rank"])
    return report


def vllm_command(backbone: str, directory, rank: int) -> str:
    """The ``vllm serve`` line that loads the adapter in ``directory`` (``--max-lora-rank`` only above 16)."""
    backbone = resolve_model(backbone)  # a packaged model is served from its local directory
    allowed = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not allowed:
        return f"not servable by vLLM: rank {rank} is above its largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})"
    flag = f" --max-lora-rank {allowed[0]}" if allowed[0] > 16 else ""
    return f"vllm serve {backbone} --enable-lora{flag} --lora-modules NAME={directory}"


# ---------------------------------------------------------------------------------------------- conversion
def _convert(module, output: Path, rank: int, source: Path | None, refusal: str) -> dict:
    name = type(module).__name__
    serve = "serve it with peftlab serve (docs/multi-adapter.md)"
    if not type(module).can_merge():  # its update is not a weight delta; the refusal names what serves it
        raise PeftLabError(f"{name} cannot be written as a LoRA: {refusal}")
    reason = module.merge_refusal()
    if reason:
        raise PeftLabError(f"{name} cannot be written as a LoRA: {reason.rstrip('.')}; {serve}")
    if module.quantized_weights():
        raise PeftLabError(f"{name} keeps its frozen weights in 4 bits, so its update ({refusal.split(';')[0]}) has "
                           f"no exact delta against a float backbone; {serve}")
    print(f"[peftlab] converting {name} to a plain LoRA of rank {rank} (SVD of each changed layer's weight delta)",
          flush=True)
    merged = module.merged_model("float32")
    base = module.load_backbone().float()
    deltas, other = weight_deltas(base, merged)
    del merged
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise PeftLabError(f"{name} changes {len(other)} tensor(s) besides linear weights ({shown}), which a plain "
                           f"LoRA cannot carry; {serve}")
    if not deltas:
        raise PeftLabError(f"{name}'s update is zero in every layer (an untrained run?): there is no LoRA to write")
    state, kept = {}, {}
    for layer, delta in deltas.items():
        a, b, kept[layer] = low_rank(delta, rank)
        state[f"base_model.model.{layer}.lora_A.weight"] = a
        state[f"base_model.model.{layer}.lora_B.weight"] = b
    targets = target_names(base, set(deltas))
    del base
    _write_lora(module, output, state, rank, targets, source)
    return {"conversion": f"SVD to rank {rank}", "method": name, "layers": len(deltas),
            "energy_kept_min": round(min(kept.values()), 6),
            "energy_kept_mean": round(sum(kept.values()) / len(kept), 6)}


def weight_deltas(base: nn.Module, merged: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({linear layer: W_merged - W}, [other changed tensors])`` between two models of one architecture."""
    linears = {n for n, m in merged.named_modules() if isinstance(m, nn.Linear)}
    theirs = dict(base.named_parameters())
    deltas, other = {}, []
    for key, p in merged.named_parameters():
        q = theirs.get(key)
        if q is not None and q.shape == p.shape and torch.equal(p, q.to(p.dtype)):
            continue
        layer, _, leaf = key.rpartition(".")
        if q is not None and q.shape == p.shape and leaf == "weight" and layer in linears:
            deltas[layer] = (p.detach() - q.detach().to(p.dtype)).float()
        else:
            other.append(key)
    return deltas, other


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, energy kept)`` with ``B A`` the best rank-``rank`` approximation of ``delta`` (Eckart-Young), zero
    rows/columns padding a layer smaller than ``rank``; energy kept: the share of ``||delta||_F^2`` it keeps."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    total = float((s ** 2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    a = torch.zeros(rank, delta.shape[1])
    b = torch.zeros(delta.shape[0], rank)
    # split the singular values evenly between the factors, so neither is much larger than the other
    root = s[:k].sqrt()
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    return a.contiguous(), b.contiguous(), kept


def target_names(model: nn.Module, layers: set[str]) -> list[str]:
    """``target_modules`` for ``layers``: their name suffixes when those select exactly them, else full names."""
    suffixes = {n.rsplit(".", 1)[-1] for n in layers}
    selected = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if selected == layers else sorted(layers)


def _write_lora(module, output: Path, state: dict, rank: int, targets: list[str], source: Path | None) -> None:
    config = LoraConfig(task_type=PEFT_TASK[module.task], r=rank, lora_alpha=rank, lora_dropout=0.0,
                        target_modules=targets, base_model_name_or_path=resolve_model(module.hparams.backbone),
                        inference_mode=True)
    meta = read_meta(source) if source else peftlab_meta(module)
    base_args = set(inspect.signature(PeftModule.__init__).parameters) - {"self", "kwargs"}
    trained = {k: v for k, v in dict(module.hparams).items() if not k.startswith("_")}
    meta.update({
        "method": "peftlab.methods.LoRA",
        "converted_from": {"method": meta["method"], "init_args": meta["init_args"],
                           "conversion": f"SVD to rank {rank}"},
        "init_args": {**{k: v for k, v in trained.items() if k in base_args and k not in ("task", "num_labels")},
                      "r": rank, "alpha": rank, "dropout": 0.0, "target_modules": targets},
        "trainable": sum(t.numel() for t in state.values()),
        "task": module.task, "num_labels": module.num_labels, "backbone": module.hparams.backbone,
    })
    with atomic_directory(output) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_meta(tmp, meta)
        (tmp / "README.md").write_text(
            f"# LoRA rank {rank} converted from {type(module).__name__} ({module.hparams.backbone})\n\n"
            "Written by `peftlab export-lora`: the truncated SVD of each changed layer's weight delta, so it "
            "approximates the trained method (the command's report gives the measured fidelity).\n\n"
            f"```bash\n{vllm_command(module.hparams.backbone, '<this directory>', rank)}\n```\n")


# ---------------------------------------------------------------------------------------------- fidelity
def fidelity(module, directory, texts: list[str] | None = None) -> dict:
    """How closely the adapter in ``directory``, loaded by plain peft on a fresh backbone, reproduces ``module``:
    the largest absolute logit difference, the mean and largest KL(module || adapter) per token, and the share of
    tokens whose most likely next token agrees, over ``texts``."""
    plain = PeftModel.from_pretrained(module.load_backbone(), str(directory)).eval()
    batch = probe_batch(module, texts or SAMPLE_TEXTS)
    with torch.no_grad():
        a = module(**batch).logits.float()
        b = plain(**{k: v.to(plain.device) for k, v in batch.items()}).logits.float().to(a.device)
    # causal LM: every real position (the mask is the input's); seq2seq's logits are the decoder's: all of them
    keep = batch["attention_mask"].bool() if module.task == "causal_lm" else None
    logp, logq = a.log_softmax(-1), b.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    diff = (a - b).abs().amax(-1)
    same = a.argmax(-1) == b.argmax(-1)
    if keep is not None:
        kl, diff, same = kl[keep], diff[keep], same[keep]
    return {"max_abs_logit_difference": float(diff.max()), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float(same.float().mean()), "texts": len(texts or SAMPLE_TEXTS)}
