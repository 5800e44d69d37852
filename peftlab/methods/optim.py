"""Optimizer parameter groups, the optimizer and the learning-rate schedule of every method (a mixin of
:class:`~peftlab.methods.PeftModule`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from peftlab.backbones import HEAD_NAMES
from peftlab.data.loading import epoch_length


class Optimization:
    """AdamW (or bitsandbytes' 8-bit / paged AdamW) over the trainable parameters, with warm-up and decay."""

    def optimizer_groups(self) -> list[dict]:
        """Parameter groups for the optimizer. Override to give a part its own learning rate:
        ``[{"params": [...]}, {"params": [...], "lr": 1e-2}]`` (groups without ``lr`` use learning_rate)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the classification head (under a module named in ``HEAD_NAMES``; with
        peft that is the ``modules_to_save`` copy, the frozen original has ``requires_grad=False``)."""
        return [p for name, p in self.named_parameters()
                if p.requires_grad and any(part in HEAD_NAMES for part in name.split("."))]

    def configure_optimizers(self):
        groups = []
        method_groups = self.optimizer_groups()
        head_lr = self.head_learning_rate
        if head_lr is not None:  # the head leaves whichever group the method put it in, for a group of its own
            head_params = self.head_parameters()
            head = {id(p) for p in head_params}
            method_groups = [{**g, "params": [p for p in g["params"] if id(p) not in head]} for g in method_groups]
            method_groups.append({"params": head_params, "lr": head_lr})
        for group in method_groups:
            extra = {k: v for k, v in group.items() if k != "params"}
            params = [p for p in group["params"] if p.requires_grad]
            groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay,
                           **extra})
            groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra})
        optimizer = optimizer_class(self.hparams.optimizer)(
            [g for g in groups if g["params"]], lr=self.hparams.learning_rate
        )
        total = max(1, int(self.total_optimizer_steps()))
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.hparams.scheduler, warmup, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int | float:
        """The optimizer steps of this fit (the schedule's length): ``trainer.estimated_stepping_batches``, computed
        without letting Lightning set up its training loader early.

        Lightning 2.6's ``estimated_stepping_batches`` sets up the train dataloader and creates its iterator when
        called from ``configure_optimizers``, which runs before a checkpoint is restored; the loader's saved position
        is then never loaded, and a resumed run starts a fresh epoch instead (Lightning issue #20550;
        docs/dependencies.md tracks it). Here the length comes from a separate loader of the same data
        (never iterated), with Lightning's formula; without a DataModule, Lightning's own property is used."""
        trainer = self.trainer
        datamodule = trainer.datamodule
        if trainer.max_epochs in (None, -1) or datamodule is None or trainer.train_dataloader is not None:
            return trainer.estimated_stepping_batches
        batches = epoch_length(len(datamodule.train_dataloader()), trainer.limit_train_batches)
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps


def optimizer_class(name: str):
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]


def lr_lambda(name: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor
