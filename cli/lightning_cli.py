"""The two LightningCLIs: ``train.py fit`` (translators) and ``evaluate.py test`` (injection evaluation).

Training runs in LightningCLI's subclass mode: without a ``model.class_path`` it trains the aligned TranslatorModule
on an activation store (the paper's recipe as defaults), the store's hidden sizes and model identities linked in at
instantiation; a config naming FunctionalTranslatorModule + QATrainingDataModule trains a translator for use. Both
share :class:`ProjectCLI`: one output root per run (``--trainer.default_root_dir``), ``organism:<role>`` models
trained before anything is instantiated, the resolved config saved, and :class:`cli.parser.ProjectParser` (one-line
errors, a short ``--help``). Configs go after the subcommand: ``python train.py fit -c configs/train/tiny.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from jsonargparse import Namespace
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningCLI
from pytorch_lightning.loggers import WandbLogger

from activation_transfer.errors import UsageError
from activation_transfer.translators.architectures import LinearTranslator, MLPTranslator  # noqa: F401 (short class_path)
from activation_transfer.translators.optim import OptimizerArgs
from callbacks.progress import progress_callbacks
from callbacks.save_config import LoggerSaveConfigCallback
from callbacks.wandb_artifacts import CheckpointRunId, resume_checkpoint_run
from cli.console import eval_summary, setup_logging, train_summary
from cli.fast_start import USAGES
from cli.organisms import ensure_organisms, organism_names
from cli.parser import ProjectParser, hidden_host_argv, usage_errors

# Imported so that configs and --model/--data may name these classes by their short names.
from datamodules.activation_pairs import ActivationPairDataModule, RecordPairIndices  # noqa: F401
from datamodules.multihop_qa import MultiHopQADataModule
from datamodules.qa_training import QATrainingDataModule  # noqa: F401
from lightning_modules.functional_translator import FunctionalTranslatorModule  # noqa: F401
from lightning_modules.injection_eval import InjectionEvalModule
from lightning_modules.kv_translator import KVTranslatorModule  # noqa: F401
from lightning_modules.translator import TranslatorModule  # noqa: F401


def finish_wandb(trainer) -> None:
    """Close the W&B runs of a finished subcommand, so a next ``main()`` in the same process starts a new run
    (WandbLogger leaves its run open, and a second WandbLogger would silently log into the first run)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def _class_of(entry) -> type | None:
    """The class a parsed ``{class_path, init_args}`` entry names (None for anything else)."""
    path = entry.get("class_path") if isinstance(entry, Namespace) else None
    if not path or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def group_runs(config: Namespace, seed: int | None = None) -> None:
    """A W&B logger without a ``group`` gets the config file's name, so ``train.py -c configs/train/X.yaml`` and
    ``evaluate.py -c configs/eval/X.yaml`` land in one group ``X``; with ``seed`` (a training's), the run's name ends
    in ``-seed<S>``: the three seeds' runs of one config otherwise share their name and group."""
    files = [str(p) for p in (config.get("config") or []) if p]
    for logger in _as_list(config.trainer.get("logger")):
        cls = _class_of(logger)
        args = logger.get("init_args") if cls is not None else None
        if cls is None or not issubclass(cls, WandbLogger) or args is None:
            continue
        if files and not args.get("group"):
            args["group"] = Path(files[-1]).stem
        name = args.get("name") or args.get("group")
        if isinstance(seed, int) and name and not str(name).endswith(f"-seed{seed}"):
            args["name"] = f"{name}-seed{seed}"


def use_one_output_root(trainer: Namespace) -> None:
    """Make ``trainer.default_root_dir`` the one folder a run writes to, so no config repeats an output path.

    A logger without an explicit ``save_dir`` (None, or ``"."``, WandbLogger's default: both mean "here") gets the
    root, so W&B files land in ``<root>/wandb/``; a ModelCheckpoint without a ``dirpath`` writes to
    ``<root>/checkpoints`` instead of Lightning's ``<save_dir>/<project>/<run id>/checkpoints``. Explicit values win.
    """
    root = trainer.get("default_root_dir") or "."
    for logger in _as_list(trainer.get("logger")):
        args = logger.get("init_args") if isinstance(logger, Namespace) else None
        if args is not None and "save_dir" in args and args.get("save_dir") in (None, ".") and not args.get("dir"):
            args["save_dir"] = root
    for callback in _as_list(trainer.get("callbacks")):
        cls = _class_of(callback)
        if cls is not None and issubclass(cls, ModelCheckpoint):
            if callback.get("init_args") is None:
                callback["init_args"] = Namespace()
            if callback.init_args.get("dirpath") is None:
                callback.init_args["dirpath"] = str(Path(root) / "checkpoints")


# W&B's folders besides the run's own (sub-folders of ``<root>/wandb``): unset, they default to the home folder
# (~/.cache/wandb, ~/.local/share/wandb/artifacts/staging, ~/.config/wandb) and fill with files every run.
WANDB_FOLDERS = {
    "WANDB_DIR": None,  # the root itself: W&B puts its runs into <WANDB_DIR>/wandb
    "WANDB_CACHE_DIR": "cache",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",
    "WANDB_CONFIG_DIR": "config",
}


def keep_wandb_under(root: str | Path) -> None:
    """Point W&B's folders that the user did not set at ``root`` (see ``WANDB_FOLDERS``); see :func:`restored_env`."""
    root = Path(root).resolve()
    for var, sub in WANDB_FOLDERS.items():
        if not os.environ.get(var):
            os.environ[var] = str(root if sub is None else root / "wandb" / sub)


@contextlib.contextmanager
def restored_env(names) -> Iterator[None]:
    """Restore the environment variables ``names`` on exit: a CLI's settings end with it (tests and the demo run
    several CLIs in one process)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def show_progress(trainer: Namespace) -> None:
    """A progress bar on a terminal, plain progress lines in a log (``callbacks.progress``): never a silent run."""
    enable, extra = progress_callbacks(trainer.get("enable_progress_bar"))
    trainer["enable_progress_bar"] = enable
    if extra:
        plain = Namespace(class_path="callbacks.progress.PlainProgress", init_args=Namespace(every_seconds=30.0))
        trainer["callbacks"] = [*_as_list(trainer.get("callbacks") or []), plain]


class ProjectCLI(LightningCLI):
    """What both entry points share: one output root (W&B's folders included), and organisms trained explicitly
    before instantiation; a parser with one-line errors, no abbreviated options and a short ``--help``."""

    NAME_RUNS_BY_SEED = False  # a training's W&B run name ends in its seed (an evaluation runs every seed)

    def add_arguments_to_parser(self, parser: ProjectParser) -> None:
        # The short --help shows these classes' options; in subclass mode the config or the default picks them.
        if not self.subclass_mode_model:
            parser.classes["model"] = self.model_class
        if not self.subclass_mode_data:
            parser.classes["data"] = self.datamodule_class

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        use_one_output_root(config.trainer)
        make_output_root(config.trainer.get("default_root_dir") or ".")
        show_progress(config.trainer)
        group_runs(config, config.get("seed_everything") if self.NAME_RUNS_BY_SEED else None)
        keep_wandb_under(config.trainer.get("default_root_dir") or ".")  # before the logger exists
        # Subclass-mode configs (the functional trainer) hold the options under init_args.
        data, model = ((config.get(k) or {}).get("init_args") or config.get(k) or {} for k in ("data", "model"))
        # The optimizer options are checked now, not at the model's instantiation: that comes after training organisms
        # and extracting activations (minutes on a cold cache), and a bad learning rate should not wait for them.
        if all(model.get(f.name) is not None for f in dataclasses.fields(OptimizerArgs)):
            OptimizerArgs.of(model)
        names = organism_names(config.as_dict())
        if names:
            ensure_organisms(names, cache_dir=data.get("cache_dir") or model.get("cache_dir"))


def make_output_root(root: str | Path) -> None:
    """Create the run's output folder now: one that cannot be made (a file in its path, no permission) is bad input,
    said before organisms, extraction or evaluation run."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"--trainer.default_root_dir {root}: cannot create the folder ({err.strerror}); pick a writable folder"
        ) from None


def check_resume_checkpoint(path: str | None) -> None:
    """``fit --ckpt_path``: a file must exist and be a torch checkpoint (a zip archive; a truncated file has no
    central directory), so a wrong path is one line now, not a traceback after extraction. Lightning's names
    (``last``, ``best``, ...) are Lightning's to resolve."""
    if path is None or path in ("last", "best", "hpc", "registry") or path.startswith("registry:"):
        return
    if not Path(path).is_file():
        raise UsageError(f"--ckpt_path {path} does not exist (or is a folder); give a .ckpt file or 'last'")
    if not zipfile.is_zipfile(path):
        raise UsageError(
            f"--ckpt_path {path} is not a Lightning checkpoint written by train.py (truncated, or another format); "
            "give a .ckpt file from the run's checkpoints/ folder or 'last'"
        )


# The paper's training recipe (arXiv 2606.03280, sections 2-3) as the trainer's defaults: 30 epochs, gradient-norm
# clipping 1.0, W&B logging, and the best-validation-loss checkpoint kept (plus last.ckpt, to resume). A config
# states only what differs.
TRAINER_DEFAULTS = {
    "trainer.max_epochs": 30,
    "trainer.gradient_clip_val": 1.0,
    "trainer.gradient_clip_algorithm": "norm",
    "trainer.logger": {
        "class_path": "pytorch_lightning.loggers.WandbLogger",
        "init_args": {"project": "activation-transfer", "job_type": "train"},
    },
    "trainer.callbacks": [
        # The best translator as a W&B `model` artifact (aliases best/latest) and as a save_pretrained folder.
        {"class_path": "callbacks.model_artifact.TranslatorArtifactCallback"},
        # Last in the list, so `--trainer.callbacks.monitor ...` on the command line reaches the checkpoint.
        {
            "class_path": "callbacks.checkpoint.LastEveryValidationCheckpoint",
            # No metric in the file name: "val/loss" would create a sub-folder.
            "init_args": {
                "monitor": "val/loss",
                "mode": "min",
                "filename": "best-{epoch:02d}-{step}",
                "auto_insert_metric_name": False,
                # last.ckpt: what `fit --ckpt_path last` resumes from after an interruption.
                "save_last": True,
            },
        },
    ],
}


# The data module's store-derived values, linked into the aligned TranslatorModule when it is built (a config never
# states them). A data module without the attribute (QATrainingDataModule) skips the link: jsonargparse ignores an
# instantiation link whose subclass-mode source lacks it.
STORE_LINKS = (
    ("data.sender_dim", "model.init_args.sender_dim"),
    ("data.receiver_dim", "model.init_args.receiver_dim"),
    ("data.sender_identity", "model.init_args.sender"),
    ("data.receiver_identity", "model.init_args.receiver"),
)
# Without a class_path, train.py trains the aligned translator (the paper's); a config naming
# FunctionalTranslatorModule + QATrainingDataModule trains one for use (the split-context protocol).
DEFAULT_CLASSES = {
    "model": {"class_path": "lightning_modules.translator.TranslatorModule"},
    "data": {"class_path": "datamodules.activation_pairs.ActivationPairDataModule"},
}


class TrainCLI(ProjectCLI):
    """``train.py``: any LightningModule/LightningDataModule by ``class_path`` (subclass mode), by default the
    aligned TranslatorModule + ActivationPairDataModule with the store-derived values linked."""

    NAME_RUNS_BY_SEED = True

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults({**TRAINER_DEFAULTS, **DEFAULT_CLASSES})
        for src, dst in STORE_LINKS:
            parser.link_arguments(src, dst, apply_on="instantiate")
        parser.linked |= {dst.replace(".init_args", "") for _, dst in STORE_LINKS}

    def before_fit(self) -> None:
        check_resume_checkpoint(self.config.fit.get("ckpt_path"))
        resume_checkpoint_run(self.trainer, self.config.fit.get("ckpt_path"))  # --ckpt_path continues its W&B run
        # W&B checks its login when the logger first logs, after extraction (minutes on a cold cache): start it now.
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment  # noqa: B018 (the property starts the run)

    def _parse_ckpt_path(self) -> None:
        # Not LightningCLI's: it parses a checkpoint file's hparams over the config, silently replacing the options
        # given with the saved ones (and FunctionalTranslatorModule's hold derived identities that are no __init__
        # arguments). Here the config rebuilds the module, the checkpoint restores the translator, the optimizer and
        # the loop state, and the module's on_load_checkpoint refuses a checkpoint whose decisive options differ.
        return


# Evaluation logs to W&B (summary metrics, per-sample table, plot, results artifact) unless a config says otherwise,
# one W&B run per run folder (a resumed evaluation resumes it).
EVAL_TRAINER_DEFAULTS = {
    "trainer.logger": {
        "class_path": "callbacks.wandb_artifacts.RunFolderWandbLogger",
        "init_args": {"project": "activation-transfer", "job_type": "eval"},
    },
    "trainer.callbacks": [{"class_path": "callbacks.eval_logging.EvalLoggingCallback"}],
}


class EvalTrainer(Trainer):
    """The evaluation's Trainer: its ``test`` takes no ``ckpt_path`` (the translator is ``--model.translator_ckpt``; a
    ckpt_path would restore the evaluation module itself) and prints no Lightning metric table by default
    (``evaluate.py`` prints its own per-condition table, :func:`cli.console.eval_summary`)."""

    def test(self, model=None, dataloaders=None, verbose: bool = False, datamodule=None):
        """Evaluate the translators by injection.

        Args:
            model: The evaluation module (given by the CLI).
            dataloaders: Unused (the data module gives the questions).
            verbose: Also print Lightning's table of every logged metric.
            datamodule: The questions (given by the CLI).
        """
        return super().test(model, dataloaders, verbose=verbose, datamodule=datamodule)


class EvalCLI(ProjectCLI):
    """Only the ``test`` subcommand; the resolved config also goes into the evaluation's run folder."""

    def add_arguments_to_parser(self, parser: ProjectParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults(EVAL_TRAINER_DEFAULTS)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule"}}

    def before_test(self) -> None:
        self.model.resolved_config = self._parser("test").dump(self.config["test"], skip_none=False)

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            print(eval_summary(self.model), flush=True)


TRAIN_DESCRIPTION = (
    "Train a translator: the aligned TranslatorModule on an activation store by default, or the module a config's "
    "model.class_path names (FunctionalTranslatorModule + QATrainingDataModule: trained for use)."
)
TRAIN_USAGE, EVAL_USAGE = (USAGES[prog][0] for prog in ("train.py", "evaluate.py"))  # also the Lightning-free help
EVAL_DESCRIPTION = "Evaluate translators by injection into the receiver on multi-hop QA (--model.translator_ckpt)."


def train_main(args: ArgsType = None, run: bool = True) -> TrainCLI:
    """Build and run the training CLI (the config's ``model.class_path`` picks the module; default: aligned).

    Args:
        args: Command-line arguments (None: ``sys.argv``), e.g. ``["fit", "-c", "configs/train/tiny.yaml"]``.
        run: Run the subcommand (False: only instantiate, for tests).
    """
    setup_logging()
    with restored_env(WANDB_FOLDERS), usage_errors("train.py"), hidden_host_argv(args):
        cli = TrainCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggerSaveConfigCallback,
            trainer_defaults={"callbacks": [CheckpointRunId()]},  # whatever the config's callbacks
            parser_kwargs={
                "parser_mode": "omegaconf",
                "description": TRAIN_USAGE,
                "fit": {"description": TRAIN_DESCRIPTION},
            },
            parser_class=ProjectParser,
            seed_everything_default=42,  # the paper's first seed
            # The schedule is the module's (AdamW, warmup + linear decay); --optimizer would silently replace it.
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )
        if run and cli.subcommand == "fit" and cli.trainer.is_global_zero:
            print(train_summary(cli.trainer), flush=True)
        if run:
            finish_wandb(cli.trainer)
    return cli


def eval_main(args: ArgsType = None) -> EvalCLI:
    """Run the evaluation CLI; ``args`` replaces ``sys.argv[1:]`` when given (tests pass a list)."""
    setup_logging()
    with restored_env(WANDB_FOLDERS), usage_errors("evaluate.py"), hidden_host_argv(args):
        cli = EvalCLI(
            InjectionEvalModule,
            MultiHopQADataModule,
            parser_kwargs={
                "parser_mode": "omegaconf",
                "description": EVAL_USAGE,
                "test": {"description": EVAL_DESCRIPTION},
            },
            parser_class=ProjectParser,
            trainer_class=EvalTrainer,
            save_config_callback=LoggerSaveConfigCallback,
            seed_everything_default=0,
            auto_configure_optimizers=False,  # nothing is optimized in an evaluation
            args=args,
        )
        # Close the W&B run: a later CLI in the same process (the demo, tests) would otherwise log into this one.
        finish_wandb(cli.trainer)
    return cli
