"""The report's plots (PNG, and SVG beside each): accuracy per condition with CIs, a forest plot of paired deltas.

matplotlib is imported on first use (with the headless Agg backend), so loading the report costs nothing for it.
SVG keeps its text as text (``svg.fonttype: none``), so a figure's labels can be searched and edited for a paper.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from activation_transfer.report.tables import METRIC_LABELS, _f
from activation_transfer.task.scoring import MAIN_METRIC


def pyplot():
    """matplotlib.pyplot with the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the report runs on servers and in tests
    import matplotlib.pyplot as plt

    return plt


# SVG: text as <text> elements, ids from a fixed salt and no date, so the same figure gives the same bytes.
_SVG_RC = {"svg.fonttype": "none", "svg.hashsalt": "activation-transfer"}


def _save(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    with pyplot().rc_context(_SVG_RC):
        fig.savefig(buf, format=fmt, dpi=130, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    data = _save(fig, "png")
    pyplot().close(fig)
    return data


def figure_files(fig) -> dict[str, bytes]:
    """The figure as ``{"png": bytes, "svg": bytes}`` (closed afterwards): a raster to view, a vector for a paper."""
    data = {fmt: _save(fig, fmt) for fmt in ("png", "svg")}
    pyplot().close(fig)
    return data


def baseline_line(ax, name: str, value: float, vertical: bool = True) -> None:
    """The reference line of an accuracy axis: the baseline's accuracy, labelled as such.

    Free-form multi-hop answers have no honest chance level (no candidate list: a random answerer scores about 0),
    so the line drawn is the baseline's (``no_inject`` in the paper protocol, ``receiver_alone`` in the split one).
    """
    draw = ax.axvline if vertical else ax.axhline
    draw(value, color="C2", lw=1.2, ls="-.", label=f"baseline: {name} ({value:.4f}); no chance level defined")


def accuracy_figure(summary: Mapping, metric: str = MAIN_METRIC, baseline: str | None = None):
    """Horizontal point plot of accuracy per condition with 95% CIs (``ci_low``/``ci_high``: over questions), per-run
    dots and the baseline's accuracy as a reference line.

    Args:
        summary: The content of ``summary.json`` (its ``conditions``, and ``meta.baselines`` when present).
        metric: Metric to plot.
        baseline: Condition whose accuracy is drawn as the reference line (:func:`baseline_line`); ``None``: the
            first of ``summary["meta"]["baselines"]`` when there is one, else no line.

    Returns:
        A matplotlib figure; the caller closes it.
    """
    plt = pyplot()
    conds = list(summary["conditions"])
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(conds) + 1.4))
    if not conds:  # an evaluation whose runs all came back empty
        ax.text(0.5, 0.5, "no records to plot", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    runs_labelled = False  # label the per-run markers once in the legend
    for y, cond in enumerate(conds):
        v = summary["conditions"][cond][metric]
        mean = float(np.mean(list(v["per_run"].values())))
        ax.errorbar(
            mean,
            y,
            # A percentile CI need not contain its point; an error bar cannot be negative.
            xerr=[[max(0.0, mean - v["ci_low"])], [max(0.0, v["ci_high"] - mean)]],
            fmt="o",
            color="C0",
            ecolor="C0",
            capsize=3,
            markersize=6,
            label="mean, 95% CI (bootstrap over questions)" if y == 0 else None,
        )
        if len(v["per_run"]) > 1:
            ax.plot(
                list(v["per_run"].values()),
                [y] * len(v["per_run"]),
                "x",
                color="0.35",
                markersize=5,
                label=None if runs_labelled else "single run",
            )
            runs_labelled = True
        # The value printed beside the CI saves reading it off the axis.
        ax.annotate(
            f"{mean:.4f}", (v["ci_high"], y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8
        )
    if baseline is None:
        baseline = next(iter(summary.get("meta", {}).get("baselines", [])), None)
    if baseline in summary["conditions"]:
        baseline_line(ax, baseline, summary["conditions"][baseline][metric]["mean"])
    ax.set_yticks(range(len(conds)))
    ax.set_yticklabels(
        [
            f"{c} (runs={summary['conditions'][c]['runs']})"
            # Runs over different questions cannot be resampled by question: say how that row's CI resampled.
            + {"pooled": ", pooled CI", "run": ", CI per run"}.get(summary["conditions"][c][metric].get("ci_unit"), "")
            for c in conds
        ]
    )
    ax.set_ylim(len(conds) - 0.4, -0.6)  # top-down in report order, half a row of air at both ends
    ax.set_xlim(0, max(summary["conditions"][c][metric]["ci_high"] for c in conds) * 1.15 + 1e-3)
    ax.set_xlabel(f"{METRIC_LABELS[metric]} accuracy")
    ax.set_title(f"Accuracy per condition ({metric})")
    ax.grid(axis="x", alpha=0.3)
    # Legend below the axes so it never covers a condition's row.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / (len(conds) + 2)), ncol=2, fontsize=8)
    return fig


def plot_accuracy(summary: Mapping, metric: str = MAIN_METRIC) -> dict[str, bytes]:
    """:func:`accuracy_figure` as ``{"png": ..., "svg": ...}`` (``accuracy.png``/``.svg``).

    Args:
        summary: The content of ``summary.json``.
        metric: Metric to plot.
    """
    return figure_files(accuracy_figure(summary, metric))


def plot_forest(
    comparisons: Sequence[Mapping],
    baselines: Sequence[str],
    metric: str = MAIN_METRIC,
    margins: Sequence[float] = (),
) -> dict[str, bytes]:
    """Forest plot of paired deltas with question-clustered 95% CIs, one panel per baseline (PNG and SVG).

    A zero line, and a shaded band ``(-margin, +margin)`` per TOST margin: a CI inside a band is what equivalence at
    that margin needs (the TOST itself, with its 90% CI, is in ``equivalence.md``).

    Args:
        comparisons: The content of ``comparisons.json``.
        baselines: Baselines (one panel each).
        metric: Metric to plot.
        margins: TOST equivalence margins to shade.
    """
    plt = pyplot()
    panels = [b for b in baselines if any(c["baseline"] == b and c["metric"] == metric for c in comparisons)]
    conds = list(dict.fromkeys(c["condition"] for c in comparisons if c["metric"] == metric))
    width = 5.0 * max(1, len(panels)) + 1.5
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(width, 0.45 * len(conds) + 1.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, base in zip(axes, panels):
        rows = {c["condition"]: c for c in comparisons if c["baseline"] == base and c["metric"] == metric}
        for y, cond in enumerate(conds):
            c = rows.get(cond)
            if c is None:
                continue
            excludes_zero = c["ci_low"] > 0 or c["ci_high"] < 0
            color = "C3" if excludes_zero else "C0"
            ax.errorbar(
                c["delta"],
                y,
                xerr=[[max(0.0, c["delta"] - c["ci_low"])], [max(0.0, c["ci_high"] - c["delta"])]],
                fmt="s",
                color=color,
                ecolor=color,
                capsize=3,
                markersize=5,
            )
            ax.annotate(
                # The table's numbers (tables._f): a zero is printed unsigned, never "+0.0000".
                f"{_f(c['delta'], True)} [{_f(c['ci_low'], True)}, {_f(c['ci_high'], True)}]",
                (c["delta"], y),
                xytext=(0, 7),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color=color,
                # A translucent box keeps the numbers legible where they cross the zero line or grid.
                bbox={"fc": "white", "ec": "none", "alpha": 0.75, "pad": 0.5},
            )
        ax.axvline(0.0, color="k", lw=1, ls="--")
        for i, margin in enumerate(sorted(margins, reverse=True)):
            ax.axvspan(-margin, margin, color="C2", alpha=0.08 + 0.06 * i, lw=0, label=f"TOST margin ±{margin:g}")
        if margins:
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(f"vs {base}")
        ax.set_xlabel(f"Δ {METRIC_LABELS[metric]} (paired, 95% CI over questions)")
        ax.grid(axis="x", alpha=0.3)
    if panels:
        axes[0].set_yticks(range(len(conds)))
        axes[0].set_yticklabels(conds)
        axes[0].set_ylim(len(conds) - 0.4, -0.7)  # shared y: top-down in report order, room for the labels
    else:
        # Only baselines in the input: say so instead of drawing a blank frame.
        axes[0].text(
            0.5, 0.5, "no conditions to compare with a baseline", ha="center", va="center", transform=axes[0].transAxes
        )
        axes[0].set_axis_off()
    fig.suptitle("Paired deltas against each baseline (red: CI excludes 0)", fontsize=10)
    if panels:  # an empty figure has no room to lay out (tight_layout would warn)
        fig.tight_layout()
    return figure_files(fig)
