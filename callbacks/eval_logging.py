"""W&B logging of an injection evaluation: summary metrics, a per-sample table, an accuracy plot, the results artifact.

Works with any logger that has ``log_table``/``log_image`` (``WandbLogger``); other loggers get the summary metrics
through ``self.log`` in the module only. The artifact is logged only when the W&B run is online (never in offline or
disabled mode, where uploading is impossible). Runs on global rank 0 only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from lightning_modules.components.report import accuracy_figure, accuracy_summary
from lightning_modules.components.scoring import METRICS

log = logging.getLogger(__name__)


def sample_table(results: dict[str, list[dict]], samples_by_id: dict) -> tuple[list[str], list[list]]:
    """One row per sample: question, gold, hops, then per run (condition x seed) the answer and metric flags."""
    keys = sorted(results)
    columns = ["sample_id", "question", "gold", "hops"]
    for key in keys:
        columns += [f"{key}/answer"] + [f"{key}/{m}" for m in METRICS]
    by_run = {k: {r["sample_id"]: r for r in recs} for k, recs in results.items()}
    ids = sorted({sid for recs in by_run.values() for sid in recs})
    rows = []
    for sid in ids:
        s = samples_by_id.get(sid)
        any_rec = next(by_run[k][sid] for k in keys if sid in by_run[k])
        row = [sid, getattr(s, "question", None), any_rec["gold"], any_rec.get("hops")]
        for key in keys:
            rec = by_run[key].get(sid)  # None for samples a strict run dropped
            row += [None if rec is None else rec["prediction"]]
            row += [None if rec is None else bool(rec["metrics"][m]) for m in METRICS]
        rows.append(row)
    return columns, rows


def accuracy_plot(results: dict[str, list[dict]], report=None):
    """The report's accuracy figure (per-condition mean, pooled 95% CI, per-run dots); the caller closes it.

    Args:
        results: ``{run_key: [records]}`` of the evaluation.
        report: The evaluation's ``ReportResult``, whose summary is plotted as is; ``None`` (no baseline, so no
            report) summarises ``results`` here.
    """
    summary = report.summary if report is not None else accuracy_summary([r for rs in results.values() for r in rs])
    return accuracy_figure(summary)


def _is_online(run) -> bool:
    if run is None or getattr(run, "disabled", False):
        return False
    offline = getattr(run, "offline", None)
    if offline is None:
        settings = getattr(run, "settings", None)
        offline = getattr(settings, "_offline", True) if settings is not None else True
    return not offline


class EvalLoggingCallback(pl.Callback):
    """Log the evaluation's table, plot and (online) artifact to W&B-like loggers at the end of ``test``.

    Args:
        table_key: Key of the per-sample table.
        plot_key: Key of the per-condition accuracy plot.
        artifact_type: W&B artifact type of the results (records, meta, report).
    """

    def __init__(self, table_key: str = "eval/samples", plot_key: str = "eval/by_condition",
                 artifact_type: str = "eval_results") -> None:  # fmt: skip
        self.table_key, self.plot_key, self.artifact_type = table_key, plot_key, artifact_type
        self.logged: list[str] = []

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module) -> None:
        """Log from an ``InjectionEvalModule``'s public results.

        Reads ``results``, ``samples_by_id``, ``summary_metrics``, ``report_result`` and ``run_dir``.
        """
        results = pl_module.results
        if not results:
            return
        for logger in trainer.loggers:
            if not hasattr(logger, "log_table"):
                continue
            columns, rows = sample_table(results, pl_module.samples_by_id)
            logger.log_table(key=self.table_key, columns=columns, data=rows)
            self.logged.append(self.table_key)
            fig = accuracy_plot(results, getattr(pl_module, "report_result", None))
            try:
                logger.log_image(key=self.plot_key, images=[fig])
                self.logged.append(self.plot_key)
            finally:
                import matplotlib.pyplot as plt

                plt.close(fig)
            report = pl_module.report_result
            pngs = [p for p in (report.files.values() if report else []) if str(p).endswith(".png")]
            if pngs:
                logger.log_image(key="eval/report", images=[str(p) for p in pngs])
                self.logged.append("eval/report")
            run = getattr(logger, "experiment", None)
            if _is_online(run) and pl_module.run_dir is not None:
                self._log_artifact(run, Path(pl_module.run_dir))

    def _log_artifact(self, run, run_dir: Path) -> None:
        import wandb

        art = wandb.Artifact(name=f"{run_dir.name}-results", type=self.artifact_type)
        art.add_dir(str(run_dir / "records"), name="records")
        for name in ("meta.json", "config.yaml"):
            if (run_dir / name).exists():
                art.add_file(str(run_dir / name))
        if (run_dir / "report").is_dir():
            art.add_dir(str(run_dir / "report"), name="report")
        run.log_artifact(art)
        self.logged.append("artifact")
