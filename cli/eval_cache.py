"""Evaluations of ``make demo`` cached by content, so a warm demo (even in a fresh clone) only loads records.

An evaluation's run folder (records, report, ``meta.json``, ``config.yaml``) is kept under
``<cache>/evaluations/<config stem>-<key>/``. The key hashes what determines the answers: the command line with every
file it names replaced by its content hash (eval config, translator checkpoints), its output and logger left out, the
organisms' content, the questions' fingerprint (the data SHA), and the library versions and evaluation runner version
that change the numerics. A hit copies the folder into place and prints the table ``evaluate.py`` would have printed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from activation_transfer.io import cache_root, fingerprint, sha256_file
from activation_transfer.models.weights import folder_sha256
from activation_transfer.report import records as rio
from activation_transfer.report.tables import summary_markdown
from activation_transfer.task.scoring import MAIN_METRIC
from callbacks.wandb_artifacts import RUN_ID_FILE

OUTPUT_OPTION = "--trainer.default_root_dir"
# Where the results go and how they are logged: not what they are (left out of the key).
UNKEYED_OPTIONS = (OUTPUT_OPTION, "--trainer.logger")
# The data module's options that choose the questions (batch size and workers do not).
DATA_OPTIONS = ("source", "data_dir", "num_samples", "generator_seed", "limit", "counterfactual", "counterfactual_seed")


def _content(value: str):
    """A command-line value with each file or folder it names (alone or in a JSON list) replaced by its hash."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    if isinstance(parsed, list):
        return [_content(str(v)) for v in parsed]
    path = Path(value)
    if path.is_file():
        return {"sha256": sha256_file(path)}
    if path.is_dir():
        return {"folder_sha256": folder_sha256(path)}
    return value


def _option(args: list[str], name: str) -> str | None:
    """The last value given to ``name`` (``--name value``) in ``args``."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    return values[-1] if values else None


def samples_sha256(args: list[str]) -> str:
    """The fingerprint of the questions an ``evaluate.py test`` command line evaluates (what ``meta.json`` records
    as ``dataset.samples_sha256``): its config's ``data`` section, then the ``--data.*`` options given."""
    from datamodules.multihop_qa import MultiHopQADataModule

    config = _option(args, "-c") or _option(args, "--config")
    data = dict((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}) if config else {}
    for i, arg in enumerate(args[:-1]):
        if arg.startswith("--data."):
            data[arg[len("--data.") :]] = yaml.safe_load(args[i + 1])
    dm = MultiHopQADataModule(**{k: v for k, v in data.items() if k in DATA_OPTIONS})
    return fingerprint([(s.sample_id, s.context, s.question, s.answer, s.hops) for s in dm.samples])


def eval_key(args: list[str], organisms: dict[str, Path] | None = None) -> str:
    """The content key of an evaluation: ``args`` (files by content, output and logger left out), the content of the
    ``organisms`` folders the config names (``organism:<role>``), the questions and the numerics' versions."""
    from lightning_modules.injection_eval import RUNNER_VERSION

    unkeyed = {i + d for i, a in enumerate(args) if a.startswith(UNKEYED_OPTIONS) for d in (0, 1)}
    words = [a for i, a in enumerate(args) if i not in unkeyed]
    versions = {k: v for k, v in rio.library_versions().items() if k in ("torch", "transformers")}
    return fingerprint(
        {
            "args": [_content(w) for w in words],
            "organisms": {role: folder_sha256(folder) for role, folder in (organisms or {}).items()},
            "samples": samples_sha256(args),
            "libraries": versions,
            "runner_version": RUNNER_VERSION,
        }
    )[:16]


def cached_summary(run_dir: Path) -> str:
    """What ``evaluate.py`` prints at the end (:func:`cli.console.eval_summary`), read from a finished run folder."""
    lines = [f"run folder: {run_dir}"]
    for path in sorted((run_dir / "records").glob("*.jsonl")):
        records = rio.read_records(path)
        acc = sum(bool(r["metrics"][MAIN_METRIC]) for r in records) / max(len(records), 1)
        lines.append(f"  {path.stem}: {MAIN_METRIC} {acc:.4f} on {len(records)} samples (reused from the cache)")
    summary = run_dir / "report" / "summary.json"
    if summary.is_file():
        lines += [summary_markdown(json.loads(summary.read_text())).rstrip(), f"report: {summary.parent}"]
    return "\n".join(lines)


def cached_eval(args: list[str], organisms: dict[str, Path] | None = None, cache_dir: str | None = None) -> Path:
    """Run ``evaluate.py`` with ``args``, or reuse the run folder of an identical earlier evaluation; returns the run
    folder under the command's ``--trainer.default_root_dir``.

    Args:
        args: The ``evaluate.py`` command line (with ``--trainer.default_root_dir``).
        organisms: ``{role: folder}`` of the organisms the config names (by name only): their content is keyed.
        cache_dir: The project cache (default :func:`activation_transfer.io.cache_root`).
    """
    config = Path(_option(args, "-c") or "eval")
    key = eval_key(args, organisms)
    entry = cache_root(cache_dir) / "evaluations" / f"{config.stem}-{key}"
    if (entry / "run").is_dir():
        name = json.loads((entry / "entry.json").read_text())["run_name"]
        run_dir = Path(_option(args, OUTPUT_OPTION) or ".") / name
        shutil.copytree(entry / "run", run_dir, dirs_exist_ok=True)
        print(f"[demo] evaluation reused from the cache ({entry})", flush=True)
        print(cached_summary(run_dir), flush=True)
        return run_dir
    from cli.lightning_cli import eval_main

    run_dir = Path(eval_main(args).model.run_dir)
    if (run_dir / "meta.json").is_file():
        store(run_dir, entry, args)
    return run_dir


def store(run_dir: Path, entry: Path, args: list[str]) -> None:
    """Keep a finished run folder (its W&B run id and files, and partial shards, left out) as the cache ``entry``."""
    # Complete or absent: copied next to the entry, then renamed into place (an interrupted demo re-evaluates).
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    shutil.copytree(run_dir, tmp / "run", ignore=shutil.ignore_patterns("wandb", "partial*", RUN_ID_FILE))
    (tmp / "entry.json").write_text(json.dumps({"run_name": run_dir.name, "args": args}, indent=2) + "\n")
    try:
        tmp.rename(entry)
    except OSError:  # another demo stored the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
