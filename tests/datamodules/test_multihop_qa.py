"""MultiHopQADataModule: the paper's files (local and downloaded, SHA-256 pinned), local JSONL, the generator,
batches, and one test per kind of bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import statistics
from collections import Counter
from pathlib import Path

import pytest
from lightning_helpers import quiet_trainer
from torch.utils.data import Dataset

from activation_transfer.task.generator import EVAL_NUM_SAMPLES, EVAL_SEED, fingerprint, generate_samples
from datamodules import qa_sources
from datamodules.multihop_qa import MultiHopQADataModule, QADataError, QASample
from datamodules.qa_sources import PAPER_FILES, paper_cache_path, paper_file_url, read_jsonl, resolve_paper_file

CLEAN_SHA = "504e077cf17433e22967c86e98d321532d4e803dbe24d96af14c7e8ecdd0dcbb"


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(i: int = 0, **kw) -> dict:
    return {
        "context": f"P{i} lives in C{i}. C{i} is in K{i}.",
        "question": f"Where does P{i} live?",
        "answer": f"K{i}",
    } | kw


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# --------------------------------------------------------------------------------------------- the paper's files


def test_clean_eval_matches_the_paper(multihop_dir):
    dm = MultiHopQADataModule("clean_eval", data_dir=str(multihop_dir))
    dm.setup("test")
    s = dm.samples
    assert len(s) == 396
    assert (
        dm.dataset_sha256 == CLEAN_SHA == hashlib.sha256((multihop_dir / "clean_eval.jsonl").read_bytes()).hexdigest()
    )
    assert Counter(x.hops for x in s) == {2: 186, 3: 139, 4: 71}
    assert s[0].sample_id == "mh_clean_000000" and s[-1].sample_id == "mh_clean_000395"
    assert len({x.sample_id for x in s}) == 396
    assert len({x.answer for x in s}) == 204
    # The task is extractive: every gold answer is in its context (396 of 396).
    assert all(x.answer in x.context for x in s)
    assert statistics.mean(len(x.context.split()) for x in s) == pytest.approx(20.7, abs=0.05)
    assert s[0].prompt == (
        "Context: Bob works in Tokyo. Tokyo is located in Japan. Japan is on the continent of Asia. "
        "Asia consists of roughly 48 nations.\nQ: What continent is the country where Bob works located on?\nA:"
    )
    info = dm.source_info
    assert info["source"] == "clean_eval" and info["kind"] == "paper" and info["paper_file"] == "clean_eval"
    assert info["sha256"] == CLEAN_SHA and info["n"] == info["n_total"] == 396 and info["url"] is None
    assert Path(info["path"]) == multihop_dir / "clean_eval.jsonl"
    assert info["generator_seed"] is None


@pytest.mark.parametrize("name", list(PAPER_FILES))
def test_every_paper_file_loads_with_its_pinned_hash_and_rows(multihop_dir, name):
    dm = MultiHopQADataModule(name, data_dir=str(multihop_dir))
    assert len(dm.samples) == PAPER_FILES[name].rows
    assert dm.dataset_sha256 == PAPER_FILES[name].sha256
    assert all(x.hops in (2, 3, 4) and x.answer.strip() for x in dm.samples)
    if name != "clean_eval":  # no id field: ids come from the file stem and line index
        assert dm.samples[0].sample_id == f"{name}_000000"
        assert dm.samples[-1].sample_id == f"{name}_{PAPER_FILES[name].rows - 1:06d}"


def test_download_url_is_the_pinned_one_from_the_readme(multihop_dir):
    readme = (multihop_dir / "README.md").read_text()
    pattern = next(w for w in readme.split() if w.startswith("https://raw.githubusercontent.com/"))
    assert "6ce8afb1d1e608bb5c919b34aa3f1c7848a0a865" in pattern
    assert paper_file_url("clean_eval") == pattern.replace("<file>", "clean_eval.jsonl")


@pytest.fixture
def remote(tmp_path, multihop_dir, monkeypatch) -> Path:
    """A file:// stand-in for the paper's raw-file URL (copies in tmp_path, never in the project)."""
    folder = tmp_path / "remote"
    folder.mkdir()
    for f in PAPER_FILES.values():
        shutil.copy(multihop_dir / f.filename, folder / f.filename)
    monkeypatch.setattr(qa_sources, "PAPER_BASE_URL", folder.as_uri() + "/")
    return folder


def test_download_into_the_cache_then_reuse(remote, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    dm = MultiHopQADataModule("clean_eval", cache_dir=str(cache))
    dm.prepare_data()
    dest = paper_cache_path("clean_eval", str(cache))
    assert files_under(cache) == [dest]  # the verified file only: no temporary file left behind
    assert dest.read_bytes() == (remote / "clean_eval.jsonl").read_bytes()
    assert len(dm.samples) == 396 and dm.dataset_sha256 == CLEAN_SHA
    assert dm.source_info["url"] == (remote / "clean_eval.jsonl").as_uri()

    # A second module reads the cached file and never goes to the network.
    def no_network(*a, **k):
        raise AssertionError("network used although the file is cached")

    monkeypatch.setattr(qa_sources.urllib.request, "urlopen", no_network)
    assert len(MultiHopQADataModule("clean_eval", cache_dir=str(cache)).samples) == 396


def test_download_defaults_to_the_project_cache(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTIVATION_TRANSFER_CACHE", str(tmp_path / "envcache"))
    path, url = resolve_paper_file("val")
    assert path.is_relative_to(tmp_path / "envcache") and path.name == "val.jsonl"
    assert url.startswith("file://")


def test_download_with_a_wrong_sha256_raises_and_leaves_no_file(remote, tmp_path):
    (remote / "clean_eval.jsonl").write_bytes((remote / "clean_eval.jsonl").read_bytes().replace(b"Asia", b"Asja", 1))
    cache = tmp_path / "cache"
    with pytest.raises(QADataError) as err:
        MultiHopQADataModule("clean_eval", cache_dir=str(cache)).prepare_data()
    msg = str(err.value)
    actual = hashlib.sha256((remote / "clean_eval.jsonl").read_bytes()).hexdigest()
    assert f"expected {CLEAN_SHA}" in msg and f"got {actual}" in msg and "clean_eval.jsonl" in msg
    assert files_under(cache) == []


def test_failed_download_says_how_to_work_offline_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(qa_sources, "PAPER_BASE_URL", (tmp_path / "nowhere").as_uri() + "/")
    cache = tmp_path / "cache"
    with pytest.raises(QADataError, match=r"cannot download .*clean_eval\.jsonl.*data_dir="):
        MultiHopQADataModule("clean_eval", cache_dir=str(cache)).load_samples()
    assert files_under(cache) == []


def test_tampered_cached_file_is_fetched_again(remote, tmp_path):
    cache = tmp_path / "cache"
    dest = paper_cache_path("val", str(cache))
    dest.parent.mkdir(parents=True)
    dest.write_text("tampered\n")
    path, _ = resolve_paper_file("val", cache_dir=str(cache))
    assert path == dest and dest.read_bytes() == (remote / "val.jsonl").read_bytes()


def test_local_paper_file_with_a_wrong_sha256_raises(multihop_dir, tmp_path):
    data = (multihop_dir / "clean_eval.jsonl").read_bytes()
    (tmp_path / "clean_eval.jsonl").write_bytes(data + b"\n")
    actual = hashlib.sha256(data + b"\n").hexdigest()
    with pytest.raises(QADataError) as err:
        MultiHopQADataModule("clean_eval", data_dir=str(tmp_path)).setup("test")
    msg = str(err.value)
    assert str(tmp_path / "clean_eval.jsonl") in msg and CLEAN_SHA in msg and actual in msg


def test_paper_file_missing_from_data_dir_names_the_path(tmp_path):
    with pytest.raises(QADataError, match=r"'test_v2' not found: .*test_v2\.jsonl does not exist"):
        MultiHopQADataModule("test_v2", data_dir=str(tmp_path)).load_samples()


def test_unknown_name_or_missing_path_lists_the_valid_names(tmp_path):
    for source in ("clean_evl", str(tmp_path / "absent.jsonl")):
        with pytest.raises(QADataError) as err:
            MultiHopQADataModule(source).load_samples()
        msg = str(err.value)
        assert source in msg and "'synthetic'" in msg
        assert all(name in msg for name in PAPER_FILES)
    with pytest.raises(QADataError, match="valid names: clean_eval, train, val, test, test_v2, test_enhanced"):
        qa_sources.paper_file("nope")


# --------------------------------------------------------------------------------------------- local JSONL


def test_local_jsonl_ids_hops_and_source_info(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            row(0, hops=2),
            "",
            row(1, id="custom"),
            row(2, sample_id=7, clean_eval_id="ignored"),
            row(3, clean_eval_id="c3"),
        ],
    )
    dm = MultiHopQADataModule(str(path))
    # Blank lines are skipped; default ids use the 0-based line index; id > sample_id > clean_eval_id.
    assert [s.sample_id for s in dm.samples] == ["mine_000000", "custom", "7", "c3"]
    assert [s.hops for s in dm.samples] == [2, None, None, None]
    assert dm.samples[1] == QASample("custom", row(1)["context"], row(1)["question"], "K1", None)
    info = dm.source_info
    assert info["kind"] == "jsonl" and info["path"] == str(path.resolve()) and info["paper_file"] is None
    assert dm.dataset_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]


def test_path_to_a_paper_file_is_recognised(multihop_dir):
    dm = MultiHopQADataModule(str(multihop_dir / "val.jsonl"))
    assert dm.source_info["kind"] == "jsonl" and dm.source_info["paper_file"] == "val"
    assert dm.samples[0].sample_id == "val_000000"


def test_qasample_prompts_and_dict():
    s = QASample("x1", "A is in B.", "Where is A?", "B", 2)
    assert s.prompt == "Context: A is in B.\nQ: Where is A?\nA:"
    assert s.relay_sender_prompt == "A is in B.\n\nKey facts:"
    assert s.relay_receiver_prompt("A: B.") == "A: B.\nQ: Where is A?\nA:"
    assert s.to_dict() == {
        "sample_id": "x1",
        "context": "A is in B.",
        "question": "Where is A?",
        "answer": "B",
        "hops": 2,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.answer = "C"


# --------------------------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("line3", "expected"),
    [
        ('{"context": "c", "question": "q", "answer": "a"', r"bad\.jsonl:3: not valid JSON"),
        (json.dumps({"context": "c", "answer": "a"}), r"bad\.jsonl:3: missing field 'question'"),
        (json.dumps(["c", "q", "a"]), r"bad\.jsonl:3: expected a JSON object, got list"),
        (json.dumps({"context": "c", "question": "q", "answer": 4}), r"bad\.jsonl:3: field 'answer' must be a string"),
        (json.dumps(row(2, answer="  ")), r"bad\.jsonl:3: empty 'answer'"),
        (json.dumps(row(2, hops=0)), r"bad\.jsonl:3: 'hops' must be a positive integer"),
        (json.dumps(row(2, hops=True)), r"bad\.jsonl:3: 'hops' must be a positive integer"),
        (json.dumps(row(2, id="")), r"bad\.jsonl:3: id field 'id' must be a non-empty"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, line3, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [row(0), row(1), line3, row(3)])
    with pytest.raises(QADataError, match=expected) as err:
        MultiHopQADataModule(str(path)).setup("test")
    assert str(path) in str(err.value)


def test_non_utf8_row_names_file_and_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(row(0)).encode() + b"\n\xff\xfe\n")
    with pytest.raises(QADataError, match=r"bin\.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [row(0, id="a"), row(1, id="b"), row(2), row(3, sample_id="a")])
    with pytest.raises(QADataError, match=r"dup\.jsonl:4: duplicate sample id 'a' \(lines 1 and 4\)"):
        MultiHopQADataModule(str(path)).load_samples()


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(QADataError, match="has no samples"):
        MultiHopQADataModule(str(path)).load_samples()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"num_samples=5 only applies to source .synthetic.*--data.num_samples null"):
        MultiHopQADataModule("clean_eval", num_samples=5)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        MultiHopQADataModule(limit=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        MultiHopQADataModule(batch_size=0)


# --------------------------------------------------------------------------------------------- generator and batches


def test_default_is_the_deterministic_generator():
    a, b = MultiHopQADataModule(), MultiHopQADataModule()
    a.setup("test")
    assert len(a.samples) == EVAL_NUM_SAMPLES
    assert a.samples == b.samples and a.dataset_sha256 == b.dataset_sha256
    gen = generate_samples(EVAL_NUM_SAMPLES, EVAL_SEED)
    assert a.dataset_sha256 == fingerprint(gen)
    assert [s.sample_id for s in a.samples] == [g.sample_id for g in gen]
    assert all(s.answer in s.context for s in a.samples)
    info = a.source_info
    assert info["kind"] == "synthetic" and info["generator_seed"] == EVAL_SEED
    assert info["num_samples"] == info["n"] == EVAL_NUM_SAMPLES and info["path"] is None


def test_generator_seed_and_num_samples():
    dm = MultiHopQADataModule(num_samples=12, generator_seed=7)
    assert len(dm.samples) == 12 and dm.source_info["generator_seed"] == 7
    assert dm.dataset_sha256 != MultiHopQADataModule(num_samples=12).dataset_sha256


def test_batches_are_lists_of_samples_in_source_order(multihop_dir):
    dm = MultiHopQADataModule("clean_eval", data_dir=str(multihop_dir), limit=37, batch_size=16)
    dm.setup("test")
    assert isinstance(dm.dataset, Dataset) and len(dm.dataset) == 37 and dm.dataset[3] == dm.samples[3]
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        batches = list(loader)
        assert [len(b) for b in batches] == [16, 16, 5]
        assert all(type(b) is list and all(isinstance(s, QASample) for s in b) for b in batches)
        assert [s for b in batches for s in b] == dm.samples


def test_limit_keeps_the_first_samples_and_the_file_hash(multihop_dir):
    full = MultiHopQADataModule("clean_eval", data_dir=str(multihop_dir))
    dm = MultiHopQADataModule("clean_eval", data_dir=str(multihop_dir), limit=5)
    assert dm.samples == full.samples[:5]
    assert dm.dataset_sha256 == CLEAN_SHA
    assert dm.source_info["n"] == 5 and dm.source_info["n_total"] == 396 and dm.source_info["limit"] == 5


# PL 2.6.6 on torch 2.13 warns "`isinstance(treespec, LeafSpec)` is deprecated"; the message starts with a
# backtick and has one after "LeafSpec)", so the pyproject filter (anchored at "isinstance") does not match.
@pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.* is deprecated:FutureWarning")
def test_trainer_test_hands_the_sample_lists_to_the_module(tmp_path):
    # Lightning's default batch transfer rebuilds dataclasses and would raise on the frozen QASample.
    import pytorch_lightning as pl
    import torch

    class Collect(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen = []

        def test_step(self, batch, batch_idx):
            assert type(batch) is list and all(type(s) is QASample for s in batch)
            self.seen += [s.sample_id for s in batch]

    dm, module = MultiHopQADataModule(num_samples=10, batch_size=4), Collect()
    trainer = quiet_trainer(tmp_path)
    trainer.test(module, datamodule=dm, verbose=False)
    assert module.seen == [s.sample_id for s in dm.samples]
