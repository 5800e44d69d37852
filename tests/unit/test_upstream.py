"""The private upstream APIs peftlab uses (peftlab/upstream.py): each still exists with the parameters and the
behaviour peftlab relies on, each is still used where the list says, and none is used without being listed.
An upgrade of Lightning, torch or transformers that changes one fails here, naming it, instead of somewhere
deep in a run."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

from conftest import ROOT
from peftlab.upstream import PRIVATE_APIS, Private

BY_NAME = {p.name: p for p in PRIVATE_APIS}


def _owner(entry: Private):
    """The module or class that holds ``entry``'s attribute (the longest importable prefix, then attributes)."""
    parts = entry.name.split(".")[:-1]
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise AssertionError(f"{entry.name}: cannot import {'.'.join(parts)}")


def _explain(entry: Private, what: str) -> str:
    return (f"{entry.name} ({entry.library}) changed: {what}. peftlab uses it in {entry.where} to "
            f"{entry.used_for}; adapt that code and peftlab/upstream.py")


# ------------------------------------------------------------------------- behaviour of the attributes
def _logger_version(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    for cls in (CSVLogger, TensorBoardLogger):
        logger = cls(save_dir=str(tmp_path), name="run")
        logger._version = 3  # what --ckpt_path last does to resume into version_3
        assert logger.version == 3 and Path(logger.log_dir).name == "version_3", cls.__name__


def _tensorboard_directory(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path / "elsewhere"), name="other")
    logger._root_dir, logger._name, logger._version = str(tmp_path), "run", 2  # what peftlab.trackers.arrange does
    assert Path(logger.log_dir) == tmp_path / "run" / "version_2" and logger.save_dir == str(tmp_path)


def _module_trainer(tmp_path):
    import lightning as L

    module = L.LightningModule()
    assert module._trainer is None  # unattached: the public property would raise
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert module._trainer is trainer


def _strategy_checkpoint_io(tmp_path):
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy

    strategy = SingleDeviceStrategy("cpu")
    assert strategy._checkpoint_io is None  # nothing configured (the property would create a default)
    io = TorchCheckpointIO()
    strategy.checkpoint_io = io
    assert strategy._checkpoint_io is io


def _sampler_wrapper(tmp_path):
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import SequentialSampler

    inner = SequentialSampler(range(6))
    wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=0, shuffle=False)
    assert wrapper.dataset._sampler is inner


def _module_buffers(tmp_path):
    import torch

    norm = torch.nn.BatchNorm1d(2)
    assert isinstance(norm._buffers, dict) and "running_mean" in norm._buffers
    norm._buffers["running_mean"] = torch.ones(2)  # replacing an entry replaces the buffer
    assert torch.equal(norm.running_mean, torch.ones(2))


def _module_parameters(tmp_path):
    import torch

    lin = torch.nn.Linear(2, 2)
    assert isinstance(lin._parameters, dict) and lin._parameters["weight"] is lin.weight
    new = torch.nn.Parameter(torch.ones(2, 2))
    lin._parameters["weight"] = new  # replacing an entry replaces the parameter, also for named_parameters
    assert lin.weight is new and dict(lin.named_parameters())["weight"] is new


def _lm_eval_yaml_loader(tmp_path):
    from lm_eval.tasks import _yaml_loader

    (tmp_path / "base.yaml").write_text("output_type: multiple_choice\nnum_fewshot: 0\n")
    (tmp_path / "task.yaml").write_text("include: base.yaml\ntask: t\nnum_fewshot: 2\n")
    config = _yaml_loader.load_yaml(tmp_path / "task.yaml")
    assert config["task"] == "t" and config["output_type"] == "multiple_choice" and config["num_fewshot"] == 2


def _tensor_base(tmp_path):
    import torch

    t = torch.zeros(4)
    assert t[1:]._base is t and t._base is None


def _model_mapping(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, LlamaConfig

    assert LlamaConfig in AutoModelForCausalLM._model_mapping
    assert BertConfig in AutoModelForSequenceClassification._model_mapping


def _no_split_modules(tmp_path):
    from transformers import LlamaForCausalLM, PreTrainedModel

    assert hasattr(PreTrainedModel, "_no_split_modules")
    assert "LlamaDecoderLayer" in LlamaForCausalLM._no_split_modules


def _keep_in_fp32_modules(tmp_path):
    from transformers import PreTrainedModel

    assert hasattr(PreTrainedModel, "_keep_in_fp32_modules")


def _data_parallel_size(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    assert strategy._data_parallel_size == "auto"  # read and replaced before Lightning's setup_environment


def _optuna_trial_id(tmp_path):
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({"x": 1.0})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    storage = study._storage  # noqa: SLF001 - the test reaches the storage peftlab opened itself in compare/storage.py
    assert storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)  # claimed once ...
    assert not storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)  # ... and only once
    trial = optuna.trial.Trial(study, waiting._trial_id)
    assert trial._trial_id == waiting._trial_id and trial.number == waiting.number


CHECKS = {
    "optuna.trial.FrozenTrial._trial_id": _optuna_trial_id,
    "lightning.pytorch.strategies.ModelParallelStrategy._data_parallel_size": _data_parallel_size,
    "lightning.pytorch.loggers.CSVLogger._version": _logger_version,
    "lightning.pytorch.loggers.TensorBoardLogger._root_dir": _tensorboard_directory,
    "lightning.pytorch.loggers.TensorBoardLogger._name": _tensorboard_directory,
    "lightning.pytorch.core.LightningModule._trainer": _module_trainer,
    "lightning.pytorch.strategies.Strategy._checkpoint_io": _strategy_checkpoint_io,
    "lightning.fabric.utilities.distributed._DatasetSamplerWrapper._sampler": _sampler_wrapper,
    "torch.nn.Module._buffers": _module_buffers,
    "torch.nn.Module._parameters": _module_parameters,
    "torch.Tensor._base": _tensor_base,
    "lm_eval.tasks._yaml_loader": _lm_eval_yaml_loader,
    "transformers.AutoModelForCausalLM._model_mapping": _model_mapping,
    "transformers.PreTrainedModel._no_split_modules": _no_split_modules,
    "transformers.PreTrainedModel._keep_in_fp32_modules": _keep_in_fp32_modules,
}


def _called_by():
    """Overridden private methods: the upstream code that must still call them (else the override is dead)."""
    from lightning.pytorch.cli import LightningCLI
    from torch.utils.data import dataloader

    return {
        "lightning.pytorch.cli.LightningCLI._parse_ckpt_path": (LightningCLI.__init__, "self._parse_ckpt_path()"),
        "lightning.pytorch.cli.LightningCLI._set_seed": (LightningCLI.__init__, "self._set_seed()"),
        "torch.utils.data.DataLoader._index_sampler": (dataloader._BaseDataLoaderIter.__init__,
                                                       "loader._index_sampler"),
    }


@pytest.mark.parametrize("entry", PRIVATE_APIS, ids=[p.name for p in PRIVATE_APIS])
def test_private_api_is_still_there(entry, tmp_path):
    owner = _owner(entry)
    if entry.kind in ("method", "function"):
        found = getattr(owner, entry.attribute, None)
        assert callable(found), _explain(entry, "it no longer exists")
        params = tuple(inspect.signature(found).parameters)
        assert params == entry.parameters, _explain(entry, f"its parameters are {params}, not {entry.parameters}")
    elif entry.kind == "property":
        found = inspect.getattr_static(owner, entry.attribute, None)
        assert isinstance(found, property), _explain(entry, f"it is {found!r}, not a property")
    else:
        assert entry.kind == "attribute", entry
        try:
            CHECKS[entry.name](tmp_path)
        except (AssertionError, AttributeError, ImportError, TypeError) as err:
            raise AssertionError(_explain(entry, f"{type(err).__name__}: {err}")) from err
    if entry.name in _called_by():
        caller, call = _called_by()[entry.name]
        assert call in inspect.getsource(caller), _explain(entry, f"{caller.__qualname__} no longer runs {call}")


def test_every_attribute_entry_has_a_behaviour_check():
    attributes = {p.name for p in PRIVATE_APIS if p.kind == "attribute"}
    assert attributes == set(CHECKS)


@pytest.mark.parametrize("entry", PRIVATE_APIS, ids=[p.name for p in PRIVATE_APIS])
def test_every_entry_is_still_used_where_it_says(entry):
    """Entries do not go stale: the file still uses the name (drop the entry when the code stops using it)."""
    path = ROOT / entry.where
    assert path.is_file(), f"{entry.name}: {entry.where} does not exist"
    assert re.search(rf"\b{re.escape(entry.attribute)}\b", path.read_text(encoding="utf-8")), \
        f"{entry.where} no longer uses {entry.name}: remove it from peftlab/upstream.py"


# ------------------------------------------------------------------------- completeness
USES = (
    re.compile(r"super\(\)\.(_[a-z]\w*)"),  # calling an upstream private method from an override
    re.compile(r"(?:get|has|set)attr\((?!self\b|cls\b)[^,()]+,\s*[\"'](_[a-z]\w*)[\"']"),
    re.compile(r"(?<![\w.])(?!self\b|cls\b|peftlab\b)[A-Za-z_]\w*(?:\.[A-Za-z]\w*)*\.(_[a-z]\w*)\b"),  # obj._name
)


def _peftlab_sources():
    return sorted((ROOT / "peftlab").rglob("*.py"))


def _own_private_names() -> set[str]:
    """Underscore names peftlab defines itself (functions, classes, module and instance attributes)."""
    names: set[str] = set()
    for path in _peftlab_sources():
        text = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"(?:def|class) (_\w+)", text))
        names |= set(re.findall(r"^\s*(_\w+)\s*[:=]", text, flags=re.M))
        names |= set(re.findall(r"self\.(_\w+)\s*(?::[^=\n]*)?=(?!=)", text))
    return names


def test_no_private_upstream_name_is_used_without_being_listed():
    listed = {p.attribute for p in PRIVATE_APIS}
    own = _own_private_names()
    unlisted = []
    for path in _peftlab_sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("  #")[0]
            for i, pattern in enumerate(USES):
                for name in pattern.findall(code):
                    if name.startswith("__") or name in listed or (i == 2 and name in own):
                        continue
                    unlisted.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert not unlisted, ("private upstream names used but not listed in peftlab/upstream.py (list them, or use "
                          f"a public API): {unlisted}")


def _peftlab_classes():
    import peftlab

    classes = []
    for info in pkgutil.walk_packages(peftlab.__path__, "peftlab."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        classes += [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    from peftlab.cli import make_cli_class

    cli = make_cli_class()  # built inside a function (Lightning is imported only when a command runs)
    return classes + [cli, cli.save_config_class]


PYTHON_MACHINERY = {"_abc_impl"}  # set on every subclass of an ABC by Python itself


def test_no_upstream_private_method_is_overridden_without_being_listed():
    """A peftlab class that defines ``_name`` which an upstream base class also has overrides a private API."""
    listed = {p.attribute for p in PRIVATE_APIS}
    overrides = []
    for cls in _peftlab_classes():
        upstream = [b for b in cls.__mro__[1:] if not b.__module__.startswith("peftlab")]
        for name in vars(cls):
            if name.startswith("_") and not name.startswith("__") and name not in listed | PYTHON_MACHINERY and \
                    any(name in vars(b) for b in upstream):
                overrides.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    assert not overrides, f"upstream private methods overridden but not listed in peftlab/upstream.py: {overrides}"
