"""Activation store: extraction, cache reuse/rebuild, resume, and bad input (corpus, models, NaN, tokenizers)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import datamodules.activation_store as store_mod
from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.models.hooks import capture_hidden
from activation_transfer.task.tokenizer import offline_tokenizer
from datamodules.activation_pairs import ActivationPairDataModule
from datamodules.activation_store import ensure_store, extract_store
from datamodules.corpora import CorpusSpec, load_corpus
from datamodules.store_format import NonFiniteActivations, PairStore, StoreError, write_pairs_store

SENDER, RECEIVER = ModelRef("tiny-neox", layer=0.67), ModelRef("tiny-neox-large", layer=0.67)
CORPUS = CorpusSpec(builtin_samples=12)
SMALL = dict(max_length=64, batch_size=4, shard_rows=100)


def test_extraction_pairs_tokens_exactly(tmp_path):
    folder, manifest = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(tmp_path / "s"), **SMALL)
    s, r = load_ref(SENDER), load_ref(RECEIVER)
    # Identities first: tokenizer_fingerprint serializes the backend, whose truncation state a call changes.
    assert manifest["models"]["sender"] == s.identity() and manifest["models"]["receiver"] == r.identity()
    docs = load_corpus(CORPUS).documents
    lengths = [len(s.tokenizer(d, truncation=True, max_length=64).input_ids) for d in docs]
    # Pad positions are skipped: one row per real token.
    assert manifest["num_tokens"] == sum(lengths) == sum(x["rows"] for x in manifest["shards"])
    assert len(manifest["shards"]) > 1
    assert manifest["dims"] == {"sender": 32, "receiver": 48}
    assert manifest["layers"] == {"sender": "gpt_neox.layers.1", "receiver": "gpt_neox.layers.2"}
    # Batched, right-padded extraction equals running the last document alone.
    ids = torch.tensor([s.tokenizer(docs[-1], truncation=True, max_length=64).input_ids])
    want_s = capture_hidden(s.model, s.layer.path, ids)[0]
    want_r = capture_hidden(r.model, r.layer.path, ids)[0]
    store = PairStore(folder)
    got = store.read_rows(torch.arange(store.num_rows - lengths[-1], store.num_rows).numpy())
    torch.testing.assert_close(got["sender"], want_s, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["receiver"], want_r, atol=1e-5, rtol=1e-4)


def test_extraction_of_a_learned_position_model_equals_each_document_alone(tmp_path):
    # GPT-2 has learned absolute positions: a padded batch that shifted a document's positions (left padding, or
    # pad rows kept) would change its states by ~0.1 at norms ~0.2. Rotary models (above) cannot show that: their
    # states depend on position differences only. Every document is checked, row by row, against its own
    # unpadded forward pass; the store's rows must be exactly the real tokens, in document order.
    sender = ModelRef("tiny-gpt2", layer=0.67)
    folder, manifest = ensure_store(sender, RECEIVER, CORPUS, store_dir=str(tmp_path / "s"), **SMALL)
    s, r = load_ref(sender), load_ref(RECEIVER)
    docs = load_corpus(CORPUS).documents
    rows = [s.tokenizer(d, truncation=True, max_length=64).input_ids for d in docs]
    assert len({len(x) for x in rows[:4]}) > 1  # the first batch of 4 really is padded
    store = PairStore(folder)
    assert store.num_rows == sum(map(len, rows)) and len(manifest["shards"]) > 1
    got = store.read(0, store.num_rows)
    start = 0
    for ids in rows:
        t = torch.tensor([ids])
        want_s = capture_hidden(s.model, s.layer.path, t)[0]
        want_r = capture_hidden(r.model, r.layer.path, t)[0]
        torch.testing.assert_close(got["sender"][start : start + len(ids)], want_s, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["receiver"][start : start + len(ids)], want_r, atol=1e-5, rtol=1e-4)
        start += len(ids)
    # read_rows with runs of consecutive rows that cross shard boundaries gives the rows of the contiguous read.
    picked = [i for i in range(3, store.num_rows) if i % 97]
    assert store.offsets[1] in picked and store.offsets[1] - 1 in picked  # a run crosses the first boundary
    for key in ("sender", "receiver"):
        assert torch.equal(store.read_rows(picked)[key], got[key][picked])


def test_cache_hit_then_mismatch_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="datamodules")
    folder, m1 = ensure_store(SENDER, RECEIVER, CORPUS, cache_dir=str(tmp_path), **SMALL)
    assert folder.parent == tmp_path / "activations"
    caplog.clear()
    folder2, m2 = ensure_store(SENDER, RECEIVER, CORPUS, cache_dir=str(tmp_path), **SMALL)
    assert folder2 == folder and m2 == m1 and "cache hit" in caplog.text
    # A keyed cache whose manifest disagrees (e.g. an older format) is rebuilt, with a log line saying so.
    bad = dict(m1, spec=dict(m1["spec"], format_version=0))
    (folder / "manifest.json").write_text(json.dumps(bad))
    caplog.clear()
    _, m3 = ensure_store(SENDER, RECEIVER, CORPUS, cache_dir=str(tmp_path), **SMALL)
    assert "rebuilding" in caplog.text and m3["spec"] == m1["spec"] and m3["num_tokens"] == m1["num_tokens"]
    # A different max_length is a different key: another folder.
    other, _ = ensure_store(SENDER, RECEIVER, CORPUS, cache_dir=str(tmp_path), **dict(SMALL, max_length=16))
    assert other != folder


def test_a_cache_dir_under_home_is_the_same_cache_from_any_folder(tmp_path, monkeypatch):
    # data.store_dir expanded "~", data.cache_dir and $ACTIVATION_TRANSFER_CACHE did not (bash leaves
    # --data.cache_dir=~/c alone, YAML always): the store went to ./~/c/activations under the current folder.
    from activation_transfer.io import cache_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    folder, _ = ensure_store(SENDER, RECEIVER, CORPUS, cache_dir="~/c", **SMALL)
    assert folder.parent == tmp_path / "home" / "c" / "activations" and not (tmp_path / "work" / "~").exists()
    monkeypatch.setenv("ACTIVATION_TRANSFER_CACHE", "~/env")
    assert cache_root() == tmp_path / "home" / "env"


def test_explicit_store_mismatch_is_an_error_and_keeps_data(tmp_path):
    folder, _ = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(tmp_path / "s"), **SMALL)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".lock"}
    with pytest.raises(StoreError, match=r"manifest\.json.*max_length.*data\.rebuild"):
        ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **dict(SMALL, max_length=32))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".lock"} == before
    _, m = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), rebuild=True, **dict(SMALL, max_length=32))
    assert m["max_length"] == 32


def test_nan_stops_naming_the_shard_then_resume_matches(tmp_path, monkeypatch, caplog):
    ref_folder, ref = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(tmp_path / "ref"), **SMALL)
    calls = {"n": 0}
    real = store_mod.capture_hidden

    def flaky(model, path, ids, mask=None, **kw):
        calls["n"] += 1
        out = real(model, path, ids, mask, **kw)
        return out * float("nan") if calls["n"] == 5 else out  # the sender pass of the 3rd batch

    monkeypatch.setattr(store_mod, "capture_hidden", flaky)
    folder = tmp_path / "s"
    with pytest.raises(NonFiniteActivations, match=r"shard-0000\d\.safetensors.*NaN or Inf"):
        ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **SMALL)
    finished = sorted(p.name for p in folder.glob("shard-*.safetensors"))
    assert finished and not (folder / "manifest.json").exists() and (folder / "manifest.partial.json").exists()
    monkeypatch.setattr(store_mod, "capture_hidden", real)
    caplog.set_level(logging.INFO, logger="datamodules")
    _, m = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **SMALL)
    assert "resuming" in caplog.text
    assert m["num_tokens"] == ref["num_tokens"] and m["shards"] == ref["shards"]
    a, b = PairStore(folder), PairStore(ref_folder)
    rows = torch.arange(a.num_rows).numpy()
    torch.testing.assert_close(a.read_rows(rows), b.read_rows(rows))


def test_resume_after_a_missing_middle_shard_reextracts_from_the_gap(tmp_path, monkeypatch):
    # An unfinished store whose first shard file is gone: resuming after the shards that remain (the later ones) lost
    # shard 0's documents and wrote the next shard over shard-00001, listed twice in a manifest that never opened.
    ref_folder, ref = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(tmp_path / "ref"), **SMALL)
    real, calls = store_mod.save_shard, {"n": 0}

    def interrupted(path, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(path, tensors)

    monkeypatch.setattr(store_mod, "save_shard", interrupted)
    folder = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **SMALL)
    monkeypatch.setattr(store_mod, "save_shard", real)
    (folder / "shard-00000.safetensors").unlink()
    _, m = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **SMALL)
    assert m["num_tokens"] == ref["num_tokens"] and m["shards"] == ref["shards"]
    rows = torch.arange(ref["num_tokens"]).numpy()
    torch.testing.assert_close(PairStore(folder).read_rows(rows), PairStore(ref_folder).read_rows(rows))


def test_resume_ignores_a_listed_shard_that_another_batch_size_overwrote(tmp_path, monkeypatch):
    # Run A (batch 4) stops after two shards; run B (batch 8) cannot resume A's partial, writes its own shard-00000
    # over A's and is killed before recording it. Resuming A's partial trusted the file's existence: the manifest
    # then listed A's 162-row shard 0 over B's 318-row file, and a store reported as finished did not open.
    ref_folder, ref = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(tmp_path / "ref"), **SMALL)
    folder, real_save, calls = tmp_path / "s", store_mod.save_shard, {"n": 0}

    def interrupted(path, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_save(path, tensors)

    def killed(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "save_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **SMALL)
    monkeypatch.setattr(store_mod, "save_shard", real_save)
    monkeypatch.setattr(store_mod, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **dict(SMALL, batch_size=8))
    monkeypatch.undo()
    _, m = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **SMALL)
    assert m["shards"] == ref["shards"]
    rows = torch.arange(ref["num_tokens"]).numpy()
    torch.testing.assert_close(PairStore(folder).read_rows(rows), PairStore(ref_folder).read_rows(rows))


def test_nan_in_stored_shard_is_reported(tmp_path):
    s, r = torch.randn(50, 4), torch.randn(50, 3)
    r[37, 1] = float("inf")
    write_pairs_store(tmp_path, s, r, shard_rows=20)
    with pytest.raises(NonFiniteActivations, match=r"shard-00001\.safetensors"):
        PairStore(tmp_path).read_rows(torch.arange(50).numpy())


def test_new_weights_in_a_local_model_folder_rebuild_the_store(tmp_path, caplog):
    # Same folder name, other weights (a new export, a retrained organism): the activations must be re-extracted.
    from activation_transfer.models.frozen_lm import load_model

    folder = tmp_path / "model"
    load_model("tiny-neox").save_pretrained(folder)
    offline_tokenizer().save_pretrained(folder)
    ref, cache = ModelRef(str(folder), layer=1), str(tmp_path / "cache")
    first, m1 = ensure_store(ref, RECEIVER, CORPUS, cache_dir=cache, **SMALL)
    load_model("tiny-neox", preset_seed=1).save_pretrained(folder)
    caplog.set_level(logging.INFO, logger="datamodules")
    second, m2 = ensure_store(ref, RECEIVER, CORPUS, cache_dir=cache, **SMALL)
    assert second != first and "cache miss" in caplog.text
    digests = (m1["models"]["sender"]["weights_sha256"], m2["models"]["sender"]["weights_sha256"])
    assert None not in digests and digests[0] != digests[1] and m2["spec"]["sender"]["weights_sha256"] == digests[1]
    rows = torch.arange(10).numpy()
    assert not torch.equal(PairStore(first).read_rows(rows)["sender"], PairStore(second).read_rows(rows)["sender"])


def test_different_tokenizers_are_refused(tmp_path):
    s, r = load_ref(SENDER), load_ref(RECEIVER)
    r.tokenizer = offline_tokenizer(str(tmp_path), vocab_size=400)
    with pytest.raises(StoreError, match="different tokenizers"):
        extract_store(s, r, load_corpus(CORPUS), tmp_path / "s", {}, batch_size=4)


def test_max_length_past_a_models_positions_names_the_option(tmp_path):
    # tiny-gpt2 has 512 learned positions: a longer document at max_length 1024 stopped extraction with a bare
    # "IndexError: index out of range in self"; rotary tiny-neox silently stored positions past its 512.
    corpus = tmp_path / "long.txt"
    corpus.write_text("short one\n" + " ".join(["river stone"] * 450) + "\n")
    for sender in (ModelRef("tiny-gpt2"), SENDER):  # learned positions, rotary ones
        with pytest.raises(StoreError, match=r"max_length=1024 exceeds the 512 positions of data\.sender_model"):
            ensure_store(sender, RECEIVER, str(corpus), store_dir=str(tmp_path / "s"), **dict(SMALL, max_length=1024))
    assert not list((tmp_path / "s").glob("shard-*"))


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        (ModelRef("preset:no-such-model"), r"data\.sender_model.*unknown model preset"),
        (ModelRef("tiny-neox", layer=7), r"data\.sender_model.*out of range"),
    ],
)
def test_bad_model_through_the_data_module(tmp_path, ref, match):
    dm = ActivationPairDataModule(
        sender_model=ref, receiver_model=RECEIVER, corpus=CORPUS, store_dir=str(tmp_path / "s"), max_length=32
    )
    with pytest.raises(ValueError, match=match):
        _ = dm.sender_dim


def test_corpora_local_files_and_errors(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first line\n\n   \nsecond line\n")
    c = load_corpus(str(txt))
    assert c.documents == ["first line", "second line"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "first line"}) + "\n" + json.dumps({"text": "second line"}) + "\n")
    assert load_corpus(CorpusSpec(source=str(jl))).fingerprint == c.fingerprint
    assert load_corpus(CorpusSpec(source=str(txt), max_documents=1)).fingerprint != c.fingerprint
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt holds no non-empty"):
        load_corpus(str(empty))
    with pytest.raises(ValueError, match=r"c\.jsonl, line 1: no 'body' field"):
        load_corpus(CorpusSpec(source=str(jl), text_field="body"))
    # A missing corpus stops the data module before any model is loaded.
    dm = ActivationPairDataModule(SENDER, RECEIVER, corpus=CorpusSpec(source=str(tmp_path / "missing.txt")))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        _ = dm.manifest


# --------------------------------------------------------------------------------------------- store integrity


def _small_store(folder):
    g = torch.Generator().manual_seed(0)
    write_pairs_store(folder, torch.randn(50, 4, generator=g), torch.randn(50, 3, generator=g), shard_rows=20)
    return folder


def _edit_manifest(folder, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _rows(shard: int, rows: int):
    def edit(m):
        m["num_tokens"] += rows - m["shards"][shard]["rows"]
        m["shards"][shard]["rows"] = rows

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_rows(1, 19), r"shard-00001\.safetensors does not match its manifest: sender \[20, 4\] \(manifest: \[19, "),
        (_rows(2, 11), r"shard-00002\.safetensors does not match its manifest: sender \[10, 4\] \(manifest: \[11, "),
        (lambda m: m["dims"].update(sender=5), r"shard-00000\.safetensors .*sender \[20, 4\] \(manifest: \[20, 5\]\)"),
        (lambda m: m.update(num_tokens=40), r"num_tokens 40 but its shards list 50 rows"),
    ],
    ids=["rows-smaller-than-shard", "rows-larger-than-shard", "dims-edited", "num-tokens-edited"],
)
def test_manifest_disagreeing_with_its_shards_is_refused_on_open(tmp_path, edit, match):
    folder = _small_store(tmp_path / "s")
    _edit_manifest(folder, edit)
    with pytest.raises(StoreError, match=match + r".*--data\.rebuild true"):
        _ = ActivationPairDataModule(store_dir=str(folder)).sender_dim


def test_finite_bit_flip_in_a_shard_is_detected(tmp_path):
    folder = _small_store(tmp_path / "s")
    path = folder / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8 : 8 + header_len])["sender"]["data_offsets"][0]
    data[start] ^= 1  # the lowest mantissa bit of a float32: the value stays finite
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors does not match the SHA-256.*--data\.rebuild true"):
        _ = ActivationPairDataModule(store_dir=str(folder)).sender_dim
    # Only the digest catches it: without verification the changed row reads as an ordinary number.
    dm = ActivationPairDataModule(store_dir=str(folder), verify=False)
    assert dm.sender_dim == 4 and torch.isfinite(PairStore(folder, verify=False).read(0, 50)["sender"]).all()


def test_rebuild_repairs_an_unreadable_manifest(tmp_path, caplog):
    folder, m = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(tmp_path / "s"), **SMALL)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest\.json is not valid JSON.*--data\.rebuild true"):
        ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **SMALL)
    _, rebuilt = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), rebuild=True, **SMALL)
    assert rebuilt["shards"] == m["shards"] and PairStore(folder).num_rows == m["num_tokens"]
    # In the keyed cache an unreadable manifest is rebuilt without being asked, saying so.
    keyed, _ = ensure_store(SENDER, RECEIVER, CORPUS, cache_dir=str(tmp_path / "cache"), **SMALL)
    (keyed / "manifest.json").write_bytes(b"\xff\xfe")
    caplog.set_level(logging.WARNING, logger="datamodules")
    _, again = ensure_store(SENDER, RECEIVER, CORPUS, cache_dir=str(tmp_path / "cache"), **SMALL)
    assert "rebuilding" in caplog.text and again["shards"] == m["shards"]


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    folder, _ = ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(tmp_path / "s"), **SMALL)
    leaked = folder / ".shard-00001.safetensors.k9x2ab.tmp"  # what atomic_output leaves after kill -9
    leaked.write_bytes(b"\0" * 1000)
    ensure_store(SENDER, RECEIVER, CORPUS, store_dir=str(folder), **SMALL)  # a cache hit still cleans up
    assert not leaked.exists() and (folder / "manifest.json").is_file()
