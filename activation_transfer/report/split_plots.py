"""The split-context protocol's figures: the fraction of the gap recovered (the headline) and the layer sweep.

Both return ``{"png": bytes, "svg": bytes}`` (``plots.figure_files``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from activation_transfer.report.plots import figure_files, pyplot
from activation_transfer.report.tables import _f
from activation_transfer.task.scoring import MAIN_METRIC


def plot_gap(rows: Sequence[Mapping]) -> dict[str, bytes]:
    """Fraction of the floor -> ceiling gap per condition: point, question-clustered 95% CI, each run's own fraction.

    Args:
        rows: The content of ``gap_recovered.json`` (``gap.gap_recovered``); rows without a fraction are listed
            with "undefined".
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.6))
    low, high = (rows[0]["low"], rows[0]["high"]) if rows else ("floor", "ceiling")
    ax.axvline(0.0, color="0.4", lw=1, ls="--", label=f"0 = {low}")
    ax.axvline(1.0, color="k", lw=1, ls="--", label=f"1 = {high}")
    labelled: set[str] = set()
    for y, r in enumerate(rows):
        if r["fraction"] is None:
            ax.annotate("undefined", (0.0, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
            continue
        if r["ci_low"] is not None:
            label = "fraction, 95% CI (bootstrap over questions)"
            ax.errorbar(
                r["fraction"],
                y,
                # A percentile CI need not contain its point; an error bar cannot be negative.
                xerr=[[max(0.0, r["fraction"] - r["ci_low"])], [max(0.0, r["ci_high"] - r["fraction"])]],
                fmt="o",
                color="C0",
                capsize=3,
                label=None if label in labelled else label,
            )
            labelled.add(label)
        else:
            ax.plot(r["fraction"], y, "o", color="C0")
            ax.annotate(
                "CI unbounded", (r["fraction"], y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8
            )
        per_run = list(r.get("per_run", {}).values())
        if len(per_run) > 1:
            label = "one run (translator / seed)"
            ax.plot(
                per_run, [y] * len(per_run), "x", color="C3", markersize=6, label=None if label in labelled else label
            )
            labelled.add(label)
        ax.annotate(
            _f(r["fraction"], True),  # as gap_recovered.md prints it: a zero unsigned, never "+0.000"
            (r["fraction"], y),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['condition']} (runs={r['runs']})" for r in rows])
    ax.set_ylim(len(rows) - 0.4, -0.7)
    metric = rows[0]["metric"] if rows else MAIN_METRIC
    ax.set_xlabel(f"fraction of the {low} → {high} gap recovered ({metric})")
    ax.set_title("Fraction of the gap recovered (CI conditional on the runs shown)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / (len(rows) + 2)), ncol=2, fontsize=7)
    return figure_files(fig)


def plot_layer_sweep(
    rows: Sequence[Mapping],
    chosen: int,
    lines: Sequence[str] = ("slots_self", "slots_zero"),
    flat: Sequence[str] = ("receiver_alone", "skyline"),
    metric: str = MAIN_METRIC,
) -> dict[str, bytes]:
    """Accuracy per receiver block with 95% CIs; the floor and ceiling as flat lines; the chosen block marked.

    Args:
        rows: One per block: ``{"layer": int, <condition>: accuracy, "ci": {<condition>: [low, high]}}`` (``ci``
            optional: without it no error bars are drawn).
        chosen: The block the protocol goes on with (marked, and named in the legend).
        lines: Conditions drawn per block.
        flat: Conditions read off the first row and drawn as horizontal lines (they do not depend on the block).
        metric: The metric the accuracies are of (axis label).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    layers = [r["layer"] for r in rows]
    for i, cond in enumerate(lines):
        means = [r[cond] for r in rows]
        cis = [r.get("ci", {}).get(cond) for r in rows]
        if all(ci is not None for ci in cis):
            err = [[m - ci[0] for m, ci in zip(means, cis)], [ci[1] - m for m, ci in zip(means, cis)]]
            ax.errorbar(layers, means, yerr=err, fmt="o-" if i == 0 else "s--", capsize=3, label=f"{cond}, 95% CI")
        else:
            ax.plot(layers, means, "o-" if i == 0 else "s--", label=cond)
    for cond, color in zip(flat, ("0.5", "k")):
        if rows and cond in rows[0]:
            ax.axhline(rows[0][cond], color=color, lw=0.8, ls=":", label=cond)
    if rows and flat and flat[0] in rows[0]:
        ci = rows[0].get("ci", {}).get(flat[0])
        if ci is not None:
            ax.axhspan(ci[0], ci[1], color="0.5", alpha=0.12, lw=0, label=f"{flat[0]} 95% CI")
    ax.axvline(chosen, color="C2", lw=6, alpha=0.25, label=f"chosen block: {chosen}")
    ax.set_xticks(layers)
    ax.set_xlabel("receiver block written (slots)")
    ax.set_ylabel(f"{metric} (validation questions)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    return figure_files(fig)
