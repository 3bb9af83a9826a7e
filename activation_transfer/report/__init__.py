"""Per-sample records -> the paper's tables, paired CIs, permutation/McNemar tests, TOST and plots (docs/NOTES.md).

Torch-free (numpy, scipy, matplotlib on first plot), so ``report.py`` starts fast and runs anywhere. The pipeline:
``load`` (parse, re-score, group), ``protocol`` (which protocol the run folders recorded) -> ``stats`` (the paper's
pooled figures), ``clustered`` (questions as units: the primary CI and p), ``tost``, ``gap`` -> ``analysis`` (the
rows) -> ``tables``, ``plots``, ``split_plots``; :func:`run.run_report` is the one entry point (``report.py``, the
evaluation module).
"""

from activation_transfer.report.analysis import (
    DEFAULT_TOST_RESAMPLES,
    METRIC_ORDER,
    build_comparisons,
    build_summary,
    condition_accuracy,
)
from activation_transfer.report.clustered import DEFAULT_PERMUTATIONS, question_bootstrap_ci, sign_flip_p
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
from activation_transfer.report.protocol import input_protocol
from activation_transfer.report.run import (
    DEFAULT_BASELINES,
    REPORT_SCHEMA,
    ReportResult,
    accuracy_summary,
    checked_resamples,
    logged_metrics,
    run_report,
)
from activation_transfer.report.split_plots import plot_gap, plot_layer_sweep
from activation_transfer.report.stats import DEFAULT_RESAMPLES
from activation_transfer.report.tables import (
    METRIC_LABELS,
    comparisons_markdown,
    equivalence_markdown,
    summary_markdown,
)
from activation_transfer.report.tost import DEFAULT_MARGINS

__all__ = [
    "DEFAULT_BASELINES",
    "DEFAULT_MARGINS",
    "DEFAULT_PERMUTATIONS",
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
    "checked_resamples",
    "collapse_repeated_runs",
    "comparisons_markdown",
    "condition_accuracy",
    "equivalence_markdown",
    "gap_recovered",
    "group_records",
    "input_protocol",
    "load_records",
    "logged_metrics",
    "plot_accuracy",
    "plot_forest",
    "plot_gap",
    "plot_layer_sweep",
    "question_bootstrap_ci",
    "run_report",
    "sign_flip_p",
    "summary_markdown",
]
