"""Text corpora for activation extraction: the built-in offline corpus, local text/JSONL files, or a HF dataset by name.

A corpus is a list of non-empty documents plus a SHA-256 fingerprint of exactly those documents (in order), so the
activation cache key changes whenever the text does. Everything is a pure function of the :class:`CorpusSpec`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from activation_transfer.errors import MissingInput, UsageError
from activation_transfer.task.generator import check_seed

BUILTIN = "builtin"
HF_PREFIX = "hf:"


@dataclass
class CorpusSpec:
    """Where the extraction text comes from.

    Args:
        source: ``builtin`` (the synthetic multi-hop generator, offline), a local ``.txt`` file (one document per
            line) or ``.jsonl`` file (one object per line, text in ``text_field``), or ``hf:<dataset id>`` for a
            Hugging Face dataset (needs internet or a local HF cache; e.g. ``hf:Salesforce/wikitext``).
        hf_config: Dataset configuration name for ``hf:`` sources (``wikitext-103-raw-v1``).
        split: Dataset split for ``hf:`` sources.
        text_field: Field holding the text in JSONL files and HF datasets.
        max_documents: Keep only the first N non-empty documents (None: all).
        builtin_samples: Number of generated samples for the built-in corpus (those that are also evaluation samples
            are then dropped).
        builtin_seed: Generator seed of the built-in corpus (not the evaluation seed 1234).
    """

    source: str = BUILTIN
    hf_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None
    builtin_samples: int = 2000
    builtin_seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, at parsing: `_keep` stops after the first document once it has max_documents of them, so 0
        # or a negative count silently trained on one document; a negative builtin_samples was the generator's
        # traceback after the models had loaded.
        if self.max_documents is not None and self.max_documents < 1:
            raise UsageError(
                f"data.corpus.max_documents must be >= 1 or null (all documents), got {self.max_documents}"
            )
        if self.builtin_samples < 1:
            raise UsageError(f"data.corpus.builtin_samples must be >= 1, got {self.builtin_samples}")
        check_seed("data.corpus.builtin_seed", self.builtin_seed)


@dataclass
class Corpus:
    """Loaded documents and their fingerprint."""

    documents: list[str]
    fingerprint: str
    spec: dict = field(default_factory=dict)


def as_spec(spec: CorpusSpec | dict | str | None) -> CorpusSpec:
    if spec is None:
        return CorpusSpec()
    if isinstance(spec, CorpusSpec):
        return spec
    if isinstance(spec, str):
        return CorpusSpec(source=spec)
    return CorpusSpec(**spec)


def documents_fingerprint(documents: list[str]) -> str:
    """SHA-256 over the documents in order, each prefixed by its length in bytes.

    A separator alone would be ambiguous: with NUL separators, the one document "A\\0B" and the two "A", "B" hashed
    alike, so a store extracted from one corpus was reused for the other.
    """
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _keep(docs, max_documents: int | None) -> list[str]:
    out = []
    for doc in docs:
        # WikiText-style corpora hold many blank lines; they carry no tokens.
        if doc is None or not str(doc).strip():
            continue
        out.append(str(doc))
        if max_documents is not None and len(out) >= max_documents:
            break
    return out


def _first_invalid_utf8(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return 0


def _read_local(path: Path, spec: CorpusSpec) -> list[str]:
    if not path.is_file():
        raise MissingInput(f"corpus file {path} does not exist (option data.corpus.source)")
    try:
        return _read_local_utf8(path, spec)
    except UnicodeDecodeError:
        # Name the file, line and byte, and the fix: decoding with a guessed codec would silently change the text.
        data = path.read_bytes()
        pos = _first_invalid_utf8(data)
        line = data[:pos].count(b"\n") + 1
        raise UsageError(
            f"corpus file {path}, line {line}: not valid UTF-8 (byte {data[pos]:#04x}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > corpus.utf8.txt`, and point data.corpus.source at the result"
        ) from None


def _read_local_utf8(path: Path, spec: CorpusSpec) -> list[str]:
    if path.suffix == ".jsonl":

        def rows():
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UsageError(f"corpus file {path}, line {lineno}: not valid JSON ({err})") from err
                    if not isinstance(obj, dict) or spec.text_field not in obj:
                        raise UsageError(
                            f"corpus file {path}, line {lineno}: no {spec.text_field!r} field "
                            "(option data.corpus.text_field)"
                        )
                    value = obj[spec.text_field]
                    # str() would turn 5 or {"a": 1} into text silently; null stays a blank row, as in HF datasets.
                    if value is not None and not isinstance(value, str):
                        raise UsageError(
                            f"corpus file {path}, line {lineno}: field {spec.text_field!r} must be a string, got "
                            f"{type(value).__name__} (store the text as a JSON string, or set data.corpus.text_field)"
                        )
                    yield value

        docs = _keep(rows(), spec.max_documents)
    else:
        with path.open(encoding="utf-8") as f:
            docs = _keep((line.rstrip("\n") for line in f), spec.max_documents)
    if not docs:
        raise UsageError(f"corpus file {path} holds no non-empty documents (option data.corpus.source)")
    return docs


def _read_hf(spec: CorpusSpec) -> list[str]:
    name = spec.source.removeprefix(HF_PREFIX)
    try:
        import datasets  # lazy: only users of Hub corpora need it
    except ImportError as err:  # pragma: no cover - datasets is installed in the dev venv
        raise ImportError("corpus source 'hf:...' needs the `datasets` package: pip install '.[hf]'") from err
    try:
        ds = datasets.load_dataset(name, spec.hf_config, split=spec.split)
    except Exception as err:  # datasets raises many types (network, missing config, ...): report them all alike
        raise UsageError(
            f"cannot load corpus {spec.source!r} (config {spec.hf_config!r}, split {spec.split!r}) from the Hugging "
            f"Face Hub or cache: {type(err).__name__}: {err}"
        ) from err
    if spec.text_field not in ds.column_names:
        raise UsageError(
            f"corpus {spec.source!r} has no column {spec.text_field!r} (columns: {ds.column_names}); "
            "set data.corpus.text_field"
        )
    docs = _keep((row[spec.text_field] for row in ds), spec.max_documents)
    if not docs:
        raise UsageError(f"corpus {spec.source!r} (split {spec.split!r}) holds no non-empty documents")
    return docs


def load_corpus(spec: CorpusSpec | dict | str | None = None) -> Corpus:
    """Load the documents a spec names, dropping blank ones, and fingerprint them.

    Raises:
        FileNotFoundError: a local corpus file is missing.
        ValueError: the corpus is empty, malformed, or cannot be loaded.
    """
    spec = as_spec(spec)
    if spec.source == BUILTIN:
        from activation_transfer.task.generator import EVAL_SEED, sample_text
        from datamodules.organism_text import held_out_samples

        if spec.builtin_seed == EVAL_SEED:
            raise UsageError(
                f"data.corpus.builtin_seed={EVAL_SEED} is EVAL_SEED, the evaluation set's generator seed; pick another"
            )
        # Held out as the organisms' and the QA trainers' text is: evaluation samples dropped (the demo's 3,000
        # samples of seed 0 held one evaluation question with its answer).
        samples = held_out_samples(spec.builtin_samples, spec.builtin_seed)
        docs = _keep((sample_text(s) for s in samples), spec.max_documents)
        if not docs:
            raise UsageError("the built-in corpus is empty: data.corpus.builtin_samples must be > 0")
    elif spec.source.startswith(HF_PREFIX):
        docs = _read_hf(spec)
    else:
        docs = _read_local(Path(spec.source).expanduser(), spec)
    return Corpus(documents=docs, fingerprint=documents_fingerprint(docs), spec=asdict(spec))
