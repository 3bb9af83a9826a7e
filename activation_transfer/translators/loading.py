"""THE translator loader: a ``.ckpt`` (aligned or functional), an exported folder or a ``wandb:`` artifact reference
becomes one :class:`PretrainedTranslator` (weights, identities, kind, training spec, sha256), read without Lightning
(``weights_only=True``); and the check that a translator fits the models, slots and role it is used with.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from activation_transfer.errors import MissingInput, UsageError
from activation_transfer.resume_checks import ResumeChecks, check_resume_with_max_steps
from activation_transfer.translators.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedTranslator,
    checkpoint_translator,
    from_pretrained,
    is_pretrained_folder,
)

log = logging.getLogger(__name__)

WANDB_PREFIX = "wandb:"
KINDS = ("aligned", "functional", "kv")
# The evaluation's option for each kind (InjectionEvalModule): named in the refusal of a translator of the other kind.
KIND_OPTIONS = {
    "aligned": "--model.translator_ckpt",
    "functional": "--model.functional_translator_ckpt",
    "kv": "--model.functional_translator_ckpt with --model.protocol kv",  # a KV projector (translators/kv_projector.py)
}
# Identity fields that must agree between the models a translator was trained on and the models it is used with.
MATCH_KEYS = (
    "name",
    "model_type",
    "hidden_size",
    "num_layers",
    "layer",
    "layer_index",
    "preset_seed",
    "revision",
    "weights_sha256",
)
# Recorded only for some models (Hub commits, local folders' digests): compared when both sides have a value.
OPTIONAL_KEYS = ("revision", "weights_sha256")


# ------------------------------------------------------------------------------------------ wandb: references


def is_wandb_ref(ref) -> bool:
    return isinstance(ref, str) and ref.startswith(WANDB_PREFIX)


def is_online(run) -> bool:
    """Whether ``run`` is a live W&B run that can reach the server (not offline, not disabled, not None)."""
    if run is None or getattr(run, "disabled", False):
        return False
    offline = getattr(run, "offline", None)
    if offline is None:
        settings = getattr(run, "settings", None)
        offline = getattr(settings, "_offline", True) if settings is not None else True
    return not offline


def resolve_translator_ref(ref: str | Path, run, root: str | Path) -> str:
    """A local translator path for ``ref``: a ``wandb:`` reference is used (lineage) and downloaded, anything else
    is returned as is.

    Args:
        ref: A local ``.ckpt``/exported folder path, or ``wandb:<entity>/<project>/<name>:<alias>`` (``<name>:<alias>``
            resolves in the run's own project).
        run: The W&B run that uses the artifact (``wandb.init()``, ``WandbLogger.experiment``); must be online for a
            ``wandb:`` reference.
        root: Folder under which the artifact is downloaded (``<root>/artifacts/<name>-<alias>``).

    Returns:
        The ``.ckpt`` inside the artifact, or its exported translator folder when it holds no checkpoint.

    Raises:
        ValueError: A ``wandb:`` reference without an online run, or an artifact with no or several checkpoints.
    """
    if not is_wandb_ref(ref):
        return str(ref)
    name = ref[len(WANDB_PREFIX) :]
    if not is_online(run):
        disabled = run is not None and getattr(run, "disabled", False)
        mode = "no W&B run" if run is None else ("a disabled W&B run" if disabled else "an offline W&B run")
        raise UsageError(
            f"translator {ref!r} is a W&B artifact, which only an online W&B run can download, but this evaluation "
            f"has {mode}. Either run with WANDB_MODE=online (and a WandbLogger), or download it first "
            f"(`wandb artifact get {name} --root <folder>`) and pass the local .ckpt path or exported folder instead"
        )
    art = run.use_artifact(name)  # recorded as an input of this run: the lineage from training to evaluation
    folder = Path(art.download(root=str(Path(root) / "artifacts" / re.sub(r"[^A-Za-z0-9_.-]", "-", name))))
    ckpts = sorted(folder.rglob("*.ckpt"))
    if len(ckpts) == 1:
        return str(ckpts[0])
    exported = sorted(p.parent for p in folder.rglob("config.json") if is_pretrained_folder(p.parent))
    if not ckpts and len(exported) == 1:
        return str(exported[0])
    found = [str(p.relative_to(folder)) for p in ckpts] or "none"
    raise UsageError(f"W&B artifact {name!r} must hold exactly one translator checkpoint (.ckpt); found {found}")


# ------------------------------------------------------------------------------------------ loading


def load_translator(
    ref: str | Path, map_location: str | torch.device = "cpu", run=None, root: str | Path = "."
) -> PretrainedTranslator:
    """Load a translator, frozen and in eval mode, with its ``path`` and ``sha256`` set.

    Args:
        ref: A ``TranslatorModule`` or ``FunctionalTranslatorModule`` checkpoint, a folder from ``save_pretrained``,
            or a ``wandb:`` artifact reference (see :func:`resolve_translator_ref`).
        map_location: Device of the weights.
        run: The online W&B run that downloads a ``wandb:`` reference.
        root: Folder under which a ``wandb:`` artifact is downloaded.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Not a readable translator checkpoint, a folder that is not an exported translator, or
            NaN/infinite weights.
    """
    path = Path(resolve_translator_ref(ref, run, root))
    if is_pretrained_folder(path):  # save_pretrained output (safetensors + config.json): the same translations
        translator = from_pretrained(path, map_location=str(map_location))
    elif path.is_dir():
        # "does not exist" would be wrong here: the folder is there, it just misses the files of an export.
        missing = " and ".join(name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file())
        raise UsageError(
            f"translator checkpoint {path} is a folder but not an exported translator: it lacks {missing} "
            f"(an exported translator holds {CONFIG_NAME} and {WEIGHTS_NAME}, as written by export_from_checkpoint / "
            "save_pretrained or the TranslatorArtifactCallback); pass such a folder or a translator .ckpt file"
        )
    elif not path.is_file():
        raise MissingInput(f"translator checkpoint {path} does not exist")
    else:
        translator = checkpoint_translator(path).to(map_location)
    # A diverged training run saves NaN weights; they would turn every answer into "" and score as accuracy 0.
    state = translator.state_dict().items()
    bad = [k for k, t in state if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UsageError(
            f"translator checkpoint {path} holds NaN or infinite weights ({', '.join(bad[:5])}); "
            "retrain it or pick an earlier checkpoint"
        )
    translator.path, translator.sha256 = str(path), translator.weights_sha256()  # the weights, not the file
    return translator.requires_grad_(False).eval()


def check_translator_matches(translator, sender_identity: dict, receiver_identity: dict, slots: dict | None = None):
    """Raise ``ValueError`` listing every difference between the translator's recorded models and the given ones.

    ``translator`` is a :class:`PretrainedTranslator` or a module whose ``hparams`` hold the same fields (a
    ``TranslatorModule``). A ``revision`` or ``weights_sha256`` recorded as None on either side is not compared (a
    local folder has no revision, a Hub model or preset no folder digest, and checkpoints from before the digest have
    none). ``slots`` (the evaluation's slot spec) is compared with the slots a functional translator was trained
    with, if any: it learnt what K slots at those positions mean.
    """
    h = translator.hparams
    problems = []
    trained = (h.get("training") or {}).get("slots")
    if slots is not None and trained is not None and dict(trained) != dict(slots):
        trained = {**{k: trained.get(k) for k in slots}, **trained}  # in the evaluation's key order (JSON sorts them)
        problems.append(f"slots: trained with {trained}, evaluated with {dict(slots)}")
    for role, recorded, given, dim in (
        ("sender", h.get("sender"), sender_identity, h.get("sender_dim")),
        ("receiver", h.get("receiver"), receiver_identity, h.get("receiver_dim")),
    ):
        if given.get("hidden_size") is not None and dim is not None and int(given["hidden_size"]) != int(dim):
            problems.append(f"{role} hidden size: translator {dim}, model {given['hidden_size']}")
        if recorded is None:
            problems.append(f"{role}: the translator checkpoint records no model identity")
            continue
        for key in MATCH_KEYS:
            a, b = recorded.get(key), given.get(key)
            if key in OPTIONAL_KEYS and (a is None or b is None):
                continue
            if key in recorded and key in given and a != b:
                problems.append(f"{role} {key}: translator {a!r}, model {b!r}")
    if problems:
        raise UsageError("translator does not match the models it is used with: " + "; ".join(problems))


def load_translator_for(
    ref: str | Path,
    sender_identity: dict,
    receiver_identity: dict,
    allow_mismatch: bool = False,
    slots: dict | None = None,
    kind: str | None = None,
    run=None,
    root: str | Path = ".",
) -> PretrainedTranslator:
    """Load a frozen translator for the given models: names, layers and slots must match, hidden sizes and kind
    always.

    Args:
        ref: As :func:`load_translator`'s.
        sender_identity: ``LoadedModel.identity()`` of the sender it will read.
        receiver_identity: ``LoadedModel.identity()`` of the receiver it will write into.
        allow_mismatch: Log a warning instead of raising when names, layers or slots differ.
        slots: The evaluation's slot spec (split protocol), checked against a functional translator's training slots.
        kind: The kind the caller needs (``aligned`` or ``functional``); None accepts both.
        run: As :func:`load_translator`'s.
        root: As :func:`load_translator`'s.
    """
    if kind is not None and kind not in KINDS:
        raise UsageError(f"translator kind must be one of {', '.join(KINDS)}, got {kind!r}")
    translator = load_translator(ref, map_location="cpu", run=run, root=root)
    path = translator.path
    if kind is not None and translator.kind != kind:
        raise UsageError(
            f"translator {path} was trained as {translator.kind}, but {KIND_OPTIONS[kind]} takes {kind} translators; "
            f"pass it as {KIND_OPTIONS[translator.kind]}"
        )
    try:
        check_translator_matches(translator, sender_identity, receiver_identity, slots)
    except ValueError as err:
        if not allow_mismatch:
            raise UsageError(
                f"{err} (translator checkpoint {path}; set --model.allow_mismatch true to evaluate it anyway)"
            ) from err
        log.warning("translator %s does not match the models (allowed by allow_mismatch): %s", path, err)
    # Whatever the names say, the translator must map sender-sized vectors to receiver-sized ones.
    d_s, d_r = sender_identity["hidden_size"], receiver_identity["hidden_size"]
    dims = (translator.hparams.get("sender_dim"), translator.hparams.get("receiver_dim"))
    if dims != (d_s, d_r):
        raise UsageError(
            f"translator checkpoint {path} maps {dims[0]} -> {dims[1]} dims, but the sender has {d_s} and the "
            f"receiver {d_r} (allow_mismatch cannot bridge different hidden sizes)"
        )
    return translator


# ------------------------------------------------------------------------------------------ resuming training


class ResumableTraining(ResumeChecks):
    """What the translator LightningModules share about their training state (a mixin: the library has no Lightning).

    A subclass names in ``RESUME_KEYS`` the hyperparameters that decide the weights (:class:`ResumeChecks`: a resumed
    fit whose config, or its data module's, differs in one of them is refused, while ``load_from_checkpoint`` may
    override them). The optimizer and schedule come from ``self.optimizer_args`` over ``self.translator``'s
    parameters.
    """

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.resuming_fit():
            ckpt = str(self._trainer.ckpt_path or "the checkpoint")
            check_resume_with_max_steps(checkpoint, int(self._trainer.max_steps), ckpt)

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return self.optimizer_args.configure(self.translator.parameters(), total)
