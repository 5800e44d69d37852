"""Memory (item 5): SmolLM2-135M under LoRA (fp32, bf16 weights) vs QLoRA (NF4 + double quantization).

Each configuration runs in its own subprocess (peak RSS only grows within a process): import, load the
data and a few real batches (batch 8, max_length 96), build the peftlab method module (backbone loaded the
way ``peftlab fit`` loads it), then train those steps with AdamW. Reported per configuration: resident
memory after the imports, after the data, after building the model and after training, the process's peak RSS (``ru_maxrss``), and the bytes of the
backbone's parameters and buffers as stored (4-bit packed weights + their quantization constants for QLoRA).
The theoretical size assumes 32 / 16 bits per parameter, and for NF4 with double quantization
4 + 8/64 + 32/(64*256) = 4.127 bits per quantized parameter (the QLoRA paper's accounting) with every
parameter that is not in a quantized linear layer (embeddings, norms) kept in fp32, as
``prepare_model_for_kbit_training`` does.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from benchmarks.common import ROOT, log

CONFIGS = {
    "lora_fp32": ("LoRA", dict(dtype="float32")),
    "lora_bf16": ("LoRA", dict(dtype="bfloat16")),
    "qlora_nf4": ("QLoRA", dict(quant_type="nf4", double_quant=False, compute_dtype="float32", optimizer="adamw")),
    "qlora_nf4_dq": ("QLoRA", dict(quant_type="nf4", double_quant=True, compute_dtype="float32", optimizer="adamw")),
}
BITS = {"lora_fp32": 32.0, "lora_bf16": 16.0, "qlora_nf4": 4 + 32 / 64, "qlora_nf4_dq": 4 + 8 / 64 + 32 / (64 * 256)}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _status(key: str) -> float | None:
    try:
        for line in open("/proc/self/status", encoding="utf-8"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork
    (the benchmark runner holds GBs of models by then), while VmHWM belongs to the exec'd process alone."""
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_split() -> dict:
    """Anonymous (heap: tensors the process made) vs file-backed (mapped files: libraries, safetensors
    weights read lazily through mmap) resident memory, in MiB."""
    return {"anon_mb": _status("RssAnon"), "file_mb": _status("RssFile")}


def stored_bytes(model) -> dict:
    """Bytes of parameters + buffers as stored; 4-bit weights include their quantization state."""
    import torch

    total = quantized_params = other_params = 0
    seen = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            quantized_params += int(torch.Size(state.shape).numel())
            for value in state.as_dict(packed=False).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        elif isinstance(tensor, torch.nn.Parameter):
            other_params += tensor.numel()
    return {"bytes": total, "quantized_params": quantized_params, "other_params": other_params}


def child(names: list[str], steps: int, setting_name: str) -> dict:
    """Runs inside the subprocess: data first (same for every configuration), then the model, then training."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from benchmarks.common import SEED, quiet
    from benchmarks.throughput import SETTINGS, datamodule, peftlab_module

    setting = SETTINGS[setting_name]
    quiet()
    results = {}
    dm = data = None
    for name in names:
        out = {"rss_imports_mb": rss_mb()}
        if data is None:
            dm = datamodule(setting)
            batches = iter(dm.train_dataloader())
            data = [next(batches) for _ in range(steps)]
        out["rss_data_mb"] = rss_mb()
        torch.manual_seed(SEED)
        method, kwargs = CONFIGS[name]
        module = peftlab_module(setting, method, **kwargs)
        out["rss_loaded_mb"] = rss_mb()
        out["peak_loaded_mb"] = peak_mb()
        out["loaded_split"] = rss_split()
        out.update({f"backbone_{k}": v for k, v in stored_bytes(module.model).items()})
        module.train()
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=setting["lr"])
        for batch in data:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kwargs.get("dtype") == "bfloat16"):
                loss = module(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        out["loss"] = float(loss)
        out["rss_trained_mb"] = rss_mb()
        out["trained_split"] = rss_split()
        out["peak_mb"] = peak_mb()
        results[name] = out
        del module, opt
    return results


def bench_memory(smoke: bool) -> dict:
    # smoke: all-MiniLM-L6-v2 instead of SmolLM2, both configurations in one process (the RSS numbers of the
    # second are then meaningless; smoke only checks that the code runs)
    steps = 1 if smoke else 3
    setting = "lora_minilm_cls" if smoke else "lora_smollm2_clm"
    groups = [["lora_fp32", "qlora_nf4_dq"]] if smoke else [[name] for name in CONFIGS]
    results = {}
    for names in groups:
        log(f"memory {', '.join(names)} on {setting}: subprocess, {steps} training steps")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", ",".join(names), str(steps), setting],
                              cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {names} failed:\n{proc.stderr[-3000:]}")
        results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        for name in names:
            r = results[name]
            log(f"  {name}: peak RSS {r['peak_mb']:.0f} MB, backbone {r['backbone_bytes'] / 2**20:.0f} MiB stored")
    base = results["lora_fp32"]
    n_total = base["backbone_other_params"]  # fp32: every parameter is "other"
    for name, r in results.items():
        if name.startswith("qlora"):
            theory_bits = (r["backbone_quantized_params"] * BITS[name] + r["backbone_other_params"] * 32) / n_total
        else:
            theory_bits = BITS[name]
        r["theory_bytes"] = n_total * theory_bits / 8
        r["param_reduction"] = base["backbone_bytes"] / r["backbone_bytes"]
        r["theory_reduction"] = 32 / theory_bits
        r["peak_reduction"] = base["peak_mb"] / r["peak_mb"]
        r["trained_rss_reduction"] = (base["rss_trained_mb"] - base["rss_data_mb"]) / max(
            1e-9, r["rss_trained_mb"] - r["rss_data_mb"])
    results["_n_params"] = n_total
    results["_setting"] = setting
    return results


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3])))
