"""What the commands say: the project's log lines without upstream noise, and where the results are at the end.

A user should not have to search ``<save_dir>/<project>/<run id>/`` for a checkpoint or read Lightning's truncated
55-row metrics table: ``train.py`` ends with the best checkpoint, its validation metrics and the exported translator
folder; ``evaluate.py`` with the per-condition summary table and the run and report folders.
"""

from __future__ import annotations

import logging
import warnings

from pytorch_lightning.callbacks import ModelCheckpoint

from activation_transfer.task.scoring import MAIN_METRIC
from callbacks.model_artifact import TranslatorArtifactCallback

# Every top-level package of the project that logs.
PROJECT_LOGGERS = ("activation_transfer", "datamodules", "lightning_modules", "callbacks", "cli")


# Lightning 2.6 advertises its cloud products through rank_zero_info: "try installing litlogger" on every Trainer,
# and, when a Trainer adds its default ModelCheckpoint (every evaluation), "try installing litmodels"
# (trainer/connectors/callback_connector.py, _maybe_show_litmodels_tip). Lightning has no switch for either.
ADVERTISED = ("litlogger", "litmodels")


class _DropAdvertisement(logging.Filter):
    """Drop Lightning's package advertisements (:data:`ADVERTISED`): not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(name in message for name in ADVERTISED)


def setup_logging() -> None:
    """Show this project's INFO lines (activation cache hit/miss/rebuild, progress, config paths) on the console
    once, and drop upstream noise that says nothing about the run."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        # Printed once, by the handler above: a root handler installed by someone else (wandb's logging.warning
        # calls basicConfig) must not print every project line a second time.
        logger.propagate = False
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisement) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertisement())
    # PL 2.6.6 on torch >= 2.13 calls a deprecated pytree check on every fit (fixed upstream after 2.6.6), and
    # WandbLogger always passes `anonymous`, which wandb 0.31 says has no effect: both harmless, both every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).* is deprecated")
    warnings.filterwarnings("ignore", message="The anonymous setting has no effect")
    # transformers 5 draws a "Loading weights" bar for every model it loads (two per evaluation, four per demo
    # step), which says nothing for the project's small models and clutters logs with carriage returns.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _value(v) -> str:
    try:
        return f"{float(v):.4f}"
    except (TypeError, ValueError):
        return str(v)


def train_summary(trainer) -> str:
    """The end of ``train.py fit``: best checkpoint (and its score), validation metrics, exported folder."""
    lines = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
            score = "" if cb.best_model_score is None else f" ({cb.monitor} {_value(cb.best_model_score)})"
            lines.append(f"best checkpoint: {cb.best_model_path}{score}")
            if cb.last_model_path:
                lines.append(f"last checkpoint: {cb.last_model_path} (resume with --ckpt_path last)")
    val = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if val:
        lines.append("validation (last epoch): " + ", ".join(f"{k} {_value(v)}" for k, v in sorted(val.items())))
    for cb in trainer.callbacks:
        if isinstance(cb, TranslatorArtifactCallback) and cb.exported is not None:
            lines.append(f"exported translator (from_pretrained / --model.translator_ckpt): {cb.exported}")
    return "\n".join(lines) if lines else "no checkpoint was saved (no validation ran?)"


def eval_summary(module) -> str:
    """The end of ``evaluate.py test``: the per-condition table (the report's, with runs and n) and the folders."""
    lines = [f"run folder: {module.run_dir}"]
    for key, records in module.results.items():  # one line per condition x seed, with its generation time
        acc = sum(bool(r["metrics"][MAIN_METRIC]) for r in records) / max(len(records), 1)
        seconds = module.timing_by_run.get(key)
        spent = "reused from an earlier invocation" if seconds is None else f"{seconds:.1f} s generating"
        lines.append(f"  {key}: {MAIN_METRIC} {acc:.4f} on {len(records)} samples ({spent})")
    report = module.report_result
    if report is not None:
        lines += [report.markdown.rstrip(), f"report (tables, CIs, plots): {report.files['summary_json'].parent}"]
    else:  # no baseline condition in the run: no report, so the logged per-condition accuracies
        prefix = f"eval/{MAIN_METRIC}/condition="
        rows = [(k[len(prefix) :], v) for k, v in module.summary_metrics.items() if k.startswith(prefix)]
        lines += [f"| Condition | {MAIN_METRIC} |", "| --- | ---: |"] + [f"| {c} | {v:.4f} |" for c, v in rows]
    return "\n".join(lines)
