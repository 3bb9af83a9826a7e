"""``bench/mutations.py`` names the line each test guards by its text: a refactor that rewrites the line would leave
the mutation check pointing at nothing (three did, unnoticed). Every snippet must still occur once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_mutation_snippet_occurs_once_in_its_file() -> None:
    spec = importlib.util.spec_from_file_location("bench_mutations", ROOT / "bench" / "mutations.py")
    mutations = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mutations  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mutations)
    finally:
        del sys.modules[spec.name]
    assert mutations.check_snippets(mutations.MUTATIONS) == []
