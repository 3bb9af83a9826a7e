"""One loader for sender and receiver models, offline presets, the offline tokenizer and layer resolution.

A model is named by a Hugging Face id or local folder (loaded with ``from_pretrained`` and an explicit dtype), or
by an offline preset built from a config with seeded random weights (``tiny-neox``, ``pythia-160m-shape``, ...;
``preset:`` may prefix the name). Presets run exactly the same code paths as real models; they exist because no
model hub is reachable on the development, CI and GPU machines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from activation_transfer.errors import UsageError
from activation_transfer.models.hooks import avoid_cudnn_attention
from activation_transfer.models.weights import folder_sha256
from activation_transfer.task.tokenizer import TOKENIZER_VOCAB, offline_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

# Pythia shapes from the models' public configs (shared by both sizes unless overridden).
# Pythia's architecture conventions, shared by the presets and the offline model organisms.
PYTHIA_CONVENTIONS = dict(
    rotary_emb_base=10000,
    use_parallel_residual=True,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    bos_token_id=0,
    eos_token_id=0,
)
_PYTHIA_COMMON = dict(
    PYTHIA_CONVENTIONS,
    vocab_size=50304,
    max_position_embeddings=2048,
    rotary_pct=0.25,
    tie_word_embeddings=False,
)
# Tiny presets: the offline tokenizer has at most TOKENIZER_VOCAB entries, so a 1024-row embedding covers it.
_TINY_COMMON = dict(_PYTHIA_COMMON, vocab_size=TOKENIZER_VOCAB, max_position_embeddings=512)

PRESETS: dict[str, dict] = {
    "tiny-neox": dict(
        family="gpt_neox",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **_TINY_COMMON,
    ),
    "tiny-neox-large": dict(
        family="gpt_neox",
        hidden_size=48,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=96,
        **_TINY_COMMON,
    ),
    "tiny-gpt2": dict(
        family="gpt2",
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=TOKENIZER_VOCAB,
        n_positions=512,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "tiny-llama": dict(
        family="llama",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=TOKENIZER_VOCAB,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "pythia-160m-shape": dict(
        family="gpt_neox",
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        **_PYTHIA_COMMON,
    ),
    "pythia-410m-shape": dict(
        family="gpt_neox",
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        **_PYTHIA_COMMON,
    ),
}

# Where the decoder blocks live, per architecture family (first match wins).
LAYER_CONTAINERS = ("gpt_neox.layers", "transformer.h", "model.layers", "model.decoder.layers")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Name resolvers: ``<prefix>:<rest>`` names that some other layer knows how to turn into a loadable folder. The
# organism layer (``cli.organisms``) registers ``organism:``. Resolving never builds or trains weights.
_RESOLVERS: dict[str, Callable[[str, str | None], str]] = {}


def register_resolver(prefix: str, fn: Callable[[str, str | None], str]) -> None:
    """Let names starting with ``prefix`` (e.g. ``organism:``) resolve through ``fn(rest, cache_dir) -> folder``."""
    _RESOLVERS[prefix] = fn


def resolve_name(name: str, cache_dir: str | None = None) -> str:
    """The loadable name of ``name``: a registered prefix (``organism:<role>``) becomes its local folder; every
    other name is returned unchanged."""
    for prefix, fn in _RESOLVERS.items():
        if name.startswith(prefix):
            return fn(name.removeprefix(prefix), cache_dir)
    if name.startswith("organism:"):
        raise UsageError(
            f"model name {name!r} needs the organism resolver: import cli.organisms first (train.py, "
            "evaluate.py and the demo do)"
        )
    return name


def preset_name(name: str) -> str | None:
    """The preset a model name refers to, or None for a Hub id / local path. Raises on an unknown ``preset:``."""
    bare = name.removeprefix("preset:")
    if bare in PRESETS:
        return bare
    if name.startswith("preset:"):
        raise UsageError(f"unknown model preset {bare!r}; known presets: {', '.join(sorted(PRESETS))}")
    return None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_preset(name: str, seed: int = 0, dtype: str | torch.dtype = "float32") -> nn.Module:
    """Build a preset model with weights drawn from ``seed`` (the global RNG is left untouched)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    spec = dict(PRESETS[name])
    family = spec.pop("family")
    config_cls = {"gpt_neox": GPTNeoXConfig, "gpt2": GPT2Config, "llama": LlamaConfig}[family]
    config = config_cls(**spec)
    # The tokenizer's id 0 is "<|endoftext|>" (bos = eos = pad, as in Pythia).
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    model.config.name_or_path = f"preset:{name}"
    return model


def load_model(
    name: str,
    *,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    preset_seed: int = 0,
) -> nn.Module:
    """Load a frozen causal LM in eval mode.

    Args:
        name: Hugging Face id, local folder, preset name (``tiny-neox``, ``pythia-410m-shape``, ``preset:...``) or
            offline model organism (``organism:sender``, ``organism:receiver``).
        dtype: ``float32``, ``bfloat16`` or ``float16``. Always explicit: transformers 5 would otherwise load the
            checkpoint's own dtype.
        revision: Hub revision (branch, tag or commit) for Hub ids.
        trust_remote_code: Passed to ``from_pretrained``; off unless a config turns it on.
        preset_seed: Seed of a preset's random weights.

    Returns:
        The model, with ``requires_grad`` off for every parameter.
    """
    preset = preset_name(name)
    if preset is not None:
        model = build_preset(preset, seed=preset_seed, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolve_name(name), dtype=resolve_dtype(dtype), revision=revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise UsageError(
                f"cannot load model {name!r}: it is not a preset ({', '.join(sorted(PRESETS))}), not a local model "
                f"folder, and loading it from the Hugging Face Hub failed ({type(err).__name__}: {err})"
            ) from err
        except SafetensorError as err:  # a truncated or damaged weights file: bad input, not a bug
            raise UsageError(
                f"cannot load model {name!r}: a .safetensors file is damaged ({err}); save or download the model again"
            ) from err
    model.eval()
    model.requires_grad_(False)
    avoid_cudnn_attention(model)
    return model


def model_identity(model: nn.Module) -> dict:
    """What a checkpoint or result records about a model: its name, revision, family and sizes."""
    cfg = model.config
    return {
        "name": cfg.name_or_path,
        "revision": getattr(cfg, "_commit_hash", None),
        "model_type": cfg.model_type,
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
    }


# A local model folder must hold one of these for AutoTokenizer to load a real tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(
    name: str, *, revision: str | None = None, cache_dir: str | None = None, trust_remote_code: bool = False
):
    """The tokenizer for a model name: the offline tokenizer for presets, else ``AutoTokenizer``. Pad = EOS."""
    if preset_name(name) is not None:
        tok = offline_tokenizer(cache_dir)
    else:
        from transformers import AutoTokenizer

        resolved = resolve_name(name, cache_dir)
        folder = Path(resolved)
        if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
            # transformers 5 would build an empty 2-token tokenizer from config.json alone and fail much later.
            raise UsageError(
                f"model folder {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save one with "
                f"tokenizer.save_pretrained({str(folder)!r})"
            )
        try:
            tok = AutoTokenizer.from_pretrained(resolved, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the tokenizer of {name!r} ({type(err).__name__}: {err})") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class ResolvedLayer:
    """A decoder block chosen by index or relative depth, with the module path recorded in outputs."""

    index: int
    path: str
    num_layers: int


def layer_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    modules = dict(model.named_modules())
    for path in LAYER_CONTAINERS:
        if isinstance(modules.get(path), nn.ModuleList):
            return path, modules[path]
    raise UsageError(
        f"cannot find the decoder blocks of {type(model).__name__}: none of {', '.join(LAYER_CONTAINERS)} is a "
        "ModuleList"
    )


def resolve_layer(model: nn.Module, layer: int | float) -> ResolvedLayer:
    """Resolve ``layer`` to a block: an int is an index, a float in [0, 1) a relative depth (``int(rel * n)``)."""
    container, blocks = layer_container(model)
    n = len(blocks)
    if isinstance(layer, bool):
        raise UsageError(f"layer must be an int index or a float relative depth, got {layer!r}")
    if isinstance(layer, float):
        if not 0.0 <= layer < 1.0:
            raise UsageError(f"relative layer depth must be in [0, 1), got {layer} (model has {n} blocks)")
        index = int(layer * n)
    else:
        index = int(layer)
    if not 0 <= index < n:
        raise UsageError(f"layer {layer} is out of range: {model.config.name_or_path} has {n} blocks (0..{n - 1})")
    return ResolvedLayer(index=index, path=f"{container}.{index}", num_layers=n)


# --------------------------------------------------------------------------------------------- config-level reference


@dataclass
class ModelRef:
    """How configs name a frozen model and the block whose output is read or written.

    Args:
        name: Hugging Face id, local folder, or preset (``tiny-neox``, ``pythia-160m-shape``).
        layer: Block index (int) or relative depth in [0, 1) resolved as ``int(rel * num_layers)``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        revision: Hub revision for Hub ids.
        trust_remote_code: Allow custom model code from the Hub (off by default, for safety).
        preset_seed: Seed of a preset's random weights.
    """

    name: str
    layer: int | float = 0.67
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    preset_seed: int = 0


@dataclass
class LoadedModel:
    """A loaded frozen model with its tokenizer and resolved block."""

    ref: ModelRef
    model: nn.Module
    tokenizer: object
    layer: ResolvedLayer
    weights_sha256: str | None = None  # content digest of a local folder (Hub: the revision; presets: the seed)

    @cached_property
    def _identity(self) -> dict:
        return {
            **model_identity(self.model),
            "name": self.ref.name,
            "layer": self.layer.path,
            "layer_index": self.layer.index,
            "dtype": self.ref.dtype,
            "preset_seed": self.ref.preset_seed if preset_name(self.ref.name) else None,
            "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer),
            "weights_sha256": self.weights_sha256,
        }

    def identity(self) -> dict:
        """Plain-dict record (safe for ``weights_only`` checkpoints and JSON results), computed once per load."""
        return dict(self._identity)


def as_ref(ref: ModelRef | dict | str) -> ModelRef:
    if isinstance(ref, ModelRef):
        return ref
    if isinstance(ref, str):
        return ModelRef(name=ref)
    return ModelRef(**ref)


def weights_identity(ref: ModelRef | dict | str, cache_dir: str | None = None) -> dict:
    """What identifies the weights behind a name, without loading them: ``{"weights_sha256", "commit"}``.

    A local folder (``organism:`` names resolve to one) gets its content digest, a Hub id the commit its revision
    resolves to (``config._commit_hash``: a branch such as ``main`` moves); a preset neither, since its name and
    ``preset_seed`` already are its identity.
    """
    ref = as_ref(ref)
    if preset_name(ref.name) is not None:
        return {"weights_sha256": None, "commit": None}
    name = resolve_name(ref.name, cache_dir)
    if Path(name).is_dir():
        return {"weights_sha256": folder_sha256(name, cache_dir), "commit": None}
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, revision=ref.revision, trust_remote_code=ref.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"cannot load model {ref.name!r}: it is not a preset ({', '.join(sorted(PRESETS))}), not a "
            f"local model folder, and its Hub config failed to load ({type(err).__name__}: {err})"
        ) from err
    return {"weights_sha256": None, "commit": getattr(config, "_commit_hash", None)}


def load_ref(ref: ModelRef | dict | str, cache_dir: str | None = None) -> LoadedModel:
    """Load the model, tokenizer and block that ``ref`` names."""
    ref = as_ref(ref)
    name = resolve_name(ref.name, cache_dir)  # a registered prefix (organism:) is resolved once, here
    model = load_model(
        name,
        dtype=ref.dtype,
        revision=ref.revision,
        trust_remote_code=ref.trust_remote_code,
        preset_seed=ref.preset_seed,
    )
    tok = load_tokenizer(name, revision=ref.revision, cache_dir=cache_dir, trust_remote_code=ref.trust_remote_code)
    digest = folder_sha256(name, cache_dir) if Path(name).is_dir() else None
    return LoadedModel(
        ref=ref, model=model, tokenizer=tok, layer=resolve_layer(model, ref.layer), weights_sha256=digest
    )
