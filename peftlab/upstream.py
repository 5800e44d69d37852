"""Every private (underscore) or internal API of Lightning, torch, transformers, jsonargparse and Optuna that peftlab
uses.

Each one is here because no public API does the job (where one does, peftlab uses it instead). An upgrade may
change any of them without notice, so ``tests/unit/test_upstream.py`` checks every entry against the installed
libraries: that it still exists, with the expected parameters, and still behaves as peftlab relies on; that
the file named in ``where`` still uses it (so this list does not go stale); and that peftlab's code uses no
private name of another library that is missing from this list. A failure names the entry and what changed.

jsonargparse's *error wording* is not an API, but peftlab's one-line errors depend on it as well: those
patterns live in :mod:`peftlab.cli_errors`, tested by ``tests/unit/test_cli_errors.py`` against real jsonargparse
parsers.
"""

from __future__ import annotations

from typing import NamedTuple


class Private(NamedTuple):
    """One private or internal upstream name peftlab depends on."""

    name: str  # import path of the owner, then the attribute: "lightning.pytorch.cli.LightningCLI._parse_ckpt_path"
    library: str  # the distribution that owns it
    kind: str  # "method" (parameters checked), "function" (parameters checked), "property" or "attribute"
    parameters: tuple[str, ...]  # method / function parameter names, in order ("self" included); () otherwise
    used_for: str
    where: str  # the peftlab file that uses it

    @property
    def attribute(self) -> str:
        return self.name.rsplit(".", 1)[-1]


PRIVATE_APIS: tuple[Private, ...] = (
    Private("lightning.pytorch.cli.LightningCLI._parse_ckpt_path", "lightning", "method", ("self",),
            "overridden: check that the checkpoint matches the config before LightningCLI copies the checkpoint's "
            "hyperparameters into it, and turn a corrupt or unsafe checkpoint into one line (no public hook runs "
            "between parsing and that copy)",
            "peftlab/cli.py"),
    Private("lightning.pytorch.cli.LightningCLI._set_seed", "lightning", "method", ("self",),
            "overridden by the parse-only CLI of `peftlab params` / `estimate-memory` so that counting parameters "
            "does not reseed the caller's random generators",
            "peftlab/analysis/params.py"),
    Private("lightning.pytorch.loggers.CSVLogger._version", "lightning", "attribute", (),
            "`--ckpt_path last` resumes into the run's existing version directory; loggers take the version only "
            "in their constructor, and the logger is built before the checkpoint is found",
            "peftlab/cli.py"),
    Private("lightning.pytorch.loggers.TensorBoardLogger._root_dir", "lightning", "attribute", (),
            "a configured TensorBoard logger writes into the CSV logger's run directory (its save_dir, name and "
            "version are taken only in the constructor, before the run directory is known)",
            "peftlab/trackers.py"),
    Private("lightning.pytorch.loggers.TensorBoardLogger._name", "lightning", "attribute", (),
            "with _root_dir: the TensorBoard logger's name follows the CSV logger's", "peftlab/trackers.py"),
    Private("lightning.pytorch.core.LightningModule._trainer", "lightning", "attribute", (),
            "read without raising when the module is not attached to a Trainer (the public `trainer` property "
            "raises then)",
            "peftlab/methods/base.py"),
    Private("lightning.pytorch.strategies.Strategy._checkpoint_io", "lightning", "attribute", (),
            "tell whether the user configured a CheckpointIO before installing the atomic one (the public "
            "`checkpoint_io` property creates a default one when none is set)",
            "peftlab/checkpointing.py"),
    Private("lightning.pytorch.strategies.ModelParallelStrategy._data_parallel_size", "lightning", "attribute", (),
            "FSDP2Strategy shards over every process by default (Lightning resolves 'auto' to one group per node in "
            "setup_environment, where the world size is first known)",
            "peftlab/strategies.py"),
    Private("lightning.fabric.utilities.distributed._DatasetSamplerWrapper._sampler", "lightning", "attribute", (),
            "find peftlab's resumable shuffle sampler inside Lightning's DistributedSamplerWrapper",
            "peftlab/data/loading.py"),
    Private("torch.utils.data.DataLoader._index_sampler", "torch", "property", (),
            "overridden: skip the batches already trained on when resuming mid-epoch",
            "peftlab/data/loading.py"),
    Private("torch.nn.Module._buffers", "torch", "attribute", (),
            "replace buffers by private copies (a QLoRA backbone must not share storage with the cached model)",
            "peftlab/methods/qlora.py"),
    Private("torch.nn.Module._parameters", "torch", "attribute", (),
            "a sharded start swaps each frozen weight for a placeholder in place, in every module that holds it "
            "(tied weights by identity), before and after fully_shard, without register_parameter's checks and "
            "hooks running on half-built modules",
            "peftlab/backbones.py"),
    Private("transformers.PreTrainedModel._init_weights", "transformers", "method", ("self", "module"),
            "a sharded start initialises the weights missing from the checkpoint (a new head) exactly as "
            "from_pretrained does, on every rank alike (no public per-module initialiser)",
            "peftlab/backbones.py"),
    Private("lm_eval.tasks._yaml_loader", "lm-eval", "attribute", (),
            "its load_yaml reads a task YAML as lm-eval does (include: merged, !function resolved), to check the "
            "task in one line before any model loads; lm-eval < 0.4.10 has the public load_yaml_config instead "
            "(the fallback)",
            "peftlab/evaluate.py"),
    Private("lm_eval.api.model.TemplateLM._loglikelihood_tokens", "lm-eval", "method", ("self", "requests", "kwargs"),
            "overridden: TemplateLM tokenizes context/continuation pairs and calls it; peftlab scores them through "
            "the method's module (virtual tokens, prefixes), the only hook between tokenizing and the model",
            "peftlab/eval_lm.py"),
    Private("torch.Tensor._base", "torch", "attribute", (),
            "count each saved storage once when tracing activations (a view and its base are one tensor)",
            "peftlab/analysis/memory.py"),
    Private("transformers.AutoModelForCausalLM._model_mapping", "transformers", "attribute", (),
            "tell which tasks (auto classes) a backbone's config has a head for, before loading any weights",
            "peftlab/backbones.py"),
    Private("transformers.PreTrainedModel._no_split_modules", "transformers", "attribute", (),
            "the classes of the transformer blocks FSDP wraps",
            "peftlab/strategies.py"),
    Private("transformers.PreTrainedModel._keep_in_fp32_modules", "transformers", "attribute", (),
            "modules that stay in fp32 (not quantized) when QLoRA counts its 4-bit weights",
            "peftlab/methods/qlora.py"),
    Private("optuna.trial.FrozenTrial._trial_id", "optuna", "attribute", (),
            "`peftlab compare` claims an enqueued (WAITING) seed trial for one worker with the storage's "
            "set_trial_state_values(trial_id, RUNNING), recovers trials of dead workers and writes their "
            "attributes: the storage API takes the trial id, which FrozenTrial and Trial expose only as _trial_id "
            "(Optuna's own ask() claims WAITING trials the same way)",
            "peftlab/compare/worker.py"),
    Private("transformers.quantizers.base.get_keys_to_not_convert", "transformers", "function", ("model",),
            "which linear layers bitsandbytes leaves unquantized (the output head), for QLoRA's weight count "
            "(internal module, no underscore)",
            "peftlab/methods/qlora.py"),
    Private("transformers.quantizers.quantizers_utils.should_convert_module", "transformers", "function",
            ("full_name", "patterns"),
            "the same rule transformers applies when it quantizes a layer (internal module, no underscore)",
            "peftlab/methods/qlora.py"),
)
