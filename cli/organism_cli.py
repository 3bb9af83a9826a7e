"""LightningCLI that trains an offline model organism and exports it in Hugging Face format.

Usage: ``python organism.py fit -c configs/organisms/receiver.yaml --export_dir /tmp/receiver``. The export
(``save_pretrained`` model and tokenizer) loads by path through ``load_model`` / ``load_tokenizer``; most callers use
``cli.organisms.ensure_organism``, which caches the export by a hash of the config.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pytorch_lightning.cli import ArgsType, LightningCLI

from activation_transfer.errors import UsageError
from cli.fast_start import USAGES
from cli.parser import ProjectParser, usage_errors
from datamodules.organism_text import OrganismTextDataModule
from lightning_modules.causal_lm import CausalLMModule

log = logging.getLogger(__name__)


class OrganismCLI(LightningCLI):
    """Links the tokenizer's vocabulary into the model and exports the trained model after ``fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        if isinstance(parser, ProjectParser):  # its short --help lists these classes' options
            parser.classes.update(model=self.model_class, data=self.datamodule_class)
        # The vocabulary size is a property of the loaded tokenizer, so it is linked at instantiation time.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="Folder that receives the trained model and tokenizer (save_pretrained) after fit.",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI parses a checkpoint's hparams over the config, so `fit --ckpt_path` silently trained on with
        # the saved options instead of the given ones; here, as in train.py, the config builds the module and
        # CausalLMModule's resume checks refuse a checkpoint whose decisive options differ. Other subcommands keep
        # Lightning's behaviour (the checkpoint's architecture, whatever the config says).
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def after_instantiate_classes(self) -> None:
        max_length = self.datamodule.hparams.max_length
        max_pos = self.model.hparams.max_position_embeddings
        if max_length > max_pos:
            raise UsageError(f"data.max_length={max_length} exceeds model.max_position_embeddings={max_pos}")

    def before_fit(self) -> None:
        check_export_dir(self.config[self.subcommand].get("export_dir"))

    def after_fit(self) -> None:
        export_dir = self.config[self.subcommand].get("export_dir")
        if export_dir and self.trainer.is_global_zero:
            self.model.export(export_dir, self.datamodule.tokenizer)
            log.info("exported the organism to %s", export_dir)


def check_export_dir(export_dir: str | None) -> None:
    """``--export_dir`` must be a folder that can be made and written: found only at the export, after training
    (the recipes keep no checkpoint), it was a traceback that lost the trained model. Nothing is created here."""
    if not export_dir:
        return
    path = Path(export_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # the root always exists
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be made ({existing} is a file)"
        raise UsageError(f"--export_dir {export_dir} {what}; name a folder (it is created if absent)")
    try:  # a real write (os.access says yes to root everywhere, and /proc refuses anyway): a folder made and removed
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise UsageError(
            f"--export_dir {export_dir}: cannot write in {existing} ({err.strerror}); pick a writable folder"
        ) from None


def cli_kwargs() -> dict:
    """Arguments of every ``OrganismCLI`` (shared with the parse-only use in ``cli.organisms``)."""
    return dict(
        model_class=CausalLMModule,
        datamodule_class=OrganismTextDataModule,
        parser_kwargs={"parser_mode": "omegaconf", "description": USAGES["organism.py"][0]},
        # One-line errors (exit 2) and a short --help, as train.py and evaluate.py.
        parser_class=ProjectParser,
        # Each organism trains into its own folder, but reruns into the same folder must not abort.
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


def main(args: ArgsType = None) -> OrganismCLI:
    """Run the organism CLI (``fit``/``validate``/...); ``args`` replaces ``sys.argv[1:]`` when given. Bad input is
    one line and exit status 2, as in ``train.py`` and ``evaluate.py``."""
    with usage_errors("organism.py"):
        return OrganismCLI(**cli_kwargs(), args=args)


if __name__ == "__main__":
    main()
