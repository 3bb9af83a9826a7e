"""Report: per-sample records -> tables, paired CIs and tests, TOST and plots (docs/NOTES.md "Report").

Usage::

    python report.py RESULTS... --out DIR [--baseline no_inject --baseline nl_relay] [--resamples 5000]
        [--permutations 10000] [--margins 0.05 0.03] [--seed 0] [--intersect] [--debug]

RESULTS are per-sample JSONL files, the paper's JSON result files, folders of them, or evaluation run folders (of one
protocol: run folders of the paper and split protocols together are refused; report each separately). Bad input
exits with status 2 and one line naming the file, record or option at fault (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from activation_transfer.report import (
    DEFAULT_MARGINS,
    DEFAULT_PERMUTATIONS,
    DEFAULT_RESAMPLES,
    ReportInputError,
    run_report,
)


def build_parser() -> argparse.ArgumentParser:
    """The report's fixed command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", nargs="+", help="per-sample JSONL/JSON files, folders of them, or evaluation run folders"
    )
    parser.add_argument("--out", required=True, help="output folder (created; not a file)")
    parser.add_argument(
        "--baseline",
        action="append",
        default=None,
        help="baseline condition (repeatable); default: the recorded protocol's (paper: no_inject and nl_relay; split: "
        "receiver_alone and skyline), skipping an absent one",
    )
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples (default 5000)")
    parser.add_argument(
        "--permutations",
        type=int,
        default=DEFAULT_PERMUTATIONS,
        help=f"random sign flips of each permutation test (default {DEFAULT_PERMUTATIONS})",
    )
    parser.add_argument(
        "--margins",
        type=float,
        nargs="+",
        default=list(DEFAULT_MARGINS),
        help="TOST equivalence margins in accuracy units, each in (0, 1) (default 0.05 0.03)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base bootstrap seed (default 0)")
    parser.add_argument(
        "--intersect",
        action="store_true",
        help="compare only sample ids common to a condition and its baseline, reporting how many were dropped",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run the report and print the summary table and output folder.

    Args:
        args: Command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        0 on success (bad input exits with status 2 and a one-line error).
    """
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        result = run_report(
            ns.results,
            ns.out,
            baselines=ns.baseline,
            resamples=ns.resamples,
            margins=ns.margins,
            seed=ns.seed,
            intersect=ns.intersect,
            permutations=ns.permutations,
        )
    except (ReportInputError, ValueError, OSError) as err:
        if ns.debug:
            raise
        parser.exit(2, f"report.py: error: {err}\n")
    print(result.markdown)
    print(result.comparisons_markdown)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {len(result.files)} files to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
