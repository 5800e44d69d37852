"""The GPU-correctness fixes, checked on the CPU where they can be: trainable parameters in fp32 on a half-precision
backbone, prefix methods with gradient checkpointing refused, the attention kernel and matmul precision settings,
loader workers and pinned memory. (QLoRA's own placement on a GPU and fp16 gradient scaling need a GPU:
scripts/gpu_check.sh.)"""

from __future__ import annotations

import pytest
import torch

from conftest import make_data, tiny_trainer
from peftlab.errors import PeftLabError
from peftlab.methods import BottleneckAdapter, FullFineTuning, LoRA, PrefixTuning, PTuningV2, Stack


@pytest.mark.parametrize("method, kwargs", [
    (LoRA, {"r": 2}),
    (BottleneckAdapter, {"bottleneck": 4}),
    (FullFineTuning, {}),
])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_trainable_parameters_are_fp32_on_a_half_precision_backbone(tiny_bert, method, kwargs, dtype):
    module = method(backbone=tiny_bert, num_labels=2, dtype=dtype, **kwargs).build()
    trainable = [(n, p.dtype) for n, p in module.named_parameters() if p.requires_grad]
    frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
    assert trainable and all(d == torch.float32 for _, d in trainable), trainable
    assert any("classifier" in n for n, _ in trainable)  # the new head too (peft's copy for LoRA)
    if frozen:  # the backbone keeps its dtype
        assert frozen == {getattr(torch, dtype)}


def test_bf16_mixed_on_a_bf16_backbone_trains(tiny_bert, sentiment_csv):
    """configs/gpu.yaml's combination (bf16-mixed precision, bf16 backbone), on the CPU."""
    data = make_data(sentiment_csv, "classification", tiny_bert)
    module = LoRA(backbone=tiny_bert, num_labels=data.num_labels, r=2, dtype="bfloat16", learning_rate=1e-2)
    tiny_trainer(max_steps=3, precision="bf16-mixed").fit(module, datamodule=data)
    lora = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert any(float(p.abs().max()) > 0 for p in lora)  # trained


@pytest.mark.parametrize("method, kwargs", [
    (PrefixTuning, {}),
    (PTuningV2, {}),
    (PTuningV2, {"input_tokens": False, "prefix_projection": False}),
])
def test_prefix_methods_refuse_gradient_checkpointing_in_one_line(tiny_llama, method, kwargs):
    with pytest.raises(PeftLabError, match="gradient_checkpointing cannot be used with .*attention cache"):
        method(backbone=tiny_llama, task="causal_lm", gradient_checkpointing=True, **kwargs)


def test_a_stack_with_a_prefix_part_refuses_gradient_checkpointing(tiny_llama):
    stack = Stack(backbone=tiny_llama, task="causal_lm", gradient_checkpointing=True,
                  additive={"method": "lora", "r": 2, "target_modules": ["q_proj"]},
                  prompt={"method": "prefix_tuning", "num_virtual_tokens": 2})
    with pytest.raises(PeftLabError, match="gradient_checkpointing cannot be used with a prefix_tuning prompt part"):
        stack.check()  # before anything is loaded (the CLI's check), and build() the same
    Stack(backbone=tiny_llama, task="causal_lm", gradient_checkpointing=True,  # input tokens are fine
          additive={"method": "lora", "r": 2, "target_modules": ["q_proj"]},
          prompt={"method": "prompt_tuning", "num_virtual_tokens": 2}).check()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_reaches_the_backbone(tiny_llama, implementation):
    module = LoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj"],
                  attn_implementation=implementation).build()
    assert module.model.get_base_model().config._attn_implementation == implementation


def test_matmul_precision_is_applied_for_the_run(tiny_bert, sentiment_csv):
    before = torch.get_float32_matmul_precision()
    try:
        data = make_data(sentiment_csv, "classification", tiny_bert)
        module = LoRA(backbone=tiny_bert, num_labels=data.num_labels, r=2, matmul_precision="medium")
        tiny_trainer(max_steps=1).fit(module, datamodule=data)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_loader_workers_and_pinned_memory_follow_the_device(tiny_bert, sentiment_csv, monkeypatch):
    cpu = make_data(sentiment_csv, "classification", tiny_bert)
    assert (cpu.num_workers, cpu.pin_memory) == (0, False)  # this machine: no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = make_data(sentiment_csv, "classification", tiny_bert)
    assert gpu.num_workers >= 1 and gpu.pin_memory is True
    explicit = make_data(sentiment_csv, "classification", tiny_bert, num_workers=0, pin_memory=False)
    assert (explicit.num_workers, explicit.pin_memory) == (0, False)
    with pytest.raises(PeftLabError, match="data.num_workers must be >= 0"):
        make_data(sentiment_csv, "classification", tiny_bert, num_workers=-1)


def test_two_loader_workers_give_the_same_batches(tiny_bert, sentiment_csv):
    """Workers only collate: the order and the content of the batches are those of the main process."""
    def batches(workers):
        data = make_data(sentiment_csv, "classification", tiny_bert, num_workers=workers)
        data.setup()
        torch.manual_seed(0)
        return [b["input_ids"] for b in data.train_dataloader()]

    main, workers = batches(0), batches(2)
    assert len(main) == len(workers) and all(torch.equal(a, b) for a, b in zip(main, workers))
