"""The activation store's format: spec and cache key, manifest, shards, and the :class:`PairStore` reader.

A store is a folder of safetensors shards and a ``manifest.json`` written last (layout: docs/NOTES.md, "Module
notes"). The cache key hashes everything the activations depend on (:func:`store_spec`) and the reader checks the
shards against the manifest, so neither new weights under an old name nor an edited file is trained on silently.
``datamodules.activation_store`` extracts and resumes stores; this module only reads and writes the format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from activation_transfer.errors import UsageError
from activation_transfer.io import atomic_output, cache_root, sha256_file, write_json
from activation_transfer.models.frozen_lm import ModelRef, as_ref, weights_identity

FORMAT_VERSION = 2  # 2: per-shard SHA-256 in the manifest, weights identities in the spec
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
REBUILD_HINT = "rebuild the store with --data.rebuild true (extraction needs data.sender_model and data.receiver_model)"


class StoreError(UsageError):
    """A store that cannot be used as asked: missing, incomplete, mismatching or corrupt."""


class NonFiniteActivations(StoreError):
    """NaN or Inf in captured or stored activations."""


# --------------------------------------------------------------------------------------------- keys and specs


def ref_spec(ref: ModelRef | dict | str, cache_dir: str | None = None) -> dict:
    """The fields of a model reference that change its activations (trust_remote_code does not), with the identity
    of the weights the name stands for now (:func:`weights_identity`; ``cache_dir`` resolves ``organism:`` names)."""
    ref = as_ref(ref)
    return {
        "name": ref.name,
        "revision": ref.revision,
        "layer": ref.layer,
        "dtype": ref.dtype,
        "preset_seed": ref.preset_seed,
        **weights_identity(ref, cache_dir),
    }


def store_spec(
    sender: dict, receiver: dict, corpus_fingerprint: str, max_length: int, store_dtype: str = "float32"
) -> dict:
    """Everything a store's content depends on (``sender``/``receiver``: :func:`ref_spec` of each model); two
    stores with equal specs hold the same pairs.

    Each model's part includes the weights' identity (a local folder's content digest or a Hub revision's commit),
    so new weights under an old name never reuse old activations.
    """
    return {
        "format_version": FORMAT_VERSION,
        "sender": sender,
        "receiver": receiver,
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


# --------------------------------------------------------------------------------------------- files


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write one shard atomically (readers see the old file or the new one, never half of one); return its SHA-256."""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        digest = sha256_file(tmp)
    return digest


def read_manifest(folder: str | Path, name: str = MANIFEST) -> dict | None:
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"activation store manifest {path} is not valid JSON ({err}); {REBUILD_HINT}") from err
    if not isinstance(manifest, dict):
        raise StoreError(f"activation store manifest {path} is not a JSON object; {REBUILD_HINT}")
    return manifest


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(dim=-1).sum())
        raise NonFiniteActivations(f"{what}: {bad} row(s) hold NaN or Inf")


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
    r_id = receiver_identity or {
        "name": "synthetic-receiver",
        "hidden_size": dr,
        "layer": "synthetic",
        "layer_index": 0,
    }
    shards = []
    for i, lo in enumerate(range(0, n, shard_rows)):
        hi = min(lo + shard_rows, n)
        name = shard_name(i)
        idx = torch.arange(lo, hi)
        digest = save_shard(
            folder / name,
            {
                "sender": sender[lo:hi],
                "receiver": receiver[lo:hi],
                "doc": idx,
                "pos": torch.zeros(hi - lo, dtype=torch.int32),
            },
        )
        shards.append({"file": name, "rows": hi - lo, "doc_start": lo, "doc_end": hi, "sha256": digest})
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
    write_json(folder / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------- reading


# Shards whose bytes matched the manifest in this process: (path, size, mtime_ns, sha256). Hashing a store is a
# full read of it, so it happens once per process, not at every epoch's reopening.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _verify_shard(path: Path, expected: str) -> None:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    if sha256_file(path) != expected:
        raise StoreError(
            f"activation shard {path} does not match the SHA-256 its manifest records (the file changed after "
            f"extraction); {REBUILD_HINT}"
        )
    _VERIFIED.add(key)


class PairStore:
    """Read access to a complete store: contiguous row ranges, loaded lazily shard by shard.

    Only the rows asked for are read (safetensors slices of memory-mapped files), so memory follows the
    request size, not the store size. Opening checks every shard's shapes against the manifest, and each shard's
    bytes are checked against its SHA-256 once per process (``verify=True``), so an edited manifest or a changed file
    stops the run with the shard's name instead of training on wrong data.

    Args:
        folder: Store folder.
        verify: Check each shard's bytes against the manifest's SHA-256 (once per process and file).
    """

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            hint = " (an unfinished extraction: rerun it to resume)" if (self.folder / PARTIAL).is_file() else ""
            raise StoreError(f"activation store {self.folder / MANIFEST} does not exist{hint}")
        where = self.folder / MANIFEST
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"activation store {where} has format version {manifest.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}; {REBUILD_HINT}"
            )
        try:
            self.shards = manifest["shards"]
            self.offsets = [0]
            for s in self.shards:
                self.offsets.append(self.offsets[-1] + int(s["rows"]))
            self.sender_dim = int(manifest["dims"]["sender"])
            self.receiver_dim = int(manifest["dims"]["receiver"])
            num_tokens = int(manifest["num_tokens"])
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"activation store {where} lacks or garbles {err}; {REBUILD_HINT}") from err
        self.manifest = manifest
        self.num_rows = self.offsets[-1]
        if num_tokens != self.num_rows:
            raise StoreError(
                f"activation store {where} says num_tokens {num_tokens} but its shards list "
                f"{self.num_rows} rows; {REBUILD_HINT}"
            )
        for s in self.shards:
            self._check_shard(s, verify)

    def _check_shard(self, shard: dict, verify: bool) -> None:
        """The shard exists, holds the tensors and shapes its manifest entry promises, and (verify) its bytes."""
        from safetensors import safe_open

        path, rows = self.folder / shard["file"], int(shard["rows"])
        if not path.is_file():
            raise StoreError(f"activation shard {path} listed in the manifest is missing; {REBUILD_HINT}")
        expected = {
            "sender": [rows, self.sender_dim],
            "receiver": [rows, self.receiver_dim],
            "doc": [rows],
            "pos": [rows],
        }
        try:
            with safe_open(str(path), framework="pt") as f:
                found = {k: list(f.get_slice(k).get_shape()) if k in f.keys() else None for k in expected}
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise StoreError(
                f"cannot read activation shard {path}: {type(err).__name__}: {err}; {REBUILD_HINT}"
            ) from err
        bad = [f"{k} {found[k]} (manifest: {v})" for k, v in expected.items() if found[k] != v]
        if bad:
            raise StoreError(f"activation shard {path} does not match its manifest: {', '.join(bad)}; {REBUILD_HINT}")
        if verify:
            if "sha256" not in shard:
                raise StoreError(f"activation shard {path} has no SHA-256 in its manifest; {REBUILD_HINT}")
            _verify_shard(path, shard["sha256"])

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
                        check_finite(t, f"activation shard {path} ({key}, rows {a - s0}..{b - s0 - 1})")
                        parts[key].append(t)
            except StoreError:
                raise
            except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
                raise StoreError(f"cannot read activation shard {path}: {type(err).__name__}: {err}") from err
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}

    def read_rows(self, rows) -> dict[str, torch.Tensor]:
        """Rows at the given sorted global indices (numpy int array), read as contiguous runs, one open per shard."""
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
                            check_finite(t, f"activation shard {path} ({k}, rows {a - s0}..{cut - s0 - 1})")
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
