"""Offline model organisms: small GPT-NeoX QA models trained on the built-in generator, cached in HF format.

Nothing on the development, CI or GPU machines can download Pythia, and random-weight presets answer nothing. The
organisms are a sender and a larger receiver (different width and depth, one shared tokenizer) that actually answer
the generated multi-hop questions, so activation transfer can be tested end to end offline. ``organism:<role>`` names
only resolve (:func:`resolve_organism`); :func:`ensure_organisms` is the one step that trains.

Training the recipes takes minutes on a CPU, and other CPUs train other weights, so weights trained once by the
recipes can ship as package data (``cli/organism_weights/``, SHA-256 pinned in its manifest; written by
``python -m cli.organisms ship``): ``ensure_organism`` installs them when the recipe's hash matches, and trains
otherwise or when asked to (``retrain=True``, ``ACTIVATION_TRANSFER_RETRAIN_ORGANISMS=1``, ``python organism.py fit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from activation_transfer.errors import UsageError
from activation_transfer.io import atomic_output, atomic_write, cache_root, sha256_file
from activation_transfer.models.frozen_lm import register_resolver
from activation_transfer.task.tokenizer import offline_tokenizer, tokenizer_fingerprint
from callbacks.progress import progress_callbacks
from cli.organism_cache import MARKER as MARKER  # re-exported: callers read organisms.MARKER
from cli.organism_cache import commit, entry_lock, entry_problem, leftovers, read_marker, staging, why_build
from cli.organism_cli import OrganismCLI, cli_kwargs
from cli.organism_cli import main as organism_main
from cli.parser import hidden_host_argv

log = logging.getLogger(__name__)

# Bump when the training recipe changes in a way the config does not show, so stale cache entries are not reused.
ORGANISM_FORMAT_VERSION = 1
# Keys that do not change what training computes stay out of the cache hash (model.compile: the same math, fused).
_UNHASHED = ("config", "export_dir", "ckpt_path")
_UNHASHED_IN = {
    "trainer": ("logger", "default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps"),
    "data": ("num_workers", "cache_dir"),
    "model": ("compile",),
}
# Weights trained once from the recipes, shipped as package data; the manifest pins each file's SHA-256 and the
# config hash of the recipe that trained it.
SHIPPED_DIR = Path(__file__).resolve().parent / "organism_weights"
SHIPPED_MANIFEST = "manifest.json"
RETRAIN_ENV = "ACTIVATION_TRANSFER_RETRAIN_ORGANISMS"
_PARSED: dict[tuple, str] = {}  # resolved_config's parses


@contextlib.contextmanager
def _isolated_cli() -> Iterator[None]:
    """Run a LightningCLI inside another program without side effects on it.

    Training calls ``seed_everything``: the caller's random, numpy and torch streams are restored afterwards. The
    CLI gets its arguments through ``args=``, the host's ``sys.argv`` hidden meanwhile (:func:`hidden_host_argv`).
    """
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    env = os.environ.get("PL_GLOBAL_SEED")
    with torch.random.fork_rng(devices=[]), hidden_host_argv():
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            if env is None:
                os.environ.pop("PL_GLOBAL_SEED", None)
            else:
                os.environ["PL_GLOBAL_SEED"] = env


def resolved_config(config_path: str, overrides: list[str] | None = None) -> dict:
    """The fully parsed organism config (defaults filled in, overrides applied), without building anything.

    A command asks for each organism's twice (train if missing, resolve its name): parses are remembered per file
    (path and content) and overrides, as JSON text, so each caller gets its own copy.

    Args:
        config_path: An organism YAML (``configs/organisms/*.yaml``).
        overrides: Extra CLI arguments, e.g. ``["--trainer.max_steps", "40"]``.

    Returns:
        The config as plain JSON types (``model``, ``data``, ``trainer``, ``seed_everything``, ...).
    """
    path = Path(config_path)  # a missing file: the parser says what is wrong
    content = hashlib.sha256(path.read_bytes() if path.is_file() else b"").hexdigest()
    key = (str(path.resolve()), content, tuple(overrides or ()))
    if key not in _PARSED:
        _PARSED[key] = json.dumps(_parse(config_path, overrides))
    return json.loads(_PARSED[key])


def _parse(config_path: str, overrides: list[str] | None) -> dict:
    """One parse of an organism config by the organism CLI's own parser (nothing instantiated)."""

    class _ParseOnly(OrganismCLI):
        def instantiate_classes(self) -> None:  # parsing is all the cache key needs
            pass

        def after_instantiate_classes(self) -> None:
            pass

    # Parsing seeds the RNGs (restored by _isolated_cli); its "Seed set to" line is noise for a cache look-up.
    seed_log = logging.getLogger("lightning_fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        with _isolated_cli():
            cli = _ParseOnly(**cli_kwargs(), args=["-c", str(config_path), *(overrides or [])], run=False)
    finally:
        seed_log.setLevel(level)
    return json.loads(cli.parser.dump(cli.config, format="json", skip_none=False, skip_validation=True))


def config_hash(config: dict, tokenizer_sha256: str = "") -> str:
    """Short SHA-256 of the parts of a resolved config that decide the trained weights."""
    cfg = {k: v for k, v in config.items() if k not in _UNHASHED}
    for section, unhashed in _UNHASHED_IN.items():
        cfg[section] = {k: v for k, v in (cfg.get(section) or {}).items() if k not in unhashed}
    blob = json.dumps(
        {"config": cfg, "version": ORGANISM_FORMAT_VERSION, "tokenizer": tokenizer_sha256}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def organism_dir(config_path: str, cache_dir: str | None = None, overrides: list[str] | None = None) -> Path:
    """Where :func:`ensure_organism` keeps the organism a config describes (the folder may not exist yet)."""
    config = resolved_config(config_path, overrides)
    tok_sha = tokenizer_fingerprint(offline_tokenizer((config.get("data") or {}).get("cache_dir") or cache_dir))
    return cache_root(cache_dir) / "organisms" / f"{Path(config_path).stem}-{config_hash(config, tok_sha)}"


def shipped_entry(name: str, shipped_dir: Path | None = None) -> dict | None:
    """The manifest entry of the shipped weights for the organism folder name ``<role>-<hash>``, if any.

    An entry only matches the exact recipe hash that trained it: any change of the recipe, the tokenizer or
    ``ORGANISM_FORMAT_VERSION`` makes the shipped weights unused (and the organism is trained instead).
    """
    manifest = (shipped_dir or SHIPPED_DIR) / SHIPPED_MANIFEST
    if not manifest.exists():
        return None
    role, _, digest = name.rpartition("-")
    entry = json.loads(manifest.read_text()).get(role)
    return entry if entry and entry.get("config_hash") == digest else None


def _install_shipped(
    entry: dict, name: str, config: dict, out: Path, cache_dir: str | None, shipped_dir: Path | None
) -> dict:
    """Write the shipped weights of ``entry`` as an organism folder in ``out`` after checking their SHA-256."""
    from safetensors.torch import load_file

    from lightning_modules.causal_lm import build_neox, export_model

    path = (shipped_dir or SHIPPED_DIR) / entry["file"]
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise UsageError(
            f"{path}: SHA-256 {digest} differs from {entry['sha256']} pinned in {path.parent / SHIPPED_MANIFEST}; "
            f"reinstall the package, or set {RETRAIN_ENV}=1 to train the organism from its recipe instead"
        )
    m = config["model"]
    tokenizer = offline_tokenizer((config.get("data") or {}).get("cache_dir") or cache_dir)
    keys = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings", "rotary_pct")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; the caller's RNG stays untouched
        model = build_neox(
            vocab_size=len(tokenizer), tie_word_embeddings=m["tie_word_embeddings"], **{k: m[k] for k in keys}
        )
    model.load_state_dict(load_file(str(path)), strict=True)
    export_model(model, tokenizer, out)
    info = {"name": name, "config": config, "format_version": ORGANISM_FORMAT_VERSION}
    return (
        info | {k: v for k, v in entry.items() if k not in ("file", "sha256")} | {"source": f"package:{entry['file']}"}
    )


def ensure_organism(
    config_path: str,
    cache_dir: str | None = None,
    overrides: list[str] | None = None,
    retrain: bool | None = None,
    shipped_dir: Path | None = None,
) -> Path:
    """Return the Hugging Face folder of the organism ``config_path`` describes, training it only if not cached.

    The cache entry is ``cache_root(cache_dir)/organisms/<role>-<hash>/`` where ``role`` is the config's file stem and
    ``hash`` covers the resolved config (overrides included), the tokenizer and the recipe version. It is built in a
    temporary sibling folder under the entry's lock and renamed into place once complete, replacing an existing entry
    whole (:mod:`cli.organism_cache`), so an interrupted or concurrent run never leaves a half-written organism behind,
    and a killed replacement leaves the old one. The folder holds ``save_pretrained`` output of the model and tokenizer
    (load it with ``load_model(str(path))`` / ``load_tokenizer(str(path))``), ``organism.json`` (config, hash, training
    time, final validation metrics) and the training logs under ``training/``. When the package ships weights trained by
    this very recipe (same hash), they are installed instead of training.

    Args:
        config_path: Organism YAML, e.g. ``configs/organisms/receiver.yaml``.
        cache_dir: Project cache folder (default: ``cache_root()``).
        overrides: Extra CLI arguments applied after the config, e.g. ``["--trainer.max_steps", "40"]``.
        retrain: Train from the recipe even when shipped weights match (a cached entry installed from the package is
            replaced). Default: the environment variable ``ACTIVATION_TRANSFER_RETRAIN_ORGANISMS`` (``1`` = yes).
        shipped_dir: Folder of the shipped weights and their manifest (default: ``cli/organism_weights``).

    Returns:
        The organism's folder.
    """
    overrides = list(overrides or [])
    if retrain is None:
        retrain = os.environ.get(RETRAIN_ENV, "") not in ("", "0")
    folder = organism_dir(config_path, cache_dir, overrides)
    # Checked without the lock first, so a read-only cache serves its organisms; leftovers of a killed build are
    # removed under the lock (entry_lock), where no live build's are among them.
    if why_build(folder, retrain) is None and not leftovers(folder):
        log.info("reusing the cached organism %s", folder)
        return folder
    with entry_lock(folder), staging(folder) as tmp:
        why = why_build(folder, retrain)
        if why is None:  # built by the process that held the lock, restored, or there all along beside leftovers
            log.info("reusing the cached organism %s", folder)
            return folder
        log.info("building the organism %s: %s", folder, why)
        train_overrides = list(overrides)
        if cache_dir and not (resolved_config(config_path, overrides).get("data") or {}).get("cache_dir"):
            # Train with the tokenizer the cache key was computed from (data.cache_dir is not part of the key).
            train_overrides += ["--data.cache_dir", str(cache_dir)]
        entry = None if retrain else shipped_entry(folder.name, shipped_dir)
        if entry:
            log.info("installing the shipped weights of %s (trained by this recipe)", folder.name)
            config = resolved_config(config_path, overrides)
            info = _install_shipped(entry, folder.name, config, tmp, cache_dir, shipped_dir)
        else:
            log.info("training the organism %s (minutes on a CPU; cached afterwards)", folder.name)
            info = _train(config_path, train_overrides, tmp, folder.name)
        commit(tmp, folder, info)
    return folder


def _train(config_path: str, overrides: list[str], out: Path, name: str) -> dict:
    run_dir = out / "training"
    logger = {
        "class_path": "pytorch_lightning.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
    }
    # A bar on a terminal, plain lines in a log (the recipe's own setting would leave a log silent for minutes).
    bar, extra = progress_callbacks(None)
    progress = [f"--trainer.enable_progress_bar={str(bar).lower()}"] + [
        "--trainer.callbacks+=callbacks.progress.PlainProgress" for _ in extra
    ]
    args = [
        "fit",
        "-c",
        str(config_path),
        *overrides,
        *progress,
        "--trainer.default_root_dir",
        str(run_dir),
        f"--trainer.logger={json.dumps(logger)}",
        "--export_dir",
        str(out),
    ]
    start = time.perf_counter()
    with _isolated_cli():
        cli = organism_main(args)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    import transformers

    return {
        "name": name,
        "config_path": str(config_path),
        "overrides": overrides,
        "config": resolved_config(config_path, overrides),
        "format_version": ORGANISM_FORMAT_VERSION,
        "train_seconds": round(seconds, 1),
        "global_step": int(cli.trainer.global_step),
        "final_metrics": metrics,
        "torch_num_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def ship_organism(
    config_path: str, cache_dir: str | None = None, overrides: list[str] | None = None, shipped_dir: Path | None = None
) -> dict:
    """Train the organism of ``config_path`` from its recipe and write its weights into the package data.

    The weights (the model's ``state_dict``, float32 safetensors) go to ``<shipped_dir>/<role>.safetensors`` and
    the manifest records their SHA-256, the recipe's hash and the training record (time, threads, versions), so
    :func:`ensure_organism` installs them wherever the same recipe is asked for. Run by
    ``python -m cli.organisms ship``.

    Returns:
        The manifest entry.
    """
    from safetensors.torch import save_file

    from activation_transfer.models.frozen_lm import load_model

    shipped_dir = Path(shipped_dir or SHIPPED_DIR)
    folder = ensure_organism(config_path, cache_dir, overrides, retrain=True)
    info = read_marker(folder)
    role, _, digest = folder.name.rpartition("-")
    shipped_dir.mkdir(parents=True, exist_ok=True)
    path = shipped_dir / f"{role}.safetensors"
    state = {k: v.detach().contiguous() for k, v in load_model(str(folder), dtype="float32").state_dict().items()}
    with atomic_output(path) as tmp:  # a killed ship leaves the old weights, which the manifest still pins
        save_file(state, str(tmp), metadata={"format": "pt"})
    keep = ("train_seconds", "global_step", "final_metrics", "torch_num_threads", "versions", "config_path")
    entry = {"file": path.name, "sha256": sha256_file(path), "config_hash": digest} | {k: info.get(k) for k in keep}
    record_shipped(shipped_dir, role, entry)
    return entry


def record_shipped(shipped_dir: Path, role: str, entry: dict) -> None:
    """Write ``entry`` as ``role``'s line of the manifest in ``shipped_dir`` (the other roles' lines are kept)."""
    manifest_path = Path(shipped_dir) / SHIPPED_MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[role] = entry
    atomic_write(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- names

# ``organism:<role>`` names the built-in organism whose recipe is ``configs/organisms/<role>.yaml`` (package data,
# so a non-editable install finds it too).
ORGANISM_PREFIX = "organism:"
ORGANISM_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "organisms"


def organism_config(role: str) -> Path:
    """The recipe of ``organism:<role>``; raises naming the known roles."""
    config = ORGANISM_CONFIG_DIR / f"{role}.yaml"
    if not config.exists():
        known = sorted(p.stem for p in ORGANISM_CONFIG_DIR.glob("*.yaml"))
        raise UsageError(f"unknown organism {role!r} in model name 'organism:{role}'; known: {', '.join(known)}")
    return config


def resolve_organism(role: str, cache_dir: str | None = None) -> str:
    """The cached folder of ``organism:<role>``. Never trains: a missing organism is an error naming the fix."""
    folder = organism_dir(str(organism_config(role)), cache_dir)
    problem = entry_problem(folder)
    if problem:  # an incomplete entry is named here: loading it would fail on some missing file with a traceback
        state = "not trained yet" if not folder.exists() else f"incomplete ({problem})"
        raise UsageError(
            f"organism:{role} is {state}: {folder}; train.py, evaluate.py and `make demo` (re)build it, "
            f"or call cli.organisms.ensure_organisms(['organism:{role}'])"
        )
    return str(folder)


def organism_names(obj) -> list[str]:
    """Every ``organism:<role>`` string inside a (nested) config, in order of first appearance."""
    found: list[str] = []
    if isinstance(obj, str):
        found = [obj] if obj.startswith(ORGANISM_PREFIX) else []
    elif isinstance(obj, dict | list | tuple):
        found = [n for v in (obj.values() if isinstance(obj, dict) else obj) for n in organism_names(v)]
    return list(dict.fromkeys(found))


def ensure_organisms(names, cache_dir: str | None = None) -> dict[str, Path]:
    """Train (or reuse) the organisms that ``names`` mention; the explicit step before any ``organism:`` is loaded."""
    out = {}
    for name in organism_names(list(names)):
        role = name.removeprefix(ORGANISM_PREFIX)
        log.info("organism %s: checking the cache (training takes minutes on a CPU when it is missing)", name)
        out[name] = ensure_organism(str(organism_config(role)), cache_dir=cache_dir)
    return out


register_resolver(ORGANISM_PREFIX, resolve_organism)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train the organisms from their recipes and ship their weights.")
    parser.add_argument("command", choices=["ship"])
    parser.add_argument("roles", nargs="*", default=["sender", "receiver"])
    parser.add_argument("--cache-dir", default=None, help="Project cache folder (default: cache_root()).")
    ns = parser.parse_args()
    for r in ns.roles:
        print(r, json.dumps(ship_organism(str(organism_config(r)), ns.cache_dir)))
