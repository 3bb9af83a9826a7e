"""The activation store: per-token (sender, receiver) hidden-state pairs as sharded safetensors plus ``manifest.json``.

Layout of a store folder::

    manifest.json            written last, atomically: the store is complete iff it exists
    manifest.partial.json    progress of an unfinished extraction (finished shards only)
    shard-00000.safetensors  tensors "sender" (n, d_s), "receiver" (n, d_r), "doc" int64 (n,), "pos" int32 (n,)
    ...

Rows are ordered by document, then token position, so "the last 10% of rows" is a deterministic split. Each shard
ends at a batch boundary and records the document range it covers; an interrupted extraction resumes after its
last finished shard and produces the same rows as an uninterrupted one.

The cache key (``store_key``) hashes everything the activations depend on: both models (name, revision, layer,
dtype, preset seed), the corpus fingerprint, ``max_length`` and the storage dtype.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from datamodules.corpora import Corpus, CorpusSpec, load_corpus
from lightning_modules.components.frozen_lm import LoadedModel, ModelRef, as_ref, load_ref, resolve_dtype
from lightning_modules.components.hooks import capture_hidden
from lightning_modules.components.io import atomic_output, cache_root, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"


class StoreError(ValueError):
    """A store that cannot be used as asked: missing, incomplete, mismatching or corrupt."""


class NonFiniteActivations(StoreError):
    """NaN or Inf in captured or stored activations."""


# --------------------------------------------------------------------------------------------- keys and specs


def ref_spec(ref: ModelRef | dict | str) -> dict:
    """The fields of a model reference that change its activations (trust_remote_code does not)."""
    ref = as_ref(ref)
    return {
        "name": ref.name,
        "revision": ref.revision,
        "layer": ref.layer,
        "dtype": ref.dtype,
        "preset_seed": ref.preset_seed,
    }


def store_spec(
    sender: ModelRef | dict | str,
    receiver: ModelRef | dict | str,
    corpus_fingerprint: str,
    max_length: int,
    store_dtype: str = "float32",
) -> dict:
    """Everything a store's content depends on; two stores with equal specs hold the same pairs."""
    return {
        "format_version": FORMAT_VERSION,
        "sender": ref_spec(sender),
        "receiver": ref_spec(receiver),
        "corpus_fingerprint": corpus_fingerprint,
        "max_length": int(max_length),
        "store_dtype": store_dtype,
    }


def store_key(spec: dict) -> str:
    """A short stable hash of a store spec: the cache folder name."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def default_store_dir(spec: dict, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "activations" / store_key(spec)


def diff_spec(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two specs."""
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_spec(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (config {a!r}, store {b!r})")
    return out


# --------------------------------------------------------------------------------------------- atomic files


def write_json_atomic(path: Path, obj) -> None:
    write_json(path, obj)  # readers see the old file or the new one, never half of one


def save_shard_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def read_manifest(folder: str | Path, name: str = MANIFEST) -> dict | None:
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"activation store manifest {path} is not valid JSON ({err})") from err


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialize extraction into one folder across processes (DDP ranks started together, two runs at once)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:  # "a": never truncate (no write, no mtime change)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(dim=-1).sum())
        raise NonFiniteActivations(f"{what}: {bad} row(s) hold NaN or Inf")


# --------------------------------------------------------------------------------------------- writing


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _clear_store(folder: Path) -> None:
    for p in list(folder.glob("shard-*.safetensors")) + [folder / MANIFEST, folder / PARTIAL]:
        p.unlink(missing_ok=True)


def _pad_to_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    out_dtype = resolve_dtype(store_dtype)
    tok = sender.tokenizer
    tok.padding_side = "right"  # real tokens keep positions 0..len-1, exactly as when run one at a time

    partial = read_manifest(folder, PARTIAL)
    shards: list[dict] = []
    if partial is not None and partial.get("spec") == spec and partial.get("batch_size") == batch_size:
        shards = [s for s in partial["shards"] if (folder / s["file"]).is_file()]
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
        name = _shard_name(len(shards))
        tensors = {k: torch.cat(v) for k, v in buf.items()}
        save_shard_atomic(folder / name, tensors)
        shards.append({"file": name, "rows": buf_rows, "doc_start": buf_doc_start, "doc_end": doc_end})
        write_json_atomic(folder / PARTIAL, {**base, "shards": shards})
        for v in buf.values():
            v.clear()
        buf_rows, buf_doc_start = 0, doc_end

    docs = corpus.documents
    for b0 in range(doc_start, len(docs), batch_size):
        b1 = min(b0 + batch_size, len(docs))
        enc = tok(docs[b0:b1], truncation=True, max_length=spec["max_length"], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.inference_mode():
            hs = capture_hidden(sender.model, sender.layer.path, ids.to(_pad_to_device(sender.model)),
                                mask.to(_pad_to_device(sender.model)))  # fmt: skip
            hr = capture_hidden(receiver.model, receiver.layer.path, ids.to(_pad_to_device(receiver.model)),
                                mask.to(_pad_to_device(receiver.model)))  # fmt: skip
        keep = mask.bool()
        s_rows, r_rows = hs.cpu()[keep], hr.cpu()[keep]
        where = f"activation shard {folder / _shard_name(len(shards))} (documents {b0}..{b1 - 1})"
        _check_finite(s_rows, f"sender {s_id['name']} {where}")
        _check_finite(r_rows, f"receiver {r_id['name']} {where}")
        doc_idx = torch.arange(b0, b1).unsqueeze(1).expand_as(ids)[keep]
        pos = torch.arange(ids.shape[1], dtype=torch.int32).unsqueeze(0).expand_as(ids)[keep]
        buf["sender"].append(s_rows.to(out_dtype))
        buf["receiver"].append(r_rows.to(out_dtype))
        buf["doc"].append(doc_idx.to(torch.int64))
        buf["pos"].append(pos)
        buf_rows += int(keep.sum())
        new_tokens += int(keep.sum())
        if buf_rows >= shard_rows:
            flush(b1)
    if buf_rows:
        flush(len(docs))
    seconds = time.perf_counter() - t0
    manifest = {
        **base,
        "shards": shards,
        "num_tokens": sum(s["rows"] for s in shards),
        "extraction": {"seconds_last_run": round(seconds, 3), "tokens_last_run": new_tokens},
    }
    if manifest["num_tokens"] == 0:
        raise StoreError(f"extraction into {folder} produced no tokens: is the corpus empty after tokenization?")
    write_json_atomic(folder / MANIFEST, manifest)
    (folder / PARTIAL).unlink(missing_ok=True)
    log.info("activation store %s: %d pairs in %d shard(s)", folder, manifest["num_tokens"], len(shards))
    return manifest


def write_pairs_store(
    folder: str | Path,
    sender: torch.Tensor,
    receiver: torch.Tensor,
    *,
    shard_rows: int = 65536,
    sender_identity: dict | None = None,
    receiver_identity: dict | None = None,
    spec: dict | None = None,
) -> dict:
    """Write in-memory pairs as a store (synthetic stores for tests and benchmarks). No finiteness check."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, ds = sender.shape
    dr = receiver.shape[1]
    s_id = sender_identity or {"name": "synthetic-sender", "hidden_size": ds, "layer": "synthetic", "layer_index": 0}
    r_id = receiver_identity or {"name": "synthetic-receiver", "hidden_size": dr, "layer": "synthetic",
                                 "layer_index": 0}  # fmt: skip
    shards = []
    for i, lo in enumerate(range(0, n, shard_rows)):
        hi = min(lo + shard_rows, n)
        name = _shard_name(i)
        idx = torch.arange(lo, hi)
        save_shard_atomic(folder / name, {"sender": sender[lo:hi], "receiver": receiver[lo:hi], "doc": idx,
                                          "pos": torch.zeros(hi - lo, dtype=torch.int32)})  # fmt: skip
        shards.append({"file": name, "rows": hi - lo, "doc_start": lo, "doc_end": hi})
    manifest = {
        "format_version": FORMAT_VERSION,
        "spec": spec or {"synthetic": True},
        "models": {"sender": s_id, "receiver": r_id},
        "layers": {"sender": s_id.get("layer"), "receiver": r_id.get("layer")},
        "dims": {"sender": ds, "receiver": dr},
        "dtype": str(sender.dtype).removeprefix("torch."),
        "corpus": {"fingerprint": None, "spec": {"source": "synthetic"}, "num_documents": n},
        "max_length": None,
        "shards": shards,
        "num_tokens": n,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------- ensure (cache logic)


def _load_for_option(ref: ModelRef, option: str, cache_dir: str | None) -> LoadedModel:
    try:
        return load_ref(ref, cache_dir=cache_dir)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from err


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

    A complete matching store is reused. In the keyed cache a mismatching store is rebuilt; in an explicit
    ``store_dir`` it is an error (the user's data is never deleted implicitly) unless ``rebuild`` is set.
    """
    sender, receiver = as_ref(sender), as_ref(receiver)
    corpus_obj = load_corpus(corpus)
    spec = store_spec(sender, receiver, corpus_obj.fingerprint, max_length, store_dtype)
    explicit = store_dir is not None
    folder = Path(store_dir).expanduser() if explicit else default_store_dir(spec, cache_dir)
    with _folder_lock(folder):
        for name in (MANIFEST, PARTIAL):
            found = read_manifest(folder, name)
            if found is None:
                continue
            if found.get("spec") == spec:
                if name == MANIFEST and not rebuild:
                    log.info("activation cache hit: reusing %s (%d pairs)", folder, found["num_tokens"])
                    return folder, found
                break  # a matching partial: resume below
            diffs = diff_spec(spec, found.get("spec", {}))
            if explicit and not rebuild:
                raise StoreError(
                    f"activation store {folder / name} was built for a different configuration: "
                    f"{'; '.join(diffs)}. Use another data.store_dir, or --data.rebuild true to rebuild it"
                )
            log.warning("activation cache %s does not match the config (%s): rebuilding", folder, "; ".join(diffs))
            _clear_store(folder)
            break
        else:
            log.info("activation cache miss: extracting into %s", folder)
        if rebuild and read_manifest(folder, MANIFEST) is not None:
            log.warning("data.rebuild is set: rebuilding %s", folder)
            _clear_store(folder)
        s = _load_for_option(sender, "data.sender_model", cache_dir)
        r = _load_for_option(receiver, "data.receiver_model", cache_dir)
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))  # fmt: skip
        s.model.to(dev)
        r.model.to(dev)
        manifest = extract_store(s, r, corpus_obj, folder, spec, batch_size=batch_size, shard_rows=shard_rows,
                                 store_dtype=store_dtype)  # fmt: skip
    return folder, manifest


# --------------------------------------------------------------------------------------------- reading


class PairStore:
    """Read access to a complete store: contiguous row ranges, loaded lazily shard by shard.

    Only the rows asked for are read (safetensors slices of memory-mapped files), so memory follows the
    request size, not the store size.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            hint = " (an unfinished extraction: rerun it to resume)" if (self.folder / PARTIAL).is_file() else ""
            raise StoreError(f"activation store {self.folder / MANIFEST} does not exist{hint}")
        self.manifest = manifest
        self.shards = manifest["shards"]
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + int(s["rows"]))
        self.num_rows = self.offsets[-1]
        self.sender_dim = int(manifest["dims"]["sender"])
        self.receiver_dim = int(manifest["dims"]["receiver"])
        for s in self.shards:
            if not (self.folder / s["file"]).is_file():
                raise StoreError(f"activation shard {self.folder / s['file']} listed in the manifest is missing")

    def __len__(self) -> int:
        return self.num_rows

    def read(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Rows ``[lo, hi)`` as float32 ``sender``/``receiver`` tensors. Raises on NaN/Inf, naming the shard."""
        from safetensors import safe_open

        parts: dict[str, list[torch.Tensor]] = {"sender": [], "receiver": []}
        for i, shard in enumerate(self.shards):
            s0, s1 = self.offsets[i], self.offsets[i + 1]
            a, b = max(lo, s0), min(hi, s1)
            if a >= b:
                continue
            path = self.folder / shard["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in parts:
                        t = f.get_slice(key)[a - s0 : b - s0].float()
                        _check_finite(t, f"activation shard {path} ({key}, rows {a - s0}..{b - s0 - 1})")
                        parts[key].append(t)
            except StoreError:
                raise
            except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
                raise StoreError(f"cannot read activation shard {path}: {type(err).__name__}: {err}") from err
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}

    def read_rows(self, rows) -> dict[str, torch.Tensor]:
        """Rows at the given sorted global indices (numpy int array), read as contiguous runs, one open per shard."""
        import numpy as np
        from safetensors import safe_open

        rows = np.asarray(rows, dtype=np.int64)
        out: dict[str, list[torch.Tensor]] = {"sender": [], "receiver": []}
        if len(rows) == 0:
            return {k: torch.empty(0) for k in out}
        # runs of consecutive indices: [starts[i], ends[i])
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = rows[np.r_[0, breaks]]
        ends = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
        shard_of = np.searchsorted(self.offsets, starts, side="right") - 1
        i = 0
        while i < len(starts):
            sid = int(shard_of[i])
            s0, s1 = self.offsets[sid], self.offsets[sid + 1]
            path = self.folder / self.shards[sid]["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    slices = {k: f.get_slice(k) for k in out}
                    while i < len(starts) and int(shard_of[i]) == sid:
                        a, b = int(starts[i]), int(ends[i])
                        cut = min(b, s1)
                        for k in out:
                            t = slices[k][a - s0 : cut - s0].float()
                            _check_finite(t, f"activation shard {path} ({k}, rows {a - s0}..{cut - s0 - 1})")
                            out[k].append(t)
                        if cut < b:  # the run continues in the next shard
                            starts[i] = cut
                            shard_of[i] = sid + 1
                            break
                        i += 1
            except StoreError:
                raise
            except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
                raise StoreError(f"cannot read activation shard {path}: {type(err).__name__}: {err}") from err
        return {k: torch.cat(v) for k, v in out.items()}


def manifest_summary(manifest: dict) -> dict:
    """A small JSON-safe summary (for logs and W&B)."""
    return {
        "num_tokens": manifest["num_tokens"],
        "num_shards": len(manifest["shards"]),
        "dims": manifest["dims"],
        "layers": manifest["layers"],
        "dtype": manifest["dtype"],
    }
