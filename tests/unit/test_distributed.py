"""Several processes through Lightning's strategies (issue #10): DDP on 2 CPU processes (gloo) trains the
same adapter as 1 process with the same global batch, syncs metrics, and only rank 0 writes; the FSDP and
DeepSpeed configs load and the pieces peftlab adds for them work.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_distributed_runs.py."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT

STRATEGY_CONFIGS = sorted((ROOT / "configs" / "strategies").glob("*.yaml"))


@pytest.mark.parametrize("config", STRATEGY_CONFIGS, ids=lambda p: p.stem)
def test_strategy_configs_build_their_strategy(config):
    """Each shipped strategy config names a strategy Lightning can build (DeepSpeed only if installed)."""
    import importlib.util

    import lightning as L

    strategy = yaml.safe_load(config.read_text())["trainer"]["strategy"]
    if isinstance(strategy, dict):
        from jsonargparse import ArgumentParser

        parser = ArgumentParser()
        parser.add_argument("--strategy", type=L.pytorch.strategies.Strategy)
        built = parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy
        from peftlab.strategies import FSDP2Strategy

        assert isinstance(built, FSDP2Strategy)
        assert built.reshard_after_forward is True and built.mixed_precision == strategy["init_args"]["mixed_precision"]
        return
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        assert strategy in L.pytorch.strategies.StrategyRegistry  # known name; needs `pip install deepspeed`
        return
    assert strategy in L.pytorch.strategies.StrategyRegistry or strategy == "ddp"


def test_fsdp2_shards_the_transformer_blocks_of_any_backbone(tiny_llama, tiny_bert, tiny_t5):
    """FSDP2Strategy puts one fully_shard unit on each transformer block, found by class for any backbone."""
    from peftlab.methods import LoRA, PromptTuning
    from peftlab.strategies import transformer_block_classes

    llama = LoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj"]).build()
    assert {c.__name__ for c in transformer_block_classes(llama)} == {"LlamaDecoderLayer"}
    bert = PromptTuning(backbone=tiny_bert, num_labels=2, num_virtual_tokens=2).build()
    assert "BertLayer" in {c.__name__ for c in transformer_block_classes(bert)}  # (and BertEmbeddings)
    t5 = LoRA(backbone=tiny_t5, task="seq2seq", r=2, target_modules=["q", "v"]).build()
    assert {c.__name__ for c in transformer_block_classes(t5)} == {"T5Block"}


def test_adapter_only_checkpoint_with_wrapped_parameter_names(tiny_llama):
    """Under FSDP (and activation checkpointing) module paths gain wrapper segments while the gathered full
    state dict has clean names: the adapter-only filter and the load check must see through both."""
    from peftlab.methods import LoRA
    from peftlab.methods.base import unwrapped_name

    model = LoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj"]).build()
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert unwrapped_name("model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q") == \
        "model.layers.0.self_attn.q"
    wrapped_names = {n.replace("layers.0.", "layers.0._fsdp_wrapped_module."): p for n, p in model.named_parameters()}
    original = model.named_parameters
    model.named_parameters = lambda *a, **k: iter(wrapped_names.items())  # what FSDP's module paths look like
    try:
        checkpoint = {"state_dict": dict(clean)}
        model.on_save_checkpoint(checkpoint)
        assert sorted(checkpoint["state_dict"]) == sorted(trainable)
        model.on_load_checkpoint(checkpoint)  # names match through the wrappers: no error
    finally:
        model.named_parameters = original


def test_a_successful_run_destroys_the_process_group_before_exit(tmp_path, monkeypatch):
    """A gloo group left to the interpreter's exit can abort a finished DDP run (SIGABRT, "terminate called without
    an active exception", seen on a 2-process resume test): main() destroys it after a successful run only."""
    import torch.distributed as dist

    import peftlab.cli as cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(cli, "run_cli", lambda argv, **kw: None)
    cli.main(["fit", "--config", "unused.yaml"])
    assert not dist.is_initialized()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)

    def fails(argv, **kw):
        raise RuntimeError("a rank failed")

    monkeypatch.setattr(cli, "run_cli", fails)
    try:
        with pytest.raises(RuntimeError):
            cli.main(["fit", "--config", "unused.yaml"])
        assert dist.is_initialized()  # not torn down after an error (other ranks may be in a collective)
    finally:
        dist.destroy_process_group()
