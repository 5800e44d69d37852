"""The step loss and the evaluation metrics of every method (a mixin of :class:`~peftlab.methods.PeftModule`).

Classification: the mean over a micro-batch's examples. Causal LM / seq2seq: the sum over its target tokens,
turned into the mean over every target token of the optimizer step (every micro-batch, every rank) before the
optimizer applies it, so each token weighs the same whatever the batching.
"""

from __future__ import annotations

import torch
import torchmetrics
from torch import nn

from peftlab.backbones import transformers_model
from peftlab.errors import PeftLabError


class TokenWeightedLoss:
    """``training_step``, the once-per-optimizer-step loss bookkeeping, and validation / test metrics."""

    def training_step(self, batch, batch_idx):
        """The loss to backpropagate for one micro-batch.

        Classification: the mean over the micro-batch's examples. Causal LM / seq2seq: the *sum* over its target
        tokens; :meth:`on_before_optimizer_step` divides the accumulated gradient by the number of target tokens
        of the whole optimizer step (every accumulated micro-batch, every rank), so each token weighs the same
        whatever the batching (the fix transformers, torchtune and TRL made in late 2024). The loss is checked for
        NaN / inf once per optimizer step, not here: that check is a host sync.
        """
        loss, loss_sum, count = self.micro_batch_loss(batch)
        self._add_to_step(loss_sum, count)
        if self.task == "classification":
            return loss
        # Lightning divides what training_step returns by accumulate_grad_batches; multiplying by it first leaves
        # sum / token_scale, a constant that on_before_optimizer_step replaces by the step's token count
        return loss * (self.trainer.accumulate_grad_batches / self._token_scale)

    def micro_batch_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """``(loss, detached loss sum, count)`` of one micro-batch: classification's mean over its examples, or the
        causal-LM / seq2seq *sum* over its target tokens (see :meth:`training_step`), and what it counts."""
        if self.task == "classification":
            loss = self(**batch).loss
            n = len(batch["labels"])
            return loss, loss.detach() * n, n
        labels = batch["labels"]
        # no KV cache in training: it would only cost memory, and transformers (5.24) builds the block-diagonal
        # mask of packed rows (data.packing) only when there is none
        inputs = {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}
        if self.task == "seq2seq":  # the decoder reads the shifted targets; the loss is computed here, once
            inputs["decoder_input_ids"] = decoder_inputs(self.model, labels)
        nll, count = token_nll(self(**inputs).logits, labels, self.task)
        return nll, nll.detach(), count

    def _add_to_step(self, loss_sum: torch.Tensor, count) -> None:
        """Accumulate this micro-batch's loss sum and its count (targets or examples) until the optimizer step."""
        stats = torch.stack([loss_sum.float(), torch.as_tensor(count, dtype=torch.float32, device=loss_sum.device)])
        self._step_stats = stats if self._step_stats is None else self._step_stats + stats

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer step: sum the step's loss and counts over every rank (one small collective), refuse a
        non-finite loss before the weights change, turn the causal-LM / seq2seq gradient into the mean over every
        target token of the step, and log ``train/loss`` (token-weighted for those tasks)."""
        stats, self._step_stats = self._step_stats, None
        if stats is None:
            return
        mean = self.finish_step(stats, self.parameters(), self._token_scale)
        self.log("train/loss", mean, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)

    def finish_step(self, stats: torch.Tensor, params, token_scale: float) -> torch.Tensor:
        """Sum a step's ``(loss sum, count)`` over every rank, refuse a non-finite loss before the weights change,
        and (causal LM / seq2seq) turn the gradient of ``params`` into the mean over every target token of the
        step; return the step's mean loss (what ``train/loss`` logs)."""
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1:
            stats = strategy.reduce(stats.clone(), reduce_op="sum")
        total, count = stats[0], stats[1].clamp(min=1.0)
        if not bool(torch.isfinite(total)):
            # stop before the optimizer applies it, so the weights and the last checkpoint stay good
            raise PeftLabError(
                f"the training loss is {float(total / count)} at step {self.global_step} (epoch {self.current_epoch}); "
                "stopped before updating the weights, so the last checkpoint is good. Lower model.learning_rate, set "
                "trainer.gradient_clip_val, or use precision 32-true / bf16 instead of fp16"
            )
        if self.task != "classification":
            # each rank's gradient is sum / token_scale over its micro-batches; data parallelism averages over ranks
            scale = token_scale * self.trainer.world_size / count
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        return total / count

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _init_metrics(self):
        def stage_metrics():
            if self.task == "classification":
                n = self.num_labels
                return nn.ModuleDict({
                    "acc": torchmetrics.Accuracy(task="multiclass", num_classes=n),
                    "f1": torchmetrics.F1Score(task="multiclass", num_classes=n, average="macro"),
                    "loss": torchmetrics.MeanMetric(),
                })
            # token-weighted mean loss, so perplexity is exp(mean NLL per target token); exact_match: share of
            # examples whose every target token is the argmax under teacher forcing, which is exactly when greedy
            # decoding would reproduce the whole target (e.g. " fresh" + EOS)
            return nn.ModuleDict({"loss": torchmetrics.MeanMetric(), "exact_match": torchmetrics.MeanMetric()})

        self.metrics = nn.ModuleDict({"val": stage_metrics(), "test": stage_metrics()})

    def _eval_step(self, batch, stage):
        out = self(**batch)
        m = self.metrics[stage]
        if self.task == "classification":
            preds = out.logits.argmax(-1)
            m["acc"].update(preds, batch["labels"])
            m["f1"].update(preds, batch["labels"])
            m["loss"].update(out.loss, weight=len(preds))
        else:
            labels = batch["labels"]
            nll, count = token_nll(out.logits, labels, self.task)
            if count > 0:
                m["loss"].update(nll / count, weight=count)  # the mean over every target token of the split
            logits, labels = target_logits(out.logits, labels, self.task)
            target = labels != -100
            right = ((logits.argmax(-1) == labels) | ~target).all(-1)[target.any(-1)]
            if len(right):
                m["exact_match"].update(right.float())

    def _log_epoch(self, stage):
        m = self.metrics[stage]
        values = {f"{stage}/{k}": metric.compute() for k, metric in m.items()}
        if self.task != "classification":
            values[f"{stage}/ppl"] = torch.exp(values[f"{stage}/loss"].clamp(max=50))
        # torchmetrics' compute() already gathered every rank's state, so these values are global and equal on
        # all ranks; sync_dist only tells Lightning so (a mean of equal values, once per epoch)
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)

    def _reset_metrics(self, stage):
        # Reset at the start of each epoch, inside the loop's grad mode: states made under inference_mode
        # (e.g. by a `trainer.validate` before `fit`) cannot be updated in place under no_grad later.
        for metric in self.metrics[stage].values():
            metric.reset()

    def on_validation_epoch_start(self):
        self._reset_metrics("val")

    def on_test_epoch_start(self):
        self._reset_metrics("test")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")


def target_logits(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict ``labels`` and the labels, aligned: prompt-learning methods prepend their virtual
    tokens' positions to the logits (the last ``labels.shape[1]`` are kept); in causal LM position t predicts t + 1."""
    logits = logits[:, -labels.shape[1]:]
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels


def token_nll(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the negative log-likelihood over the target tokens, number of target tokens), in fp32."""
    logits, labels = target_logits(logits, labels, task)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll, (labels != -100).sum()


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """A seq2seq model's decoder inputs for ``labels`` (the targets shifted right), through the transformers model
    inside ``model`` (peft-wrapped or not)."""
    return transformers_model(model).prepare_decoder_input_ids_from_labels(labels=labels)
