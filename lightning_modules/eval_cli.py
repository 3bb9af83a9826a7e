"""``evaluate.py``: a LightningCLI restricted to ``test`` that runs :class:`InjectionEvalModule` (STYLE.md 2.6).

Usage (configs after the subcommand)::

    python evaluate.py test -c configs/eval/tiny.yaml --model.translator_ckpt runs/tiny/.../best.ckpt

The translator is ``--model.translator_ckpt``, never the subcommand's ``--ckpt_path`` (that one would try to restore
the evaluation module itself and is refused here). ``--print_config`` parses and prints without loading any model.
The run folder is printed and holds records, ``config.yaml``, ``meta.json`` and ``report/``; rerunning the same
command resumes it.
"""

from __future__ import annotations

from pytorch_lightning.cli import ArgsType, LightningCLI

from callbacks.save_config import LoggerSaveConfigCallback
from datamodules.multihop_qa import MultiHopQADataModule
from lightning_modules.injection_eval import InjectionEvalModule
from lightning_modules.train_cli import finish_wandb


class EvalCLI(LightningCLI):
    """Only the ``test`` subcommand; the resolved config also goes into the evaluation's run folder."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule"}}

    def _parse_ckpt_path(self) -> None:
        # Refuse before Lightning re-parses the checkpoint's hparams over this module's config (a translator's
        # hparams do not fit InjectionEvalModule and would fail with an obscure parse error).
        if self.config.get("subcommand") and self.config[self.config.subcommand].get("ckpt_path"):
            raise ValueError(
                "evaluate.py does not take --ckpt_path: pass the translator checkpoint as --model.translator_ckpt"
            )

    def before_test(self) -> None:
        self.model.resolved_config = self._parser("test").dump(self.config["test"], skip_none=False)


def main(args: ArgsType = None) -> EvalCLI:
    """Run the evaluation CLI; ``args`` replaces ``sys.argv[1:]`` when given (tests pass a list)."""
    cli = EvalCLI(
        InjectionEvalModule,
        MultiHopQADataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=LoggerSaveConfigCallback,
        seed_everything_default=0,
        args=args,
    )
    # Close the W&B run: a later CLI in the same process (the demo, tests) would otherwise log into this one.
    finish_wandb(cli.trainer)
    return cli
