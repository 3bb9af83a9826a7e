"""Corpus files: bad input gets one clear error naming the file, the line and the fix."""

from __future__ import annotations

import pytest

from datamodules.corpora import CorpusSpec, load_corpus


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
