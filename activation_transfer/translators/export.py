"""Translators as Hugging Face artifacts: a folder (or Hub repo) with ``model.safetensors``, ``config.json`` (sizes,
architecture spec, ``normalize``, sender/receiver identities, training loss, spec and metrics) and a model card,
loadable without Lightning; :class:`PretrainedTranslator` translates exactly as the checkpoint it came from (both call
:func:`apply_translator`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin
from torch import nn

from activation_transfer.errors import MissingInput, UsageError
from activation_transfer.io import atomic_output, atomic_write, fingerprint, sha256_file, write_json
from activation_transfer.translators.architectures import build_translator, current_class_path, translator_spec

EXPORT_FORMAT = "activation-transfer-translator"
EXPORT_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Building a translator imports its class_path: configs from elsewhere (the Hub) may name only the project's own
# architectures unless the caller trusts them.
TRUSTED_CLASS_PREFIX = "activation_transfer.translators.architectures."
TRUSTED_CLASS_PREFIXES = (TRUSTED_CLASS_PREFIX, "activation_transfer.translators.kv_projector.")
# The model card's metadata: the project's license (pyproject.toml), the paper, the Hub's tags.
CARD_LICENSE = "apache-2.0"
PAPER_ID = "2606.03280"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ID}"
CARD_TAGS = ["activation-transfer", "translator", "pytorch_model_hub_mixin", f"arxiv:{PAPER_ID}"]
# A Hub model id (``owner/name``): only those can be a card's ``base_model`` (the Hub refuses other values), so a
# preset (``tiny-neox``), an organism or a local folder is named in the text only.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def apply_translator(translator: nn.Module, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """THE translation of sender vectors ``(..., d_s)``: cast to the translator's dtype, L2-normalize (if on), map.

    The output is not re-normalized (the paper injects the translator's output as it is).
    """
    x = x.to(dtype=next(translator.parameters()).dtype)
    return translator(F.normalize(x, dim=-1) if normalize else x)


def _finite(metrics: Mapping | None) -> dict:
    """Metrics as plain floats; NaN/inf (a diverged run) become None, since JSON has no such numbers."""
    out = {}
    for key, value in (metrics or {}).items():
        v = None if value is None else float(value.item() if hasattr(value, "item") else value)
        out[str(key)] = v if v is not None and math.isfinite(v) else None
    return out


class PretrainedTranslator(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="activation-transfer",
    tags=["activation-transfer", "translator"],
    paper_url=PAPER_URL,
):
    """A trained translator with everything needed to apply it: what ``from_pretrained`` returns.

    Args:
        sender_dim: Sender hidden size.
        receiver_dim: Receiver hidden size.
        translator: The architecture as ``{class_path, init_args}`` (``TranslatorModule.hparams.translator``).
        normalize: L2-normalize inputs before the map (the paper's normalized space).
        sender: Identity of the sender model and layer it was trained on (``LoadedModel.identity()``).
        receiver: Identity of the receiver model and layer.
        loss: Training loss (``cosine`` or ``mse``), for the record.
        metrics: Training metrics (validation values, best score), for the record.
        source: Where it came from (checkpoint file name and SHA-256, W&B run), for the record.
        training: How a functional translator was trained (objective, slot spec, protocol), for the record; absent
            for aligned translators.
        dtype: Dtype of the weights (``float32`` unless trained otherwise).
        export_format: Format tag of ``config.json``.
        export_format_version: Version of that format.
        translator_sha256: The content digest written by ``save_pretrained`` (:meth:`weights_sha256`), checked by
            :func:`from_pretrained`; None for folders exported before it was recorded.
    """

    def __init__(
        self,
        sender_dim: int,
        receiver_dim: int,
        translator: dict,
        normalize: bool = True,
        sender: dict | None = None,
        receiver: dict | None = None,
        loss: str | None = None,
        metrics: dict | None = None,
        source: dict | None = None,
        training: dict | None = None,
        dtype: str = "float32",
        export_format: str = EXPORT_FORMAT,
        export_format_version: int = EXPORT_FORMAT_VERSION,
        translator_sha256: str | None = None,
    ):
        super().__init__()
        if export_format != EXPORT_FORMAT or int(export_format_version) > EXPORT_FORMAT_VERSION:
            raise UsageError(
                f"not an {EXPORT_FORMAT} v<={EXPORT_FORMAT_VERSION} config: {export_format} v{export_format_version}"
            )
        self.config = {
            "sender_dim": int(sender_dim),
            "receiver_dim": int(receiver_dim),
            "translator": translator_spec(translator),
            "normalize": bool(normalize),
            "sender": sender,
            "receiver": receiver,
            "loss": loss,
            "metrics": _finite(metrics),
            "source": dict(source or {}),
            "dtype": dtype,
            "export_format": EXPORT_FORMAT,
            "export_format_version": EXPORT_FORMAT_VERSION,
        }
        if training is not None:  # only functional translators have it: aligned exports stay as they were
            self.config["training"] = dict(training)
        self.translator = build_translator(self.config["translator"], int(sender_dim), int(receiver_dim))
        self.translator.to(getattr(torch, dtype))
        self.requires_grad_(False)
        self.eval()
        self.recorded_sha256 = translator_sha256

        # Where it was loaded from and its content hash (set by ``loading.load_translator``; None when built here).
        self.path: str | None = None
        self.sha256: str | None = None

    @property
    def hparams(self) -> dict:
        """The identities, dimensions and training spec under ``TranslatorModule.hparams``' names."""
        keys = ("sender_dim", "receiver_dim", "translator", "normalize", "sender", "receiver", "loss", "training")
        return {k: self.config[k] for k in keys if k in self.config}

    @property
    def normalize(self) -> bool:
        """Whether inputs are L2-normalized before the map."""
        return self.config["normalize"]

    @property
    def sender(self) -> dict | None:
        """Identity of the sender model and layer it was trained on."""
        return self.config["sender"]

    @property
    def receiver(self) -> dict | None:
        """Identity of the receiver model and layer it was trained for."""
        return self.config["receiver"]

    @property
    def kind(self) -> str:
        """``functional`` (trained through the receiver: its config records ``training``) or ``aligned``."""
        training = self.config.get("training")
        return str(training.get("kind", "functional")) if training else "aligned"

    @property
    def training_spec(self) -> dict:
        """How it was trained: ``kind`` and ``loss``, and a functional translator's objective, slots and protocol."""
        return {"kind": self.kind, "loss": self.config["loss"], **(self.config.get("training") or {})}

    def weights_sha256(self) -> str:
        """The translator's identity: SHA-256 of its architecture, ``normalize`` and every tensor (name, dtype,
        shape, bytes), the same for a checkpoint and its exported folder (the files differ, the translations not)."""
        tensors = {}
        for name, t in sorted(self.translator.state_dict().items()):
            data = t.detach().cpu().contiguous().view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            tensors[name] = [str(t.dtype), list(t.shape), hashlib.sha256(data.numpy().tobytes()).hexdigest()]
        return fingerprint({"translator": self.config["translator"], "normalize": self.normalize, "tensors": tensors})

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        """Map sender vectors ``(..., d_s)`` to ``(..., d_r)``: L2-normalize (if on), then apply the translator."""
        return apply_translator(self.translator, x, self.config["normalize"])

    forward = translate

    # -- the Hub mixin's hooks: every file written atomically, the config and card always the current ones ---------

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        with atomic_output(Path(save_directory) / WEIGHTS_NAME) as tmp:
            save_model(self, str(tmp))
        # The digest lets from_pretrained notice a changed or damaged weights file (safetensors has no checksum).
        write_json(Path(save_directory) / CONFIG_NAME, {**self.config, "translator_sha256": self.weights_sha256()})
        atomic_write(Path(save_directory) / "README.md", str(self.generate_model_card()))

    def card_data(self) -> ModelCardData:
        """The card's YAML metadata: library, license, tags (the paper's ``arxiv:`` id among them) and, as
        ``base_model``, the sender and receiver when they are Hub models."""
        names = [(self.config[role] or {}).get("name") for role in ("sender", "receiver")]
        base = list(dict.fromkeys(n for n in names if isinstance(n, str) and _HUB_ID.match(n) and not Path(n).exists()))
        return ModelCardData(
            library_name="activation-transfer", license=CARD_LICENSE, base_model=base or None, tags=list(CARD_TAGS)
        )

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """A card stating what the translator maps, how it was trained and how to load it (no template engine)."""
        c = self.config
        metrics = "\n".join(f"| {k} | {v if v is None else f'{v:.4f}'} |" for k, v in sorted(c["metrics"].items()))

        def model(role: str) -> str:
            ident = c[role] or {}
            return f"`{ident.get('name', 'unknown')}` layer `{ident.get('layer', '?')}` (d={c[role + '_dim']})"

        text = f"""---
{self.card_data().to_yaml()}
---

# Activation translator

Maps the hidden states of the sender {model("sender")} into the residual stream of the receiver {model("receiver")}
([arXiv {PAPER_ID}]({PAPER_URL})).
Architecture `{c["translator"]["class_path"]}` with `{json.dumps(c["translator"]["init_args"])}`;
inputs are {"L2-normalized per vector" if c["normalize"] else "used raw"}, outputs are not re-normalized. Trained
with the `{c["loss"]}` loss.

| metric | value |
|---|---|
{metrics or "| (none recorded) | |"}

```python
from activation_transfer.translators.export import from_pretrained

translator = from_pretrained("<this folder or Hub id>")
h_receiver = translator.translate(h_sender)  # (..., {c["sender_dim"]}) -> (..., {c["receiver_dim"]})
```

`config.json` records the exact model identities; the project's evaluation refuses the translator for other models.
"""
        return ModelCard(text)


def config_from_hparams(hparams: Mapping, metrics: Mapping | None = None, source: Mapping | None = None) -> dict:
    """The ``PretrainedTranslator`` arguments from a ``TranslatorModule``'s hparams (a checkpoint's or a live one's).

    Args:
        hparams: ``sender_dim``, ``receiver_dim``, ``translator`` and, if present, ``normalize``, ``sender``,
            ``receiver``, ``loss``, ``training``.
        metrics: Training metrics to record.
        source: Provenance to record.
    """
    return {
        "sender_dim": int(hparams["sender_dim"]),
        "receiver_dim": int(hparams["receiver_dim"]),
        "translator": translator_spec(hparams["translator"]),
        "normalize": bool(hparams.get("normalize", True)),
        "sender": hparams.get("sender"),
        "receiver": hparams.get("receiver"),
        "loss": hparams.get("loss"),
        "metrics": dict(metrics or {}),
        "source": dict(source or {}),
        **({"training": dict(hparams["training"])} if hparams.get("training") else {}),
    }


def save_pretrained(folder: str | Path, translator: nn.Module, config: Mapping) -> Path:
    """Write ``translator`` (the bare architecture module) with its ``config`` as a loadable folder.

    Args:
        folder: Output folder (created; its model files are replaced).
        translator: The ``nn.Module`` built from ``config["translator"]`` (``TranslatorModule.translator``).
        config: ``PretrainedTranslator`` arguments, e.g. from :func:`config_from_hparams`.
    """
    dtype = str(next(translator.parameters()).dtype).removeprefix("torch.")
    out = PretrainedTranslator(**{**config, "dtype": dtype})
    out.translator.load_state_dict(translator.state_dict(), strict=True)
    out.save_pretrained(folder)
    return Path(folder)


def checkpoint_translator(ckpt_path: str | Path, metrics: Mapping | None = None) -> PretrainedTranslator:
    """The translator of a ``TranslatorModule`` or ``FunctionalTranslatorModule`` checkpoint, read safely
    (``weights_only=True``) and without Lightning.

    Raises:
        ValueError: An unreadable file, or a checkpoint without a translator's hparams.
    """
    try:
        ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch/zip/pickle raise many types for bad files: report them alike
        # Not torch's message: it advises weights_only=False, i.e. running the file's code.
        raise UsageError(
            f"{ckpt_path} is not a translator checkpoint (torch.load cannot read it safely: {type(err).__name__}); "
            "pass a .ckpt written by train.py or an exported translator folder"
        ) from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "translator" not in hparams or "sender_dim" not in hparams:
        raise UsageError(f"{ckpt_path} is not a translator checkpoint (no translator hparams)")
    state = {k.removeprefix("translator."): v for k, v in ckpt["state_dict"].items() if k.startswith("translator.")}
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    source = {
        "checkpoint": Path(ckpt_path).name,
        "checkpoint_sha256": sha256_file(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }
    out = PretrainedTranslator(**config_from_hparams(hparams, metrics, source), dtype=dtype)
    out.translator.load_state_dict(state, strict=True)
    return out


def export_from_checkpoint(ckpt_path: str | Path, folder: str | Path, metrics: Mapping | None = None) -> Path:
    """Export a ``TranslatorModule`` checkpoint as a ``from_pretrained`` folder; returns the folder."""
    checkpoint_translator(ckpt_path, metrics).save_pretrained(folder)
    return Path(folder)


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_pretrained` (weights and config present)."""
    p = Path(path)
    return p.is_dir() and (p / WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file()


def from_pretrained(
    folder_or_hub_id: str | Path, map_location: str = "cpu", trust_class_path: bool = False, **hub_kwargs
) -> PretrainedTranslator:
    """Load an exported translator from a local folder or a Hugging Face Hub repo, frozen and in eval mode.

    Args:
        folder_or_hub_id: A folder from :func:`save_pretrained`, or ``<user>/<repo>`` on the Hub.
        map_location: Device of the weights (read into the CPU-built module, then moved there with the module).
        trust_class_path: Build a ``class_path`` outside ``activation_transfer.translators.architectures`` (importing
            it runs its module's code).
        hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ... for a Hub id.

    Raises:
        FileNotFoundError: A local path that is not an exported folder.
        ValueError: A config of another format, or an untrusted ``class_path``.
    """
    local = Path(folder_or_hub_id)
    if not local.exists():
        from huggingface_hub import snapshot_download

        patterns = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
        local = Path(snapshot_download(str(folder_or_hub_id), allow_patterns=patterns, **hub_kwargs))
    if not is_pretrained_folder(local):
        raise MissingInput(f"{local} is not an exported translator folder ({WEIGHTS_NAME} + {CONFIG_NAME})")
    config = _read_config(local)
    class_path = str((config.get("translator") or {}).get("class_path", ""))
    # A folder exported before the library moved names the class where it lived then: trusted as where it lives now.
    if not trust_class_path and not current_class_path(class_path).startswith(TRUSTED_CLASS_PREFIXES):
        raise UsageError(
            f"{folder_or_hub_id}: translator class_path {class_path!r} is not one of the project's; "
            "pass trust_class_path=True to import it"
        )
    from safetensors.torch import load_model

    try:
        model = PretrainedTranslator(**config)
        # strict: a missing or extra tensor is an error, never silently random weights (the mixin's loader is lenient).
        load_model(model, str(local / WEIGHTS_NAME), strict=True, device="cpu")
    except UsageError:
        raise
    except Exception as err:  # safetensors/torch raise many types for a damaged file or a config that does not fit
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UsageError(
            f"exported translator {local}: {WEIGHTS_NAME} does not load with its {CONFIG_NAME} "
            f"({type(err).__name__}: {first[:200]}); export it again from its checkpoint"
        ) from err
    if model.recorded_sha256 is not None and model.recorded_sha256 != model.weights_sha256():
        raise UsageError(
            f"exported translator {local}: the weights do not match the digest translator_sha256 in {CONFIG_NAME} "
            "(the folder was changed or damaged); export it again from its checkpoint"
        )
    return model.to(map_location).eval()


def _read_config(folder: Path) -> dict:
    """``config.json`` of an exported folder, with keys this version knows (else one line naming the path)."""
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"exported translator config {path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise UsageError(f"exported translator config {path} must hold a JSON object")
    known = set(inspect.signature(PretrainedTranslator.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UsageError(
            f"exported translator config {path} has unknown key(s) {', '.join(unknown)} (not written by this "
            "project's save_pretrained, or edited); export it again from its checkpoint"
        )
    return config


def translator_sha256(path: str | Path) -> str:
    """A translator's identity (:meth:`PretrainedTranslator.weights_sha256`): the same for a checkpoint and its
    exported folder."""
    p = Path(path)
    return (from_pretrained(p) if is_pretrained_folder(p) else checkpoint_translator(p)).weights_sha256()
