"""Extraction into an activation store and the cache logic around it (:func:`ensure_store`).

Both frozen models read the same token ids; every real (non-padding) token becomes one row of a store, whose
format (folder layout, manifest, spec and cache key, reader) lives in ``datamodules.store_format``. An interrupted
extraction resumes after its last finished shard and produces the same rows as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from activation_transfer.errors import UsageError
from activation_transfer.io import sha256_file, write_json
from activation_transfer.loop_progress import Progress
from activation_transfer.models.frozen_lm import LoadedModel, ModelRef, as_ref, load_ref, resolve_dtype
from activation_transfer.models.hooks import capture_hidden
from activation_transfer.run_lock import folder_lock
from datamodules.corpora import Corpus, CorpusSpec, load_corpus
from datamodules.store_format import (
    FORMAT_VERSION,
    MANIFEST,
    PARTIAL,
    StoreError,
    check_finite,
    default_store_dir,
    diff_spec,
    read_manifest,
    ref_spec,
    save_shard,
    shard_name,
    store_spec,
)

log = logging.getLogger(__name__)


def _remove_temporaries(folder: Path) -> None:
    """Remove what killed writers left behind (``atomic_output``'s ``.<name>.*.tmp``, a whole shard each).

    Called under the folder's lock, which every writer of the folder holds, so no live write is touched."""
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def _clear_store(folder: Path) -> None:
    for p in list(folder.glob("shard-*.safetensors")) + [folder / MANIFEST, folder / PARTIAL]:
        p.unlink(missing_ok=True)


def _shard_intact(folder: Path, shard: dict) -> bool:
    """The shard's file holds the bytes its (partial) manifest entry recorded."""
    path = folder / shard["file"]
    return path.is_file() and sha256_file(path) == shard.get("sha256")


def _hidden(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The chosen block's output for a right-padded batch, on the CPU."""
    device = next(lm.model.parameters()).device
    return capture_hidden(lm.model, lm.layer.path, ids.to(device), mask.to(device)).cpu()


def extract_store(
    sender: LoadedModel,
    receiver: LoadedModel,
    corpus: Corpus,
    folder: str | Path,
    spec: dict,
    *,
    batch_size: int = 16,
    shard_rows: int = 65536,
    store_dtype: str = "float32",
) -> dict:
    """Run both frozen models over the corpus and write the pairs into ``folder`` (resuming finished shards).

    Both models read the same token ids (checked through the tokenizer fingerprints), so row t of the sender
    tensor and row t of the receiver tensor belong to the same token. Padding positions are skipped.

    Returns:
        The manifest of the finished store.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s_id, r_id = sender.identity(), receiver.identity()
    if s_id["tokenizer_sha256"] != r_id["tokenizer_sha256"]:
        raise StoreError(
            f"sender {s_id['name']!r} and receiver {r_id['name']!r} use different tokenizers "
            f"(sha256 {s_id['tokenizer_sha256'][:12]} vs {r_id['tokenizer_sha256'][:12]}): per-token pairs need "
            "identical token ids; choose models that share a tokenizer "
            "(data.sender_model.name / data.receiver_model.name)"
        )
    for option, lm in (("data.sender_model", sender), ("data.receiver_model", receiver)):
        # Past its position table a learned-position model (GPT-2) fails with a bare IndexError, and a rotary one
        # returns states for positions it never saw: refuse before any document is run.
        limit = getattr(lm.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and spec["max_length"] > limit:
            raise StoreError(
                f"data.max_length={spec['max_length']} exceeds the {limit} positions of {option} {lm.ref.name!r} "
                f"(max_position_embeddings); set data.max_length <= {limit}"
            )
    out_dtype = resolve_dtype(store_dtype)
    tok = sender.tokenizer
    tok.padding_side = "right"  # real tokens keep positions 0..len-1, exactly as when run one at a time

    partial = read_manifest(folder, PARTIAL)
    shards: list[dict] = []
    if partial is not None and partial.get("spec") == spec and partial.get("batch_size") == batch_size:
        # The finished shards up to the first missing or changed file: rows after a gap would be kept with the gap's
        # lost, and a file's existence is not enough: an extraction with another batch size, which cannot resume
        # this partial, overwrites its shards and can be killed before it records them.
        shards = list(itertools.takewhile(lambda s: _shard_intact(folder, s), partial["shards"]))
        if shards:
            log.info("resuming extraction in %s after %d finished shard(s)", folder, len(shards))
    doc_start = shards[-1]["doc_end"] if shards else 0

    base = {
        "format_version": FORMAT_VERSION,
        "spec": spec,
        "models": {"sender": s_id, "receiver": r_id},
        "layers": {"sender": s_id["layer"], "receiver": r_id["layer"]},
        "dims": {"sender": s_id["hidden_size"], "receiver": r_id["hidden_size"]},
        "dtype": store_dtype,
        "corpus": {"fingerprint": corpus.fingerprint, "spec": corpus.spec, "num_documents": len(corpus.documents)},
        "max_length": spec["max_length"],
        "batch_size": batch_size,
    }
    buf: dict[str, list[torch.Tensor]] = {"sender": [], "receiver": [], "doc": [], "pos": []}
    buf_rows, buf_doc_start = 0, doc_start
    t0 = time.perf_counter()
    new_tokens = 0

    def flush(doc_end: int) -> None:
        nonlocal buf_rows, buf_doc_start
        name = shard_name(len(shards))
        tensors = {k: torch.cat(v) for k, v in buf.items()}
        digest = save_shard(folder / name, tensors)
        shards.append(
            {"file": name, "rows": buf_rows, "doc_start": buf_doc_start, "doc_end": doc_end, "sha256": digest}
        )
        write_json(folder / PARTIAL, {**base, "shards": shards})
        for v in buf.values():
            v.clear()
        buf_rows, buf_doc_start = 0, doc_end

    docs = corpus.documents
    progress = Progress(len(docs) - doc_start, f"extracting activations into {folder.name}", "tokens", log)
    for b0 in range(doc_start, len(docs), batch_size):
        b1 = min(b0 + batch_size, len(docs))
        enc = tok(docs[b0:b1], truncation=True, max_length=spec["max_length"], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.inference_mode():
            hs, hr = _hidden(sender, ids, mask), _hidden(receiver, ids, mask)
        keep = mask.bool()
        s_rows, r_rows = hs[keep], hr[keep]
        where = f"activation shard {folder / shard_name(len(shards))} (documents {b0}..{b1 - 1})"
        check_finite(s_rows, f"sender {s_id['name']} {where}")
        check_finite(r_rows, f"receiver {r_id['name']} {where}")
        doc_idx = torch.arange(b0, b1).unsqueeze(1).expand_as(ids)[keep]
        pos = torch.arange(ids.shape[1], dtype=torch.int32).unsqueeze(0).expand_as(ids)[keep]
        buf["sender"].append(s_rows.to(out_dtype))
        buf["receiver"].append(r_rows.to(out_dtype))
        buf["doc"].append(doc_idx.to(torch.int64))
        buf["pos"].append(pos)
        buf_rows += int(keep.sum())
        new_tokens += int(keep.sum())
        progress.update(b1 - b0, int(keep.sum()))
        if buf_rows >= shard_rows:
            flush(b1)
    if buf_rows:
        flush(len(docs))
    progress.close()
    seconds = time.perf_counter() - t0
    manifest = {
        **base,
        "shards": shards,
        "num_tokens": sum(s["rows"] for s in shards),
        "extraction": {"seconds_last_run": round(seconds, 3), "tokens_last_run": new_tokens},
    }
    if manifest["num_tokens"] == 0:
        raise StoreError(f"extraction into {folder} produced no tokens: is the corpus empty after tokenization?")
    write_json(folder / MANIFEST, manifest)
    (folder / PARTIAL).unlink(missing_ok=True)
    log.info("activation store %s: %d pairs in %d shard(s)", folder, manifest["num_tokens"], len(shards))
    return manifest


def _for_option(option: str, fn: Callable, *args):
    """``fn(*args)``, with a ValueError prefixed by the config option it is about."""
    try:
        return fn(*args)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from err


def ensure_store(
    sender: ModelRef | dict | str,
    receiver: ModelRef | dict | str,
    corpus: CorpusSpec | dict | str | None = None,
    *,
    store_dir: str | None = None,
    cache_dir: str | None = None,
    max_length: int = 256,
    batch_size: int = 16,
    shard_rows: int = 65536,
    store_dtype: str = "float32",
    device: str = "auto",
    rebuild: bool = False,
) -> tuple[Path, dict]:
    """Return ``(folder, manifest)`` of a complete store for this configuration, extracting only what is missing.

    A complete matching store is reused. In the keyed cache a mismatching or unreadable store is rebuilt; in an
    explicit ``store_dir`` it is an error (the user's data is never deleted implicitly) unless ``rebuild`` is set.
    ``rebuild`` always rebuilds, whatever the folder holds. Stale temporary files of killed writers are removed.
    """
    sender, receiver = as_ref(sender), as_ref(receiver)
    corpus_obj = load_corpus(corpus)
    # The spec holds the weights' identities (a local folder's digest, a Hub commit), read without loading models.
    s_spec = _for_option("data.sender_model", ref_spec, sender, cache_dir)
    r_spec = _for_option("data.receiver_model", ref_spec, receiver, cache_dir)
    spec = store_spec(s_spec, r_spec, corpus_obj.fingerprint, max_length, store_dtype)
    explicit = store_dir is not None
    folder = Path(store_dir).expanduser() if explicit else default_store_dir(spec, cache_dir)
    with folder_lock(folder):  # extraction into one folder: DDP ranks started together, two runs at once
        _remove_temporaries(folder)
        if rebuild:
            log.warning("data.rebuild is set: rebuilding %s", folder)
            _clear_store(folder)
        for name in (MANIFEST, PARTIAL):
            try:
                found = read_manifest(folder, name)
            except StoreError as err:
                if explicit:
                    raise
                log.warning("%s: rebuilding", err)
                _clear_store(folder)
                break
            if found is None:
                continue
            if found.get("spec") == spec:
                if name == MANIFEST:
                    log.info("activation cache hit: reusing %s (%s pairs)", folder, found.get("num_tokens"))
                    return folder, found
                break  # a matching partial: resume below
            diffs = diff_spec(spec, found.get("spec") or {})
            if explicit:
                raise StoreError(
                    f"activation store {folder / name} was built for a different configuration: "
                    f"{'; '.join(diffs)}. Use another data.store_dir, or --data.rebuild true to rebuild it"
                )
            log.warning("activation cache %s does not match the config (%s): rebuilding", folder, "; ".join(diffs))
            _clear_store(folder)
            break
        else:
            log.info("activation cache miss: extracting into %s", folder)
        s = _for_option("data.sender_model", load_ref, sender, cache_dir)
        r = _for_option("data.receiver_model", load_ref, receiver, cache_dir)
        dev = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        )
        s.model.to(dev)
        r.model.to(dev)
        manifest = extract_store(
            s, r, corpus_obj, folder, spec, batch_size=batch_size, shard_rows=shard_rows, store_dtype=store_dtype
        )
    return folder, manifest
