"""Per-sample records -> the paper's tables, paired CIs, McNemar, TOST and plots (docs/NOTES.md "Report").

Torch-free (numpy, scipy, matplotlib on first plot), so ``report.py`` starts fast and runs anywhere. Modules:

- ``load``: parse and re-score records from files, folders or dicts; group them by condition and run, counting
  runs of one computation once.
- ``stats``: bootstrap CIs, paired deltas, gained/lost, McNemar, run mean/SD, the clustered view.
- ``tost``: equivalence (TOST) and degradation tests on the clustered view.
- ``analysis``: per-condition accuracy, the summary, paired comparisons and equivalence rows.
- ``gap``: the fraction of the ``receiver_alone`` -> ``skyline`` gap a condition recovers, with a question-clustered
  bootstrap CI (split-context runs).
- ``tables``: markdown, CSV and JSON renderings.
- ``plots``: accuracy per condition and the forest plot of paired deltas.
- ``run``: :func:`run_report`, the entry point of ``report.py`` and of the evaluation module.
"""

from activation_transfer.report.analysis import (
    DEFAULT_TOST_RESAMPLES,
    METRIC_ORDER,
    build_comparisons,
    build_summary,
    condition_accuracy,
)
from activation_transfer.report.gap import gap_recovered
from activation_transfer.report.load import (
    DETERMINISTIC,
    Record,
    ReportInputError,
    RunCollapse,
    collapse_repeated_runs,
    group_records,
    load_records,
)
from activation_transfer.report.plots import accuracy_figure, plot_accuracy, plot_forest
from activation_transfer.report.run import (
    DEFAULT_BASELINES,
    REPORT_SCHEMA,
    ReportResult,
    accuracy_summary,
    logged_metrics,
    run_report,
)
from activation_transfer.report.stats import DEFAULT_RESAMPLES
from activation_transfer.report.tables import METRIC_LABELS, comparisons_markdown, summary_markdown
from activation_transfer.report.tost import DEFAULT_MARGINS

__all__ = [
    "DEFAULT_BASELINES",
    "DEFAULT_MARGINS",
    "DEFAULT_RESAMPLES",
    "DEFAULT_TOST_RESAMPLES",
    "DETERMINISTIC",
    "METRIC_LABELS",
    "METRIC_ORDER",
    "REPORT_SCHEMA",
    "Record",
    "ReportInputError",
    "ReportResult",
    "RunCollapse",
    "accuracy_figure",
    "accuracy_summary",
    "build_comparisons",
    "build_summary",
    "collapse_repeated_runs",
    "comparisons_markdown",
    "condition_accuracy",
    "gap_recovered",
    "group_records",
    "load_records",
    "logged_metrics",
    "plot_accuracy",
    "plot_forest",
    "run_report",
    "summary_markdown",
]
