"""Where multi-hop QA samples come from: the paper's files, any local JSONL file, or the built-in generator.

Every source is identified by a hash (a file's SHA-256, pinned for the paper's files; the generator's fingerprint),
so a result always names exactly the data it was computed on. Bad input raises :class:`QADataError` (a
``ValueError``) naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from activation_transfer.errors import UsageError
from activation_transfer.io import sha256_file
from activation_transfer.task.generator import (
    EVAL_NUM_SAMPLES,
    EVAL_SEED,
    TRAINING_SETS,
    fingerprint,
    generate_samples,
    training_keys,
)
from activation_transfer.task.prompts import format_prompt, format_relay_receiver_prompt, format_relay_sender_prompt

log = logging.getLogger(__name__)

PAPER_REPO = "jaysinailabs/cross-model-activation-transfer"
PAPER_COMMIT = "6ce8afb1d1e608bb5c919b34aa3f1c7848a0a865"
# Read at call time (not bound as a default argument) so tests can point it at a file:// copy.
PAPER_BASE_URL = f"https://raw.githubusercontent.com/{PAPER_REPO}/{PAPER_COMMIT}/data/tasks/multi_hop_reasoning/"
ID_FIELDS = ("id", "sample_id", "clean_eval_id")
REQUIRED_FIELDS = ("context", "question", "answer")
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class PaperFile:
    """One QA file of the paper's artifact, pinned by content."""

    name: str
    filename: str
    sha256: str
    rows: int
    description: str


PAPER_FILES: dict[str, PaperFile] = {
    f.name: f
    for f in (
        # clean_eval's hash is the paper's frozen one; the others were computed with sha256sum from the files of
        # the artifact's data/tasks/multi_hop_reasoning folder at PAPER_COMMIT.
        PaperFile(
            "clean_eval",
            "clean_eval.jsonl",
            "504e077cf17433e22967c86e98d321532d4e803dbe24d96af14c7e8ecdd0dcbb",
            396,
            "the frozen evaluation set of the paper",
        ),
        PaperFile(
            "train",
            "train.jsonl",
            "f7dcaf6798e580b3883ac1d64d8403fd4af6dd99c724cd44f8181f2fe665fab3",
            560,
            "v1 geography train split",
        ),
        PaperFile(
            "val",
            "val.jsonl",
            "9c227ed32ae770ca13b29d5171e3d2eb179cd1dc9995a61e13a403de96b8c6ab",
            80,
            "v1 geography validation split",
        ),
        PaperFile(
            "test",
            "test.jsonl",
            "83e72730b9c13e4de070f111af3b704e8bd9efede33502e8f42af667447b9927",
            160,
            "v1 geography test split",
        ),
        PaperFile(
            "test_v2",
            "test_v2.jsonl",
            "8a35e5aaaa6dff7c4dd0da04f33007bcb0de8da3f175d8c64da7ba08a250ee08",
            354,
            "v2 multi-domain items",
        ),
        PaperFile(
            "test_enhanced",
            "test_enhanced.jsonl",
            "aba89948a8749c6f247fd0ce5251c310c07bdf24dde3f01c4a56349f9c04e9ec",
            514,
            "test + test_v2, the source of clean_eval",
        ),
    )
}


class QADataError(UsageError):
    """A QA source that cannot be used: bad rows, a wrong hash, an unknown name or a failed download."""


@dataclass(frozen=True)
class QASample:
    """One QA sample as every source yields it.

    Attributes:
        sample_id: Unique id within its source.
        context: The facts (the paper's task is extractive: the answer is in the context).
        question: The question.
        answer: The gold answer (non-empty).
        hops: Number of reasoning hops, None when the source does not say.
        gold_original: The answer before a counterfactual substitution (``answer`` is then the substitute that the
            changed context states); None for an unchanged sample.
    """

    sample_id: str
    context: str
    question: str
    answer: str
    hops: int | None = None
    gold_original: str | None = None

    @property
    def prompt(self) -> str:
        """The paper's prompt, given to both models."""
        return format_prompt(self.context, self.question)

    @property
    def relay_sender_prompt(self) -> str:
        """The relay sender's prompt (context only)."""
        return format_relay_sender_prompt(self.context)

    def relay_receiver_prompt(self, relay: str) -> str:
        """The relay receiver's prompt: the sender's relay (stripped) and the question, never the context."""
        return format_relay_receiver_prompt(relay, self.question)

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["gold_original"] is None:  # only counterfactual samples have it: other dicts stay as they were
            del out["gold_original"]
        return out


# --------------------------------------------------------------------------------------------- hashing and files


def paper_file(name: str) -> PaperFile:
    """The registry entry of a paper file name; raises listing the valid names."""
    if name not in PAPER_FILES:
        raise QADataError(f"unknown paper QA file {name!r}; valid names: {', '.join(PAPER_FILES)}")
    return PAPER_FILES[name]


def paper_file_url(name: str, base_url: str | None = None) -> str:
    return (base_url or PAPER_BASE_URL).rstrip("/") + "/" + paper_file(name).filename


def paper_cache_path(name: str, cache_dir: str | None = None) -> Path:
    """Where a downloaded paper file lives: ``<cache>/multihop/<commit>/<filename>``."""
    from activation_transfer.io import cache_root

    return cache_root(cache_dir) / "multihop" / PAPER_COMMIT[:12] / paper_file(name).filename


def _mismatch(what: str, expected: str, actual: str) -> QADataError:
    return QADataError(
        f"SHA-256 mismatch for {what}: expected {expected}, got {actual}. The file is not the paper's pinned "
        f"version (commit {PAPER_COMMIT[:7]} of {PAPER_REPO}); re-fetch it or pass a path as source to use it anyway"
    )


def download_verified(url: str, dest: str | Path, sha256: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically, keeping it only if its SHA-256 equals ``sha256``.

    The bytes go to a temporary file next to ``dest`` (same folder, so the final ``os.replace`` is atomic and
    nothing is written elsewhere); on a hash mismatch or any error the temporary file is removed and no file is
    left at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise QADataError(
                    f"cannot download {url} ({type(err).__name__}: {err}); without internet access, pass data_dir= "
                    f"a folder holding {dest.name} (the paper's files at commit {PAPER_COMMIT[:7]})"
                ) from err
        actual = h.hexdigest()
        if actual != sha256:
            raise _mismatch(f"{dest.name} downloaded from {url}", sha256, actual)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def resolve_paper_file(
    name: str, data_dir: str | Path | None = None, cache_dir: str | None = None, base_url: str | None = None
) -> tuple[Path, str]:
    """Find a paper file, verified against its pinned SHA-256.

    The file is read from ``data_dir`` or downloaded once from the paper's artifact at a pinned commit into the cache
    folder; both paths check it against its pinned SHA-256.

    Args:
        name: A key of :data:`PAPER_FILES`.
        data_dir: A local folder holding the file (``clean_eval.jsonl``, ...); nothing is downloaded then.
        cache_dir: The cache folder for downloads (default: the project cache, see ``cache_root``).
        base_url: Folder URL to download from (default :data:`PAPER_BASE_URL`, the pinned commit).

    Returns:
        The file's path and the URL it came from (None for ``data_dir``).
    """
    entry = paper_file(name)
    if data_dir is not None:
        path = Path(data_dir).expanduser() / entry.filename
        if not path.is_file():
            raise QADataError(f"paper QA file {name!r} not found: {path} does not exist (data_dir={str(data_dir)!r})")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise _mismatch(str(path), entry.sha256, actual)
        return path, None
    url = paper_file_url(name, base_url)
    path = paper_cache_path(name, cache_dir)
    if path.is_file():
        actual = sha256_file(path)
        if actual == entry.sha256:
            return path, url
        # Only verified files are ever moved into the cache, so this one was changed by hand: fetch it again.
        log.warning("cached %s has SHA-256 %s, expected %s; downloading it again", path, actual, entry.sha256)
        path.unlink()
    log.info("downloading %s to %s", url, path)
    return download_verified(url, path, entry.sha256), url


# --------------------------------------------------------------------------------------------- JSONL rows


def _row_error(path: Path, line: int, msg: str) -> QADataError:
    return QADataError(f"{path}:{line}: {msg}")


def _parse_row(path: Path, line: int, row: object) -> QASample:
    if not isinstance(row, dict):
        raise _row_error(path, line, f"expected a JSON object, got {type(row).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in row:
            raise _row_error(path, line, f"missing field {field!r} (rows need {', '.join(REQUIRED_FIELDS)})")
        if not isinstance(row[field], str):
            raise _row_error(path, line, f"field {field!r} must be a string, got {type(row[field]).__name__}")
        if not row[field].strip():
            raise _row_error(path, line, f"empty {field!r}")
    hops = row.get("hops")
    # bool is an int subclass: reject it explicitly.
    if hops is not None and (isinstance(hops, bool) or not isinstance(hops, int) or hops < 1):
        raise _row_error(path, line, f"'hops' must be a positive integer or absent, got {hops!r}")
    sample_id = None
    for field in ID_FIELDS:
        if row.get(field) is not None:
            value = row[field]
            if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
                raise _row_error(path, line, f"id field {field!r} must be a non-empty string or integer, got {value!r}")
            sample_id = str(value)
            break
    if sample_id is None:
        sample_id = f"{path.stem}_{line - 1:06d}"
    return QASample(sample_id, row["context"], row["question"], row["answer"], hops)


def read_jsonl(path: str | Path) -> list[QASample]:
    """Read and validate a QA JSONL file (blank lines are skipped; ids must be unique).

    Each line is one JSON object with ``context``, ``question``, ``answer`` and optionally ``hops`` and an id
    (``id``, ``sample_id`` or ``clean_eval_id``, first found wins); ids default to ``<file stem>_<line index:06d>``
    (0-based line index in the file).
    """
    path = Path(path)
    samples: list[QASample] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _row_error(path, line, f"not UTF-8 ({err})") from err
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise _row_error(path, line, f"not valid JSON ({err.msg} at column {err.colno})") from err
            sample = _parse_row(path, line, row)
            if sample.sample_id in seen:
                raise _row_error(
                    path, line, f"duplicate sample id {sample.sample_id!r} (lines {seen[sample.sample_id]} and {line})"
                )
            seen[sample.sample_id] = line
            samples.append(sample)
    return samples


# --------------------------------------------------------------------------------------------- sources


def generated_samples(num_samples: int, seed: int) -> tuple[list[QASample], str]:
    """Samples of the built-in generator and its fingerprint."""
    gen = generate_samples(num_samples, seed)
    return [QASample(s.sample_id, s.context, s.question, s.answer, s.hops) for s in gen], fingerprint(gen)


def generated_eval_samples(num_samples: int, seed: int) -> tuple[list[QASample], str, int]:
    """Evaluation samples of the built-in generator without those the shipped recipes train on.

    The first ``EVAL_NUM_SAMPLES`` of ``EVAL_SEED`` are held out of every training set; any other generated question
    may occur in one (about 0.4% of them: 12 of samples 300-2,999 of ``EVAL_SEED``, 15 of 3,000 of seed 5), and a
    model that trained on a question with its answer is not tested on it.

    Returns:
        The kept samples, their fingerprint and how many were dropped.

    Raises:
        UsageError: ``seed`` is a training seed (:data:`TRAINING_SETS`).
    """
    if seed in dict(TRAINING_SETS):
        raise UsageError(
            f"--data.generator_seed {seed} generates the shipped recipes' training samples; evaluate another seed "
            f"(the evaluation seed is {EVAL_SEED}, validation questions use 2)"
        )
    gen = generate_samples(num_samples, seed)
    if seed != EVAL_SEED or num_samples > EVAL_NUM_SAMPLES:
        seen = training_keys()
        gen = [s for s in gen if s.key not in seen]
    dropped = num_samples - len(gen)
    if dropped:
        log.info(
            "dropped %d of %d generated questions (seed %d) that a shipped recipe trains on", dropped, num_samples, seed
        )
    return [QASample(s.sample_id, s.context, s.question, s.answer, s.hops) for s in gen], fingerprint(gen), dropped


def load_source(
    source: str,
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | None = None,
    num_samples: int | None = None,
    generator_seed: int | None = None,
) -> tuple[list[QASample], dict]:
    """Load every sample of a source: ``"synthetic"``, a paper file name, or a path to a JSONL file.

    Returns:
        The samples in source order and a ``source_info`` dict: ``source``, ``kind`` (``synthetic``, ``paper`` or
        ``jsonl``), ``path``, ``url``, ``sha256`` (file hash, or the generator fingerprint), ``n``,
        ``generator_seed`` and ``num_samples`` (generator only, else None) and ``paper_file`` (the paper file a
        local JSONL's hash matches, if any).
    """
    info = {"source": source, "path": None, "url": None, "generator_seed": None, "num_samples": None}
    if source == "synthetic":
        num_samples = EVAL_NUM_SAMPLES if num_samples is None else num_samples
        seed = EVAL_SEED if generator_seed is None else generator_seed
        samples, sha, dropped = generated_eval_samples(num_samples, seed)
        info.update(kind="synthetic", sha256=sha, generator_seed=seed, num_samples=num_samples, paper_file=None)
        info["dropped_seen_in_training"] = dropped
    elif source in PAPER_FILES:
        path, url = resolve_paper_file(source, data_dir=data_dir, cache_dir=cache_dir)
        samples = read_jsonl(path)
        info.update(kind="paper", path=str(path), url=url, sha256=PAPER_FILES[source].sha256, paper_file=source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise QADataError(
                f"QA source {source!r} is not 'synthetic', not a paper file ({', '.join(PAPER_FILES)}) and not an "
                f"existing JSONL file ({path.resolve()} does not exist)"
            )
        sha = sha256_file(path)
        samples = read_jsonl(path)
        match = next((f.name for f in PAPER_FILES.values() if f.sha256 == sha), None)
        info.update(kind="jsonl", path=str(path.resolve()), sha256=sha, paper_file=match)
    info["n"] = len(samples)
    return samples, info
