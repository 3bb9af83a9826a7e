"""Explore an evaluation run folder: its records as a pandas DataFrame, one comparison plotted, one translator used.

    python examples/explore_run.py runs/demo/eval/eval-<hash> --plot accuracy_by_condition.png

1. The run's per-sample records (``records/*.jsonl``) become a DataFrame (``records_to_dataframe``, the report
   package's loader; pandas comes with ``pip install -e .[analysis]``); the accuracy of each condition is printed,
   pooled over its seeds' records.
2. One comparison is plotted with matplotlib: each condition's accuracy against the first baseline the run has
   (``no_inject`` for the paper protocol, ``receiver_alone`` for the split one), saved to ``--plot``.
3. The run's first translator (``meta.json`` names each one, seed order) is read with the library's loader
   (``load_translator``) and translates one sender vector.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINES = ("no_inject", "receiver_alone")


def condition_accuracy(frame, metric: str):
    """Accuracy of each condition over all its records (every seed pooled), with its record count; highest first."""
    grouped = frame.groupby("condition")[metric]
    table = grouped.mean().to_frame("accuracy").join(grouped.size().to_frame("records"))
    return table.sort_values("accuracy", ascending=False)


def plot_comparison(table, baseline: str | None, metric: str, path: Path) -> None:
    """Horizontal bars of each condition's accuracy, the baseline's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(table) + 1.2))
    ax.barh(table.index[::-1], table["accuracy"][::-1], color="tab:blue")
    if baseline is not None:
        ax.axvline(table.loc[baseline, "accuracy"], color="black", ls="--", lw=1, label=f"{baseline} (baseline)")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{metric} (seeds pooled)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def translate_one(run_dir: Path) -> None:
    """Load the run's first translator with the library's loader and translate one sender vector."""
    import torch

    from activation_transfer.errors import UsageError
    from activation_transfer.translators.loading import load_translator

    meta = run_dir / "meta.json"
    try:
        infos = json.loads(meta.read_text()).get("translators") or []
    except json.JSONDecodeError as err:  # its message alone names neither the file nor the fix
        raise UsageError(f"{meta}: not valid JSON ({err.msg}); is {run_dir} a finished evaluation run?") from err
    if not infos:
        print("no translator in this run (no translator condition was evaluated)")
        return
    translator = load_translator(infos[0]["path"])
    h = torch.ones(translator.hparams["sender_dim"])  # any sender block output; normalized by translate()
    out = translator.translate(h)
    sender, receiver = (translator.hparams[role]["name"] for role in ("sender", "receiver"))
    print(f"translator: {infos[0]['path']} ({translator.kind}, {sender} -> {receiver})")
    print(f"translated vector: {tuple(h.shape)} -> {tuple(out.shape)}, norm {out.norm().item():.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an evaluation run folder (evaluate.py prints it)")
    parser.add_argument("--plot", type=Path, required=True, help="where to save the comparison figure (.png)")
    parser.add_argument("--metric", default="word_boundary_contains", help="the metric to compare")
    args = parser.parse_args(argv)

    from activation_transfer.errors import debug_enabled, one_line
    from activation_transfer.report.frame import records_to_dataframe
    from activation_transfer.task.scoring import METRICS

    if args.metric not in METRICS:
        parser.error(f"--metric {args.metric}: not a metric of the records; one of {', '.join(METRICS)}")

    def input_error(err: Exception):
        # A folder that is not a run, a torn record line or a bad translator is bad input, not a bug: one line and
        # exit 2 like the project's CLIs (ACTIVATION_TRANSFER_DEBUG=1 shows the traceback).
        if debug_enabled():
            raise err
        parser.exit(2, f"{parser.prog}: error: {one_line(err)}\n")

    try:
        # UsageError/MissingInput are ValueErrors, and read_records names the file and line in a plain ValueError.
        frame = records_to_dataframe(args.run_dir)
    except (ValueError, OSError) as err:
        input_error(err)
    print(f"{len(frame)} records, {frame['condition'].nunique()} conditions, columns: {', '.join(frame.columns)}")
    table = condition_accuracy(frame, args.metric)
    for condition, row in table.iterrows():
        print(f"{condition:<40} {args.metric} {row['accuracy']:.4f} ({int(row['records'])} records)")
    baseline = next((b for b in BASELINES if b in table.index), None)
    plot_comparison(table, baseline, args.metric, args.plot)
    print(f"figure: {args.plot}")
    try:
        translate_one(args.run_dir)
    except (ValueError, OSError) as err:
        input_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
