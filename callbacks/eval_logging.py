"""W&B logging of an injection evaluation: lineage, metric and per-sample tables, report tables, plots, results.

Works with any logger that has ``log_table``/``log_image`` (``WandbLogger``); other loggers get the summary metrics
through ``self.log`` in the module only, as ``eval/<condition>/<metric>`` (:func:`grouped_metrics`: one chart section
per condition). At the start of the test epoch, on global rank 0, the W&B run becomes the run folder's (a resumed
evaluation resumes it) and each local translator is recorded as a used ``model`` reference artifact. At the end:

- ``eval/metrics``: one row per condition x seed x metric with that run's accuracy (the seeds behind the summary);
- ``eval/samples``: one row per sample x condition x seed (long format: filter or group by ``condition`` in W&B);
- ``eval/tables/{summary,comparisons,equivalence}``: the report's tables (``<run folder>/report/*.json``);
- ``eval/by_condition`` and ``eval/report``: the accuracy plot and the report's figures;
- an ``eval_results`` artifact with the records, ``meta.json``, ``config.yaml`` and ``report/``, online and offline
  (``wandb sync`` uploads it with the run); a disabled run logs none.

A rerun logs only what the run folder's W&B run does not hold yet (:mod:`callbacks.wandb_ledger`): a finished
evaluation run again logs nothing and prints one line saying so.

No key starts with ``_``: W&B reserves those names (``_step``, ``_runtime``, ``_timestamp``, ``_wandb``).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from activation_transfer.errors import UsageError
from activation_transfer.report import accuracy_figure, accuracy_summary
from activation_transfer.report.tables import SUMMARY_COLUMNS, summary_rows
from activation_transfer.task.scoring import METRICS
from activation_transfer.translators.loading import is_wandb_ref
from callbacks.wandb_artifacts import bind_run_to_folder, files_artifact, recording_loggers, use_local_translator
from callbacks.wandb_ledger import folder_digest, ledger_of

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("sample_id", "condition", "seed", "question", "gold", "prediction", "hops", *METRICS)
METRIC_COLUMNS = ("condition", "seed", "metric", "value", "n")
REPORT_TABLES = ("summary", "comparisons", "equivalence")


def grouped_metrics(summary_metrics: dict[str, float]) -> dict[str, float]:
    """``eval/<metric>/condition=<c>`` (the report's :func:`~activation_transfer.report.logged_metrics`) as
    ``eval/<c>/<metric>``: W&B sections and filters charts by key prefix, so each condition's metrics stay together."""
    out = {}
    for key, value in summary_metrics.items():
        head, sep, condition = key.partition("/condition=")
        stage, _, metric = head.partition("/")
        out[f"{stage}/{condition}/{metric}" if sep else key] = value
    return out


def metric_table(results: dict[str, list[dict]]) -> tuple[list[str], list[list]]:
    """One row per condition x seed x metric: that run's accuracy over its records (stored scores) and its n."""
    rows = []
    for key in sorted(results):
        recs = results[key]
        if not recs:
            continue
        for m in METRICS:
            value = sum(bool(r["metrics"][m]) for r in recs) / len(recs)
            rows.append([recs[0]["condition"], recs[0]["seed"], m, value, len(recs)])
    return list(METRIC_COLUMNS), rows


def sample_table(results: dict[str, list[dict]], samples_by_id: dict) -> tuple[list[str], list[list]]:
    """One row per record (sample x condition x seed) with the columns of ``SAMPLE_COLUMNS``.

    Samples a strict run dropped simply have no row for that run. Rows are ordered by run key, then sample id.
    """
    rows = []
    for key in sorted(results):
        for rec in sorted(results[key], key=lambda r: r["sample_id"]):
            question = getattr(samples_by_id.get(rec["sample_id"]), "question", None)
            rows.append(
                [
                    rec["sample_id"],
                    rec["condition"],
                    rec["seed"],
                    question,
                    rec["gold"],
                    rec["prediction"],
                    rec.get("hops"),
                ]
                + [bool(rec["metrics"][m]) for m in METRICS]
            )
    return list(SAMPLE_COLUMNS), rows


def _cell(value):
    """A W&B table cell: lists and dicts as JSON text, the CSV's empty string as a missing value."""
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return None if value == "" else value


def _table(rows: list[dict], columns: list[str] | None = None) -> tuple[list[str], list[list]]:
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    return columns, [[_cell(row.get(c)) for c in columns] for row in rows]


def report_tables(report_dir: str | Path) -> dict[str, tuple[list[str], list[list]]]:
    """The report's tables read from ``summary.json``, ``comparisons.json`` and ``equivalence.json``.

    Returns ``{name: (columns, rows)}`` for each file present and non-empty (no baseline, no comparisons).
    """
    out = {}
    for name in REPORT_TABLES:
        path = Path(report_dir) / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        columns, rows = _table(summary_rows(data), list(SUMMARY_COLUMNS)) if name == "summary" else _table(data)
        if rows:
            out[name] = (columns, rows)
    return out


def accuracy_plot(results: dict[str, list[dict]], report=None):
    """The report's accuracy figure (per-condition mean, pooled 95% CI, per-run dots); the caller closes it.

    Args:
        results: ``{run_key: [records]}`` of the evaluation.
        report: The evaluation's ``ReportResult``, whose summary is plotted as is; ``None`` (no baseline, so no
            report) summarises ``results`` here.
    """
    summary = report.summary if report is not None else accuracy_summary([r for rs in results.values() for r in rs])
    return accuracy_figure(summary)


class EvalLoggingCallback(pl.Callback):
    """Log the evaluation's tables, plots and results artifact to W&B-like loggers at the end of ``test``.

    Args:
        table_key: Key of the per-sample table.
        metrics_key: Key of the per-run metric table.
        plot_key: Key of the per-condition accuracy plot.
        tables_prefix: Prefix of the report's tables' keys (``<prefix>/summary``, ...).
        artifact_type: W&B artifact type of the results (records, meta, report).
    """

    def __init__(
        self,
        table_key: str = "eval/samples",
        metrics_key: str = "eval/metrics",
        plot_key: str = "eval/by_condition",
        tables_prefix: str = "eval/tables",
        artifact_type: str = "eval_results",
    ) -> None:
        for key in (table_key, metrics_key, plot_key, tables_prefix):
            if any(part.startswith("_") for part in key.split("/")):
                raise UsageError(f"W&B reserves names starting with '_': choose another key than {key!r}")
        self.table_key, self.metrics_key, self.plot_key, self.tables_prefix = (
            table_key,
            metrics_key,
            plot_key,
            tables_prefix,
        )
        self.artifact_type = artifact_type
        self.logged: list[str] = []

    @rank_zero_only
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        """Make the W&B run the run folder's, and record each local translator as a used reference artifact.

        Reads ``run_dir``, ``translator_info`` and ``functional_info`` (``path``, ``ref``, ``sha256`` per translator);
        a ``wandb:`` reference was already used when it was downloaded.
        """
        if getattr(pl_module, "run_dir", None) is not None:
            bind_run_to_folder(trainer, pl_module.run_dir)
        runs = recording_loggers(trainer)
        for kind, infos in (("aligned", "translator_info"), ("functional", "functional_info")):
            for info in getattr(pl_module, infos, []):
                if is_wandb_ref(str(info["ref"])):
                    continue
                name = f"translator-{info['sha256'][:12]}"
                for logger, run in runs:
                    use = functools.partial(use_local_translator, run, info["path"], info["sha256"], kind)
                    if ledger_of(logger).once(f"uses/{name}", info["sha256"], use):  # the resumed run used it
                        self.logged.append(f"uses {name}")

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module) -> None:
        """Log from an ``InjectionEvalModule``'s public results.

        Reads ``results``, ``samples_by_id``, ``summary_metrics``, ``report_result`` and ``run_dir``.
        """
        results = pl_module.results
        if not results:
            return
        run_dir = Path(pl_module.run_dir) if pl_module.run_dir is not None else None
        tables = {
            self.metrics_key: metric_table(results),
            self.table_key: sample_table(results, pl_module.samples_by_id),
        }
        # Only a report this invocation wrote: one without a baseline skips it, and the report/ an earlier invocation
        # left in the run folder would be logged as this one's.
        if run_dir is not None and pl_module.report_result is not None:
            tables |= {f"{self.tables_prefix}/{k}": v for k, v in report_tables(run_dir / "report").items()}
        loggers = [logger for logger in trainer.loggers if hasattr(logger, "log_table")]
        for logger in loggers:
            for key, (columns, rows) in tables.items():
                logger.log_table(key=key, columns=columns, data=rows)  # a W&B run that holds it logs nothing
                self.logged.append(key)
            self._log_plots(logger, results, pl_module.report_result)
        runs = recording_loggers(trainer)
        if runs and run_dir is not None:
            self._log_artifact(runs, run_dir, grouped_metrics(getattr(pl_module, "summary_metrics", {})))
        for line in filter(None, (ledger_of(logger).summary() for logger in loggers)):
            print(line, flush=True)

    def _log_plots(self, logger, results, report) -> None:
        fig = accuracy_plot(results, report)
        try:
            logger.log_image(key=self.plot_key, images=[fig])
            self.logged.append(self.plot_key)
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
        # One key per figure: W&B stacks the images of one key and, when their sizes differ, warns through the root
        # logger, which installs a root handler that prints every later line twice.
        for png in sorted(Path(p) for p in (report.files.values() if report else []) if str(p).endswith(".png")):
            key = f"eval/report/{png.stem}"
            logger.log_image(key=key, images=[str(png)])
            self.logged.append(key)

    def _log_artifact(self, runs: list[tuple], run_dir: Path, metrics: dict) -> None:
        """Log the results artifact to each ``(logger, run)`` whose run does not hold this content yet: a rerun
        changes ``meta.json``'s invocations and perhaps ``config.yaml`` (a batch size), no result, so those two
        files are not part of the digest and a new version comes only with new records or a new report."""
        files = {name: run_dir / name for name in ("meta.json", "config.yaml")}
        folders = {name: run_dir / name for name in ("records", "report")}
        art = None  # built only when a run needs it: building one stages a copy of every file

        def log(run) -> None:
            nonlocal art
            art = art or files_artifact(f"{run_dir.name}-results", self.artifact_type, files, folders, metrics)
            run.log_artifact(art)

        digest = folder_digest(run_dir, tuple(folders), ("meta.json",))
        for logger, run in runs:
            if ledger_of(logger).once(f"artifact/{self.artifact_type}", digest, lambda r=run: log(r)):
                self.logged.append("artifact")
