"""The ``peftlab`` command: a ``LightningCLI`` with the method chosen by ``model.class_path``.

    peftlab fit --config configs/quickstart.yaml
    peftlab fit --config configs/quickstart.yaml --model.r 16 --trainer.max_epochs 3
    peftlab fit --config configs/quickstart.yaml --print_config > my_run.yaml
    peftlab test --config my_run.yaml --ckpt_path runs/.../checkpoints/best.ckpt

The other commands (``peftlab merge``, ``params``, ...) are typed functions in the table of
:mod:`peftlab.commands`; errors in a config or in the data print one message (:mod:`peftlab.cli_errors`) and
exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

from peftlab.commands import COMMANDS
from peftlab.errors import PeftLabError

DESCRIPTION = (
    "peftlab: parameter-efficient fine-tuning with PyTorch Lightning. Pick a method with "
    "--model.class_path (LoRA, FullFineTuning, ...) and data with --data.*; see configs/ for examples."
)


def _description() -> str:
    return DESCRIPTION + f" Other commands: {', '.join('peftlab ' + c for c in COMMANDS)} (each has --help)."


def _quiet_libraries() -> None:
    # transformers prints a load report for every newly initialised head (expected here) and a progress
    # bar per weight file; peftlab reports what matters (trainable/total parameters) itself.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Tokenization happens once in prepare_data, so loader workers buy nothing on small CPU machines.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*is smaller than the logging.*")
    # test/predict from a fit checkpoint: LastCheckpoint is a fit-only callback, nothing to restore there
    warnings.filterwarnings("ignore", message=r".*Please add the following callbacks: \['LastCheckpoint'\]\.$")
    # MLflow's SQLite store announces its table migrations at INFO on every new run directory
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_cli_class():
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from peftlab.checkpointing import install as install_checkpoint_io

    class PeftSaveConfigCallback(SaveConfigCallback):
        """Lightning's SaveConfigCallback, writing ``config.yaml`` once the model is built (at the start of
        fit / validate / test / predict) instead of in ``setup``: the model is built in ``configure_model``,
        after ``setup``, and a config whose model cannot be built must leave no run directory behind."""

        def setup(self, trainer, pl_module, stage):
            pass

        def _save(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)  # a collective (log_dir, broadcast): every rank calls it

        def on_fit_start(self, trainer, pl_module):
            self._save(trainer, pl_module, "fit")

        def on_validation_start(self, trainer, pl_module):
            self._save(trainer, pl_module, "validate")  # no-op when fit already saved

        def on_test_start(self, trainer, pl_module):
            self._save(trainer, pl_module, "test")

        def on_predict_start(self, trainer, pl_module):
            self._save(trainer, pl_module, "predict")

    class PeftLabCLI(LightningCLI):
        """LightningCLI wired for peftlab: one DataModule, any PeftModule subclass, data-derived links."""

        save_config_class = PeftSaveConfigCallback

        def add_arguments_to_parser(self, parser):
            parser.add_argument("--test_after_fit", type=bool, default=True,
                                help="after fit, run the test split with the best checkpoint and print its metrics")
            parser.add_argument("--generations_file", type=str | None, default=None,
                                help="test (causal LM / seq2seq): where to write each test example's input, reference, "
                                     "generation and scores as JSON lines (default: <log_dir>/generations.jsonl)")
            from peftlab.trackers import TrackerName

            parser.add_argument("--trackers", type=list[TrackerName], default=[],
                                help="experiment trackers besides metrics.csv, all writing into the run directory: "
                                     "mlflow (pip install 'peftlab[mlflow]'), wandb ('peftlab[wandb]', offline "
                                     "without an API key), tensorboard; e.g. --trackers mlflow (docs/trackers.md)")
            parser.add_argument("--predictions_file", type=str | None, default=None,
                                help="predict: where to write predictions, .jsonl or .csv (default: <log_dir>/predictions.jsonl)")
            from peftlab.backbones import model_task
            from peftlab.callbacks import AdapterExport, LastCheckpoint
            from peftlab.generation import GenerationSettings

            # predict: how text is generated (--generation.max_new_tokens 64 --generation.do_sample true ...)
            parser.add_class_arguments(GenerationSettings, "generation")
            # on by default: exported adapters under <run dir>/adapter/{last,best} (--adapter_export.enabled false)
            parser.add_lightning_class_args(AdapterExport, "adapter_export")
            # on by default in fit: <run dir>/checkpoints/last.ckpt is the newest state (--last_checkpoint.enabled
            # false). Added by instantiate_trainer rather than as a Lightning class argument: it is a Checkpoint,
            # which Lightning refuses beside trainer.enable_checkpointing false
            parser.add_class_arguments(LastCheckpoint, "last_checkpoint")
            # the model is built for the data's task; the data tokenizes with the backbone's tokenizer
            parser.link_arguments("data.task", "model.init_args.task", compute_fn=model_task, apply_on="parse")
            parser.link_arguments("model.init_args.backbone", "data.tokenizer", apply_on="parse")
            # num_labels is read from the data, so it is never written twice
            parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")

        def before_instantiate_classes(self):
            self._budget_from_command_line()

        def _budget_from_command_line(self):
            """``--trainer.max_steps N`` on the command line means N steps: a config's ``max_epochs`` (the shipped
            ones set it) would otherwise stop the run first, silently. Unless ``--trainer.max_epochs`` is given
            too, the config's epoch limit is lifted, in one line."""
            trainer = self.config[self.subcommand].get("trainer") if self.subcommand else None
            given = {a.partition("=")[0] for a in sys.argv[1:] if a.startswith("--trainer.")}
            if (trainer is None or "--trainer.max_steps" not in given or "--trainer.max_epochs" in given
                    or (trainer.get("max_steps") or -1) <= 0 or trainer.get("max_epochs") in (None, -1)):
                return
            print(f"[peftlab] --trainer.max_steps {trainer.max_steps} given: the config's max_epochs "
                  f"{trainer.max_epochs} no longer ends the run earlier (add --trainer.max_epochs to keep both)",
                  flush=True)
            trainer.max_epochs = -1

        def instantiate_trainer(self, **kwargs):
            from lightning.pytorch.callbacks import ProgressBar

            # read before the Trainer exists: Lightning appends its default bar to this very list
            trainer_config = self.config_value("trainer", self.config_init) or {}
            configured = trainer_config.get("callbacks") or []
            user_bar = any(isinstance(c, ProgressBar) for c in configured)
            root_dir = trainer_config.get("default_root_dir")
            last = self.config_value("last_checkpoint", self.config_init)
            if (self.subcommand == "fit" and last is not None and last.enabled
                    and trainer_config.get("enable_checkpointing") is not False):
                kwargs["callbacks"] = [*configured, last]
            if self.subcommand == "fit":
                from peftlab.callbacks.log_interval import ShortRunLogging

                kwargs["callbacks"] = [*kwargs.get("callbacks", configured), ShortRunLogging()]
            trainer = super().instantiate_trainer(**kwargs)
            install_checkpoint_io(trainer)  # crash-safe, weights-only checkpoint files (peftlab.checkpointing)
            if not user_bar:
                from peftlab.callbacks.progress import replace_default_progress_bar

                replace_default_progress_bar(trainer)
            if trainer.logger is None and not root_dir:
                self._without_run_directory(trainer)
            if self.subcommand == "predict":
                self._add_prediction_writer(trainer)
            if self.subcommand == "test":
                self._add_generations_file(trainer, root_dir)
            return trainer

        def _add_generations_file(self, trainer, root_dir):
            """``peftlab test`` on a generative run writes the test's generations (:class:`peftlab.callbacks.
            GenerationEval`, to --generations_file, default <log_dir>/generations.jsonl); a GenerationEval in the
            config writes them too unless it names its own file."""
            from peftlab.callbacks import GenerationEval

            if self.model.task == "classification":
                return
            path = self.config_value("generations_file")
            if path is None and trainer.logger is None and not root_dir:
                return  # no run directory (see _without_run_directory)
            path = path or "auto"
            configured = [c for c in trainer.callbacks if isinstance(c, GenerationEval) and "test" in c.stages]
            for callback in configured:
                callback.generations_file = callback.generations_file or path
            if not configured:
                trainer.callbacks.append(GenerationEval(max_new_tokens=int(self.model.hparams.max_new_tokens),
                                                        stages=("test",), generations_file=path))

        def _add_prediction_writer(self, trainer):
            """``peftlab predict`` writes its predictions with :class:`peftlab.callbacks.PredictionWriter` (to
            --predictions_file, default <log_dir>/predictions.jsonl), unless the config adds a writer itself."""
            from lightning.pytorch.callbacks import BasePredictionWriter

            from peftlab.callbacks import PredictionWriter

            if not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
                trainer.callbacks.append(PredictionWriter(self.config_value("predictions_file")))

        def _without_run_directory(self, trainer):
            """With the logger off and no trainer.default_root_dir there is no run directory: Lightning would
            put config.yaml and the exported adapters in the working directory. Write neither, and say so."""
            from lightning.pytorch.cli import SaveConfigCallback

            from peftlab.callbacks import AdapterExport, LastCheckpoint

            trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
            writers = [c for c in trainer.callbacks if isinstance(c, (AdapterExport, LastCheckpoint)) and c.enabled
                       and not c.dirpath]
            for callback in writers:
                callback.enabled = False
            if self.subcommand == "fit" and trainer.is_global_zero:
                print("[peftlab] trainer.logger is off and trainer.default_root_dir is not set: no run directory, "
                      "so config.yaml, last.ckpt and the adapters are not saved (set trainer.default_root_dir to "
                      "keep them)")

        def _parse_ckpt_path(self):
            # LightningCLI reads the checkpoint's hyperparameters into the config before anything else
            from peftlab.checkpointing import checkpoint_errors

            if not self.config.get("subcommand"):
                return
            path = self.config[self.config.subcommand].get("ckpt_path")
            with checkpoint_errors(path):
                self._check_checkpoint_matches_config(path)
                super()._parse_ckpt_path()

        def _check_checkpoint_matches_config(self, path):
            """Lightning would silently replace the config's model settings with the checkpoint's; refuse instead
            when they differ, so a resumed run is never something other than what the config says."""
            if not path or not Path(path).is_file():
                return
            import torch

            hparams = dict(torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
            model = self.config[self.config.subcommand].get("model")
            if not hparams or model is None:
                return
            saved_class = hparams.pop("_class_path", None)
            if saved_class and saved_class != model.class_path:
                diffs = [f"model.class_path is {model.class_path} here but {saved_class} in the checkpoint"]
            else:
                init_args = model.get("init_args") or {}
                diffs = [f"model.init_args.{k} is {init_args.get(k)!r} here but {v!r} in the checkpoint"
                         for k, v in sorted(hparams.items())
                         if not k.startswith("_") and k not in ("task", "num_labels") and init_args.get(k) is not None
                         and _normalise(init_args.get(k)) != _normalise(v)]
            if diffs:
                raise PeftLabError(
                    f"checkpoint does not match the config ({'; '.join(diffs[:3])}). Resume with the settings the "
                    "checkpoint was trained with, or start a new run without --ckpt_path"
                )

        def before_fit(self):
            self._started = time.time()
            self.model.check()  # settings errors in seconds, before anything is written or loaded
            self.model.check_data(self.datamodule)  # a model/data mismatch (task, labels, packing), as early
            if callable(getattr(self.datamodule, "load", None)):
                self.datamodule.load()  # bad rows (null targets, unknown roles...) in one line, before training
                if getattr(self.datamodule, "task", None) == "chat":
                    self.datamodule.chat_template_text  # noqa: B018 - a tokenizer without a template: refused now
            self._resolve_last_checkpoint()
            self._arrange_loggers()

        def before_validate(self):
            self._before_evaluation()

        def before_test(self):
            self._before_evaluation()

        def before_predict(self):
            self._before_evaluation()

        def _before_evaluation(self):
            self.model.check()
            from peftlab.generation import GenerationSettings

            self.model.generation = GenerationSettings.coerce(self.config_init[self.subcommand].get("generation"))
            self._evaluate_into_run()
            self._arrange_loggers()

        def _arrange_loggers(self):
            from peftlab import trackers

            trackers.arrange(self.trainer, self.config_value("trackers") or [])

        def _evaluate_into_run(self):
            """``peftlab test|validate|predict`` with a run's checkpoint (``--ckpt_path runs/x/version_0/
            checkpoints/best.ckpt``) or a run's saved config write into that run, under ``<run dir>/test`` (and
            ``validate``, ``predict``), instead of starting a new version directory per evaluation."""
            from lightning.pytorch.loggers import CSVLogger

            logger = self.trainer.logger
            if not isinstance(logger, CSVLogger):
                return
            root = Path(logger.root_dir).resolve()
            candidates = []
            ckpt = self.config_init[self.subcommand].get("ckpt_path")
            if ckpt and ckpt not in ("last", "best", "hpc", "registry") and Path(ckpt).parent.name == "checkpoints":
                candidates.append(Path(ckpt).resolve().parent.parent)
            candidates += [Path(str(c)).resolve().parent for c in self.config[self.subcommand].get("config") or []]
            run = next((c for c in candidates if c.parent == root and c.is_dir()), None)
            if run is not None:
                # a string version is the directory's name: <root>/<run>/<subcommand>
                logger._version = f"{run.name}/{self.subcommand}"

        def _resolve_last_checkpoint(self):
            """Resume into the run a checkpoint came from. ``--ckpt_path last`` picks the newest
            ``last.ckpt`` of this config's runs (Lightning alone would look only in the new run's empty version
            directory, because the logger picks a fresh version per run); an explicit path inside one of this
            logger's runs (``runs/NAME/version_3/checkpoints/last.ckpt``) continues that run too. Either way
            metrics append to its metrics.csv and ModelCheckpoint finds its own directory, so its best-k tracking
            is restored (in a new directory Lightning would drop it: "The dirpath has changed")."""
            cfg = self.config_init[self.subcommand]
            logger = self.trainer.logger
            path = cfg.get("ckpt_path")
            if not path or logger is None or not hasattr(logger, "root_dir"):
                return
            root = Path(logger.root_dir)
            if path == "last":
                found = sorted(root.glob("*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
                if not found:
                    print(f"[peftlab] --ckpt_path last: no last.ckpt under {root}; starting a new run")
                    cfg["ckpt_path"] = None
                    return
                ckpt = found[-1]
            elif path in ("best", "hpc", "registry"):
                return
            else:
                ckpt = Path(path)
                try:
                    inside = ckpt.resolve().parent.parent.parent == root.resolve() and ckpt.parent.name == "checkpoints"
                except OSError:
                    inside = False
                if not inside:  # a checkpoint from elsewhere: a new run of this config starts from it
                    return
            version = ckpt.parent.parent.name
            # log into the resumed run's directory (CSV metrics append; checkpoints continue in place)
            logger._version = int(version[len("version_"):]) if version.startswith("version_") and \
                version[len("version_"):].isdigit() else version
            cfg["ckpt_path"] = str(ckpt)
            # Lightning's CSVLogger appends to metrics.csv here, despite its warning that it would delete it
            warnings.filterwarnings("ignore", message=".*exists and is not empty. Previous log files.*")
            # resuming from an epoch-end checkpoint replays the epoch-end hooks before any validation ran again:
            # ModelCheckpoint then finds no metric to compare, warns, and (rightly) saves nothing
            warnings.filterwarnings("ignore", message=".*could not find the monitored key in the returned metrics.*")
            print(f"[peftlab] resuming from {ckpt}")

        def after_fit(self):
            trainer, model = self.trainer, self.model
            from peftlab.callbacks.last import model_checkpoint

            best = getattr(model_checkpoint(trainer), "best_model_path", "") or ""
            results = {}
            if self.config_value("test_after_fit") and not trainer.interrupted and trainer.datamodule is not None:
                # the best checkpoint's path, not "best": Lightning warns about "best" beside LastCheckpoint
                results = trainer.test(model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
                results = results[0] if results else {}
            log_dir = trainer.log_dir  # a collective under a distributed strategy: every rank must ask
            if trainer.is_global_zero:
                _print_summary(model, trainer, log_dir, best, results, time.time() - self._started)

        def config_value(self, key, config=None):
            """``key`` of the running subcommand's config (``self.config``, or ``config`` such as config_init)."""
            config = self.config if config is None else config
            cfg = config[self.subcommand] if self.subcommand else config
            return cfg.get(key)

    return PeftLabCLI


def _normalise(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _print_summary(model, trainer, log_dir, best, results, seconds):
    pct = 100.0 * model.trainable_count / model.total_count
    lines = [f"method      {type(model).__name__} on {model.hparams.backbone}",
             f"trainable   {model.trainable_count:,} / {model.total_count:,} parameters ({pct:.4f}%)"]
    from peftlab.callbacks.last import model_checkpoint

    cb = model_checkpoint(trainer)
    if cb is not None and cb.monitor and cb.best_model_score is not None:
        lines.append(f"best        {cb.monitor} = {float(cb.best_model_score):.4f}")
    if best:
        lines.append(f"checkpoint  {best}")
    adapter = next((d for d in (os.path.join(log_dir or "", "adapter", n) for n in ("best", "last"))
                    if log_dir and os.path.isdir(d)), None)
    if adapter:
        lines.append(f"adapter     {adapter}")
    for key in sorted(results):
        lines.append(f"{key:<11} {results[key]:.4f}")
    if log_dir:
        lines.append(f"run dir     {log_dir}")
    lines.append(f"time        {seconds:.0f} s")
    print("\n[peftlab] fit summary\n  " + "\n  ".join(lines), flush=True)


LIGHTNING_COMMANDS = {
    "fit": "train a method (then test it with the best checkpoint); --help: the common options, --help-all: all",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test split",
    "predict": "write predictions for the test split (or a file) to .jsonl/.csv",
}

TOP_LEVEL_EXAMPLES = """examples:
  peftlab fit --config configs/quickstart.yaml
  peftlab fit --config configs/quickstart.yaml --print_config > run.yaml
  peftlab fit --help                  # the common options of fit (--help-all: every option, LightningCLI's)
  peftlab fit --model.help LoRA       # the arguments of one method
  peftlab params --help               # every other command's --help comes from its function (peftlab.commands)
Errors print one line; add --debug for the traceback. Docs: docs/index.md."""


FIT_HELP = """usage: peftlab fit [--config FILE] [--OPTION VALUE ...]

Train a method (then test it with the best checkpoint). Settings come from --config files (later ones override
earlier ones) and --KEY VALUE overrides, keys as in the YAML (--trainer.max_epochs 3 is trainer: max_epochs: 3).
The common options; `peftlab fit --help-all` lists all of them (about 700 lines).

general:
  --config FILE                    a run config (configs/quickstart.yaml; a run's saved config.yaml)
  --print_config                   print the complete resolved config and exit (save it to reproduce a run)
  --seed_everything SEED           random seed of the run
  --test_after_fit BOOL            test the best checkpoint after fit (default true)
  --trackers [mlflow,wandb,...]    experiment trackers besides metrics.csv (docs/trackers.md)
  --ckpt_path PATH|last            resume from a checkpoint (last: this config's newest last.ckpt)

trainer: (Lightning's Trainer)
  --trainer.max_epochs N           epochs to train
  --trainer.max_steps N            optimizer steps to train (given alone, it also lifts the config's max_epochs)
  --trainer.accelerator NAME       auto, cpu, gpu, ...
  --trainer.devices N              devices (GPUs) to use
  --trainer.precision P            32-true, bf16-mixed, 16-mixed, ...
  --trainer.accumulate_grad_batches N  micro-batches per optimizer step
  --trainer.gradient_clip_val V    clip gradients to this norm
  --trainer.val_check_interval V   validate every V steps (int) or fraction of an epoch (float)
  --trainer.log_every_n_steps N    log the training loss every N steps
  --trainer.enable_progress_bar BOOL  the bar in a terminal, plain lines when stdout is a file
  --trainer.logger CLASS           the logger (default in the configs: CSVLogger under runs/)
  --trainer.default_root_dir DIR   where runs go when no logger names a directory

model: (the method; its own arguments: `peftlab fit --model.help LoRA`, docs/methods.md)
  --model CLASS                    peftlab.methods.LoRA, QLoRA, PromptTuning, FullFineTuning, ...
  --model.backbone NAME            a Hugging Face model id, a local path or packaged:SmolLM2-135M
  --model.learning_rate LR         learning rate of the trainable parameters
  --model.r R                      (LoRA, QLoRA) rank of the update matrices
  --model.target_modules [A,B]     (LoRA, QLoRA) the linear layers to adapt, or all-linear
  --model.dtype DTYPE              float32, bfloat16, float16, auto
  --model.gradient_checkpointing BOOL  trade compute for activation memory

data: (peftlab.data.PeftDataModule)
  --data.source SOURCE             a file (.csv, .jsonl, .parquet), a Hugging Face dataset id or packaged:NAME
  --data.task TASK                 classification, causal_lm or seq2seq
  --data.text_column NAME          (classification) the input text column
  --data.label_column NAME         (classification) the label column
  --data.prompt_template TEXT      (causal_lm, seq2seq) the prompt, with {column} fields
  --data.response_template TEXT    (causal_lm, seq2seq) the target, with {column} fields
  --data.max_length N              maximum tokens per input (longer inputs are truncated)
  --data.batch_size N              training batch size
  --data.max_train_samples N       use at most N training rows

Every option with its type and default: `peftlab fit --help-all`, and docs/reference.md.
A method's arguments: `peftlab fit --model.help CLASS` (e.g. LoRA). Errors print one line; --debug shows the
traceback."""


def top_level_help() -> str:
    """``peftlab --help``: the commands of LightningCLI and of the command table, without importing either."""
    names = [*LIGHTNING_COMMANDS, *COMMANDS]
    rows = [*LIGHTNING_COMMANDS.items(), *((name, c.summary) for name, c in COMMANDS.items())]
    return "\n".join([f"usage: peftlab [-h] {{{','.join(names)}}} ...", "", DESCRIPTION, "", "commands:",
                      *(f"  {name:<19} {summary}" for name, summary in rows), "", TOP_LEVEL_EXAMPLES])


def _destroy_process_group() -> None:
    """After a successful multi-process run, tear the process group down while the interpreter is alive.

    Lightning leaves it to the process's exit, where gloo's worker threads can outlive the interpreter and abort
    the process (SIGABRT, "terminate called without an active exception": pytorch/pytorch#190489, #179291) after
    the run finished and saved everything: a DDP run then ends with a non-zero status. Only after success, as
    torchtitan does: after an error on one rank, a collective teardown could wait forever for the others."""
    torch_distributed = sys.modules.get("torch.distributed")
    if torch_distributed is not None and torch_distributed.is_available() and torch_distributed.is_initialized():
        torch_distributed.destroy_process_group()


def run_cli(argv: list[str], *, callbacks: list | tuple = ()):
    """Run a Lightning command (``fit``, ``validate``, ``test``, ``predict``) through peftlab's LightningCLI, as
    the ``peftlab`` command does; ``callbacks`` are added to the trainer's (``peftlab compare`` adds its own).
    Returns the LightningCLI object; errors raise (``main`` turns user errors into one line)."""
    _quiet_libraries()
    from peftlab.data import PeftDataModule
    from peftlab.methods import PeftModule

    cli_class = make_cli_class()
    # LightningCLI reads sys.argv (it warns when given both), so hand it argv that way
    saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "peftlab", *argv]
    try:
        return cli_class(
            PeftModule,
            PeftDataModule,
            subclass_mode_model=True,
            save_config_callback=cli_class.save_config_class,
            save_config_kwargs={"overwrite": True},
            # parse errors raise (instead of printing the whole usage), and main() prints one line for them
            # allow_abbrev: argparse would take --data.max_eval_sample as --data.max_eval_samples, silently
            parser_kwargs={"default_env": False, "prog": "peftlab", "description": _description(),
                           "exit_on_error": False, "allow_abbrev": False,
                           **{c: {"exit_on_error": False, "allow_abbrev": False} for c in LIGHTNING_COMMANDS}},
            auto_configure_optimizers=False,
            # peftlab prints trainable / total parameters itself; Lightning's table adds a FLOPs column that
            # reads 0 for every run (--trainer.enable_model_summary true brings it back)
            trainer_defaults={"enable_model_summary": False, **({"callbacks": list(callbacks)} if callbacks else {})},
        )
    finally:
        sys.argv = saved


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``peftlab`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    # like `python -m`, make modules in the working directory importable (class_path: examples.bitfit.BitFit)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if argv in ([], ["-h"], ["--help"]):
        # the top-level help lists commands only, so it is printed without importing Lightning (most of its time,
        # docs/benchmarks.md); `peftlab fit --help-all` is LightningCLI's own, complete help
        print(top_level_help())
        if not argv:
            sys.exit(2)
        return None
    if argv[:1] == ["fit"] and argv[1:] in (["-h"], ["--help"]):
        # the common options, without importing Lightning or building its 700-line parser (--help-all)
        print(FIT_HELP)
        return None
    if argv[:1] == ["fit"] and "--help-all" in argv:
        argv[argv.index("--help-all")] = "--help"
    try:
        from peftlab.compat import unmet_requirements

        problem = unmet_requirements()  # before anything is loaded: a library outside peftlab's declared range
        if problem:
            raise PeftLabError(problem)
        if argv and argv[0] in COMMANDS:
            from peftlab.commands import run_command

            one_shot = args is None and COMMANDS[argv[0]].meta_only  # the console script: the process ends after it
            if one_shot:
                from peftlab.backbones import hide_bitsandbytes_during_meta_builds

                hide_bitsandbytes_during_meta_builds()
            run_command(argv[0], argv[1:])
            if one_shot:
                # The interpreter's last garbage collection at exit walks every object that torch, transformers and
                # Lightning created, a fifth of a `peftlab params` run (docs/benchmarks.md, section 6). These commands
                # have written and closed all they write, so leave those objects to the operating system.
                import gc

                gc.freeze()
            return None
        run_cli(argv)
        _destroy_process_group()
    except Exception as err:  # noqa: BLE001 - only user errors are turned into a message, the rest re-raises
        from peftlab.cli_errors import user_error

        message = user_error(err, argv)
        if debug or message is None:
            raise
        print(f"peftlab: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
