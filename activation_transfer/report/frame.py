"""An evaluation run's per-sample records as a pandas DataFrame, for analysis in a notebook.

pandas is not a dependency of the project: it is imported when the function is called, with a clear error when it
is missing (``pip install -e .[analysis]``).
"""

from __future__ import annotations

from pathlib import Path

from activation_transfer.errors import MissingInput
from activation_transfer.report.records import read_records
from activation_transfer.task.scoring import METRICS

COLUMNS = ("sample_id", "condition", "seed", "gold", "prediction", "hops", *METRICS)


def record_rows(run_dir: str | Path) -> list[dict]:
    """The flat rows of :func:`records_to_dataframe` (no pandas needed), in file order then sample order.

    Raises:
        FileNotFoundError: No ``records/*.jsonl`` under ``run_dir``.
    """
    folder = Path(run_dir)
    folder = folder / "records" if (folder / "records").is_dir() else folder
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise MissingInput(f"no records/*.jsonl in {run_dir}: not an evaluation run folder")
    rows = []
    for path in files:
        for rec in read_records(path):
            row = {k: rec.get(k) for k in COLUMNS[:6]}
            row |= {m: bool(rec["metrics"][m]) for m in METRICS}
            row |= {f"diag/{k}": v for k, v in (rec.get("diagnostics") or {}).items()}
            rows.append(row)
    return rows


def records_to_dataframe(run_dir: str | Path):
    """One row per record (sample x condition x seed) of a run folder (or of its ``records/`` folder).

    Columns: ``sample_id``, ``condition``, ``seed`` (missing for deterministic conditions), ``gold``,
    ``prediction``, ``hops``, the five metrics as booleans, then every diagnostic as ``diag/<name>`` (norms,
    ``donor_id``, ``relay``).

    Raises:
        ImportError: pandas is not installed.
        FileNotFoundError: No ``records/*.jsonl`` under ``run_dir``.
    """
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError(
            "records_to_dataframe needs pandas: `pip install -e .[analysis]` (or `pip install pandas`)"
        ) from err
    frame = pd.DataFrame(record_rows(run_dir))
    # Integer seeds stay integers next to the deterministic conditions' missing seed (not floats with NaN).
    frame["seed"] = frame["seed"].astype("Int64")
    return frame
