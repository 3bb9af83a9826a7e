"""Training entry point: ``python train.py fit -c configs/train/tiny.yaml`` (configs go after the subcommand).

The data module's hidden sizes and model identities are read from the activation store manifest and linked into
the TranslatorModule at instantiation time, so a config never states them; ``--print_config`` exits before
instantiation and therefore loads no model and extracts nothing.
"""

from __future__ import annotations

import logging

from pytorch_lightning.cli import ArgsType, LightningCLI

from callbacks.save_config import LoggerSaveConfigCallback
from datamodules.activation_pairs import ActivationPairDataModule, RecordPairIndices  # noqa: F401 (short class_path)
from lightning_modules.components.translators import LinearTranslator, MLPTranslator  # noqa: F401 (short class_path)
from lightning_modules.translator import TranslatorModule


class TrainCLI(LightningCLI):
    """LightningCLI for TranslatorModule + ActivationPairDataModule with the store-derived values linked."""

    def add_arguments_to_parser(self, parser) -> None:
        for src, dst in (
            ("data.sender_dim", "model.sender_dim"),
            ("data.receiver_dim", "model.receiver_dim"),
            ("data.sender_identity", "model.sender"),
            ("data.receiver_identity", "model.receiver"),
        ):
            parser.link_arguments(src, dst, apply_on="instantiate")


def setup_logging() -> None:
    """Show this project's INFO lines (activation cache hit/miss/rebuild, config paths) on the console once."""
    for name in ("datamodules", "lightning_modules", "callbacks"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def finish_wandb(trainer) -> None:
    """Close the W&B runs of a finished subcommand, so a next ``main()`` in the same process starts a new run
    (WandbLogger leaves its run open, and a second WandbLogger would silently log into the first run)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def main(args: ArgsType = None, run: bool = True) -> TrainCLI:
    """Build and run the training CLI.

    Args:
        args: Command-line arguments (None: ``sys.argv``), e.g. ``["fit", "-c", "configs/train/tiny.yaml"]``.
        run: Run the subcommand (False: only instantiate, for tests).
    """
    setup_logging()
    cli = TrainCLI(
        TranslatorModule,
        ActivationPairDataModule,
        save_config_callback=LoggerSaveConfigCallback,
        parser_kwargs={"parser_mode": "omegaconf"},
        seed_everything_default=0,
        args=args,
        run=run,
    )
    if run:
        finish_wandb(cli.trainer)
    return cli


if __name__ == "__main__":
    main()
