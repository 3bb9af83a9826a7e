"""Corpus files: bad input gets one clear error naming the file, the line and the fix."""

from __future__ import annotations

import pytest

from activation_transfer.errors import UsageError
from activation_transfer.task.generator import EVAL_SEED, format_prompt, generate_samples
from datamodules.corpora import CorpusSpec, documents_fingerprint, load_corpus


def test_the_fingerprint_tells_a_nul_inside_a_document_from_two_documents():
    assert documents_fingerprint(["a\0b"]) != documents_fingerprint(["a", "b"])
    assert documents_fingerprint(["ab", ""]) != documents_fingerprint(["a", "b"])


def test_the_builtin_corpus_holds_the_evaluation_set_out():
    evaluation = {f"{format_prompt(s.context, s.question)} {s.answer}" for s in generate_samples(300, EVAL_SEED)}
    docs = load_corpus(CorpusSpec(builtin_samples=3000, builtin_seed=0)).documents
    # The demo's corpus: one of its 3,000 generated samples is an evaluation sample (syn_s1234_000183), dropped.
    assert len(docs) == 2999 and not evaluation & set(docs)
    with pytest.raises(UsageError, match="data.corpus.builtin_seed=1234"):
        load_corpus(CorpusSpec(builtin_seed=EVAL_SEED))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_latin1_corpus_names_file_line_and_fix(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    good = '{"text": "plain line"}' if suffix == ".jsonl" else "plain line"
    bad = '{"text": "caf\xe9"}' if suffix == ".jsonl" else "caf\xe9 au lait"
    # Enough valid lines that the bad byte is far past the first read chunk of the text stream.
    path.write_bytes(((good + "\n") * 5000 + bad + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match=rf"corpus{suffix}, line 5001: not valid UTF-8 \(byte 0xe9\).*iconv"):
        load_corpus(CorpusSpec(source=str(path)))


def test_utf8_corpus_reads(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("café au lait\nsecond\n", encoding="utf-8")
    assert load_corpus(CorpusSpec(source=str(path))).documents == ["café au lait", "second"]


@pytest.mark.parametrize(("value", "kind"), [("5", "int"), ('{"a": 1}', "dict"), ("[1]", "list"), ("true", "bool")])
def test_jsonl_non_string_text_names_file_line_and_type(tmp_path, value, kind):
    path = tmp_path / "corpus.jsonl"
    path.write_text(f'{{"text": "fine"}}\n{{"text": {value}}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"corpus.jsonl, line 2: field 'text' must be a string, got {kind}"):
        load_corpus(CorpusSpec(source=str(path)))


def test_jsonl_null_text_is_skipped_like_a_blank_row(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": null}\n{"text": "kept"}\n', encoding="utf-8")
    assert load_corpus(CorpusSpec(source=str(path))).documents == ["kept"]
