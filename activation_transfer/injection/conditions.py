"""The paper's injection conditions (arXiv 2606.03280, section 4.2) as pure data and pure tensor functions.

Condition specs and the paper's table, the injection modes (applied at real, mask 1, positions only), the shuffled
control's donor map and the seeded random draws. Nothing here touches a model, a file or global RNG state, so each
piece is tested alone; docs/conditions.md defines every condition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from activation_transfer.errors import UsageError

# Sources of the vectors a condition writes.
SOURCE_NONE = "none"  # no injection (no_inject)
SOURCE_RELAY = "relay"  # no injection, different prompts (nl_relay)
SOURCE_TRANSLATED = "translated"  # the sample's own translated sender states
SOURCE_RECEIVER = "receiver"  # the receiver's own states at the block, captured in a separate pass
SOURCE_RANDOM = "random"  # Gaussian vectors seeded by the run seed (see RANDOM_DRAWS)
SOURCE_SHUFFLED = "shuffled"  # another sample's translated states (same prompt length)
SOURCE_ZEROS = "zeros"

MODES = ("none", "additive", "replace", "rescaled")
# How same_norm_random draws its vectors: the paper's one generator run through the dataset in order, or one
# generator per sample (seeded by run seed and sample id; independent of the dataset's other samples).
RANDOM_DRAWS = ("sequential", "per_sample")
# What meta.json says about the draw (L_i: the prompt length, or the slot count in the split protocol).
RANDOM_DRAW_NOTES = {
    "sequential": "one CPU torch.Generator seeded by the run seed, randn((1, L_i, H)) per sample in order",
    "per_sample": "per-sample CPU torch.Generator seeded by sha256(f'{seed}:{sample_id}')[:16]",
}


@dataclass(frozen=True)
class ConditionSpec:
    """One evaluation condition.

    Args:
        name: Condition name written into every record (``additive``, ``replace``, ...).
        mode: ``none``, ``additive``, ``replace`` or ``rescaled`` (see :func:`apply_injection`).
        source: Where the injected vectors come from (``SOURCE_*``).
        alpha: Blend weight of the rescaled vector in ``rescaled`` mode (1 = full replacement).
        scale: Multiplier of the injected vector in ``additive`` mode.
        strict: Shuffled only: drop samples whose length bucket has a single member instead of self-matching.
        translator: Which translator the condition reads: ``aligned`` (``translator_ckpt``) or ``functional``
            (``functional_translator_ckpt``); None: the aligned one when the source needs a translator. Set for the
            ``*_functional`` variants and for random vectors rescaled to translated norms (split protocol).
    """

    name: str
    mode: str
    source: str
    alpha: float = 1.0
    scale: float = 1.0
    strict: bool = False
    translator: str | None = None

    @property
    def uses_translator(self) -> bool:
        return self.translator is not None or self.source in (SOURCE_TRANSLATED, SOURCE_SHUFFLED)

    @property
    def translator_kind(self) -> str | None:
        """``aligned`` or ``functional`` for a condition that reads a translator, else None."""
        return (self.translator or "aligned") if self.uses_translator else None

    @property
    def seeded(self) -> bool:
        """Whether the run seed changes the result with a fixed translator (random vectors, shuffling)."""
        return self.source in (SOURCE_RANDOM, SOURCE_SHUFFLED)

    @property
    def deterministic(self) -> bool:
        """Run once with ``seed=None``: neither the translator nor a seed is involved."""
        return not (self.uses_translator or self.seeded)

    @property
    def needs_same_tokens(self) -> bool:
        """Position-by-position use of sender states is only meaningful when both models read the same ids."""
        return self.uses_translator and self.mode != "additive"


CONDITION_NAMES: tuple[str, ...] = (
    "no_inject",
    "nl_relay",
    "additive",
    "replace",
    "scale_corrected",
    "best_alpha",
    "b_to_b_self_inject",
    "same_norm_random",
    "shuffled_translation",
    "shuffled_translation_strict_matched",
    "zero_replacement",
)
# The paper's translator conditions with the functional translator (trained through the receiver) instead.
FUNCTIONAL_VARIANTS: tuple[str, ...] = ("replace_functional", "scale_corrected_functional")


def paper_conditions(scale: float = 0.01, alpha: float = 0.3) -> dict[str, ConditionSpec]:
    """The paper's eleven conditions and their functional variants, by name.

    Args:
        scale: ``additive``'s injection scale (paper: 0.01).
        alpha: ``best_alpha``'s blend weight (paper: 0.3). ``scale_corrected`` always uses 1.
    """
    table = {
        "no_inject": ConditionSpec("no_inject", "none", SOURCE_NONE),
        "nl_relay": ConditionSpec("nl_relay", "none", SOURCE_RELAY),
        "additive": ConditionSpec("additive", "additive", SOURCE_TRANSLATED, scale=scale),
        "replace": ConditionSpec("replace", "replace", SOURCE_TRANSLATED),
        "scale_corrected": ConditionSpec("scale_corrected", "rescaled", SOURCE_TRANSLATED, alpha=1.0),
        "best_alpha": ConditionSpec("best_alpha", "rescaled", SOURCE_TRANSLATED, alpha=alpha),
        "b_to_b_self_inject": ConditionSpec("b_to_b_self_inject", "replace", SOURCE_RECEIVER),
        "same_norm_random": ConditionSpec("same_norm_random", "rescaled", SOURCE_RANDOM, alpha=1.0),
        "shuffled_translation": ConditionSpec("shuffled_translation", "rescaled", SOURCE_SHUFFLED, alpha=1.0),
        "shuffled_translation_strict_matched": ConditionSpec(
            "shuffled_translation_strict_matched", "rescaled", SOURCE_SHUFFLED, alpha=1.0, strict=True
        ),
        "zero_replacement": ConditionSpec("zero_replacement", "replace", SOURCE_ZEROS),
    }
    assert tuple(table) == CONDITION_NAMES
    for base in ("replace", "scale_corrected"):
        name = f"{base}_functional"
        table[name] = dataclasses.replace(table[base], name=name, translator="functional")
    assert tuple(table)[len(CONDITION_NAMES) :] == FUNCTIONAL_VARIANTS
    return table


def select_conditions(
    table: Mapping[str, ConditionSpec], names: Sequence[str], protocol: str = "paper"
) -> list[ConditionSpec]:
    """The specs of the named conditions of a protocol's ``table``, in the given order.

    Raises:
        ValueError: No name, or an unknown or repeated one, naming the known ones.
    """
    if not names:
        raise UsageError("model.conditions is empty; choose from: " + ", ".join(table))
    seen: set[str] = set()
    out = []
    for name in names:
        if name not in table:
            raise UsageError(
                f"unknown condition {name!r} in model.conditions of the {protocol} protocol; known: {', '.join(table)}"
            )
        if name in seen:
            raise UsageError(f"condition {name!r} is listed twice in model.conditions")
        seen.add(name)
        out.append(table[name])
    return out


def build_conditions(names: Sequence[str], scale: float = 0.01, alpha: float = 0.3) -> list[ConditionSpec]:
    """The specs of the named paper conditions (:func:`paper_conditions`), in the given order."""
    return select_conditions(paper_conditions(scale, alpha), names)


# --------------------------------------------------------------------------------------------- tensor math


def _check_mask(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if h.dim() != 3 or mask.shape != h.shape[:2]:
        raise ValueError(f"hidden states {tuple(h.shape)} and attention mask {tuple(mask.shape)} do not line up")
    return mask.to(device=h.device, dtype=torch.bool)


def masked_norm_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm (last dim, fp32) over each row's real positions: (B, T, H) -> (B,)."""
    m = mask.to(device=x.device, dtype=torch.float32)
    norms = x.float().norm(dim=-1)
    return (norms * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def rescale_to(source: torch.Tensor, h: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``normalize(source) * ||h||`` per position, in fp32 (a zero source stays zero)."""
    return F.normalize(source.float(), dim=-1, eps=eps) * h.float().norm(dim=-1, keepdim=True)


def apply_injection(
    mode: str,
    h: torch.Tensor,
    mask: torch.Tensor,
    source: torch.Tensor | None = None,
    alpha: float = 1.0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewrite the block output ``h`` at real positions only; pad positions are returned bit-identical.

    Args:
        mode: ``none`` (unchanged), ``additive`` (h + scale * source, ``source`` (B, H) broadcast to every real
            position), ``replace`` (h <- source, (B, T, H)) or ``rescaled`` (c = normalize(source) * ||h|| per
            position, h <- alpha * c + (1 - alpha) * h).
        h: Block output (B, T, H).
        mask: Attention mask (B, T), 1 on real tokens.
        source: The vectors to write (see ``mode``).
        alpha: Blend weight of ``rescaled``.
        scale: Multiplier of ``additive``.

    Returns:
        ``(new_h, injected_norm_mean)``: the new block output in ``h``'s dtype, and per row the norm of what the
        condition injects, as the paper records it: the added vector ``scale * source`` for additive, and the mean
        over real positions of the new state for replace (``source``) and rescaled (the *blended*
        ``alpha * c + (1 - alpha) * h``, which is ``c`` at alpha 1); ``None`` for ``none``.
    """
    m = _check_mask(h, mask)
    if mode == "none":
        return h, None
    if source is None:
        raise ValueError(f"injection mode {mode!r} needs a source")
    if mode == "additive":
        if source.shape != (h.shape[0], h.shape[2]):
            raise ValueError(f"additive needs one vector per row {(h.shape[0], h.shape[2])}, got {tuple(source.shape)}")
        add = (scale * source.float()).to(h.device)
        new = h.float() + add[:, None, :]
        injected = add.norm(dim=-1)
        if h.dtype != torch.float32:
            _warn_if_rounded_away(h.dtype, new.to(h.dtype).float() - h.float(), m, add)
    else:
        if source.shape != h.shape:
            raise ValueError(
                f"{mode} needs a source shaped like the block output {tuple(h.shape)}, got {tuple(source.shape)}"
            )
        source = source.to(h.device)
        if mode == "replace":
            new = source.float()
        elif mode == "rescaled":
            c = rescale_to(source, h)
            new = c if alpha == 1.0 else alpha * c + (1.0 - alpha) * h.float()
        else:
            raise ValueError(f"unknown injection mode {mode!r}; known: {', '.join(MODES)}")
        injected = masked_norm_mean(new, m)
    return torch.where(m[..., None], new.to(h.dtype), h), injected


def _warn_if_rounded_away(dtype: torch.dtype, change: torch.Tensor, mask: torch.Tensor, add: torch.Tensor) -> None:
    """Warn when the block output's dtype distorts an additive write by more than half its norm: the paper's scale
    (0.01 of a translated state, against states of norm ~70) is below bfloat16's resolution, so the condition would
    measure rounding (the change is mostly 0 with a few ulps elsewhere; error ~0.8 of the write's norm on
    Pythia-shaped states), while the records carry the intended norm (the paper's definition)."""
    error = (change - add[:, None, :]).norm(dim=-1) / add.norm(dim=-1).clamp_min(1e-30)[:, None]  # (B, T)
    real = mask.bool()
    if real.any() and error[real].mean() > 0.5:
        warnings.warn(
            f"additive: in {str(dtype).removeprefix('torch.')} rounding distorts the added vector by more than half "
            "its norm; the paper's additive condition needs a float32 receiver (--model.receiver.dtype=float32)",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------- seeded sources


def sample_seed(seed: int, sample_id: str) -> int:
    """A 63-bit seed derived from the run seed and a sample id (stable across processes and Python versions)."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()
    return int(digest[:16], 16) & ((1 << 63) - 1)


def random_vectors(seed: int, sample_id: str, length: int, hidden: int) -> torch.Tensor:
    """Gaussian vectors (length, hidden), fp32 on CPU, from a generator seeded by (run seed, sample id).

    The ``per_sample`` draw: a sample's vectors depend on nothing but the run seed, its id and its length, so they
    survive a change of the evaluation set (a subset, another order), which the paper's sequential draw does not.
    """
    gen = torch.Generator(device="cpu").manual_seed(sample_seed(seed, sample_id))
    return torch.randn((length, hidden), generator=gen, dtype=torch.float32)


def sequential_random_vectors(seed: int, lengths: Sequence[tuple[str, int]], hidden: int) -> dict[str, torch.Tensor]:
    """The paper's ``same_norm_random`` draw: one generator run through the whole evaluation set in dataset order.

    The paper's runner seeds one CPU ``torch.Generator`` with the run seed and, sample after sample, draws
    ``randn((1, L_i, H), float32)`` (arXiv 2606.03280, section 4.2). Drawing every sample's vectors up front, before
    any batching, reproduces that stream exactly and keeps each sample's vectors independent of batch size, batch
    composition and DDP rank. Memory: ``sum(L_i) * hidden`` floats (396 prompts of about 60 tokens at 1024 dims is
    about 100 MB).

    Args:
        seed: The run seed.
        lengths: ``(sample_id, prompt length)`` of every sample of the evaluation set, in dataset order (all of
            them, also those a strict or resumed run skips: each draw advances the generator).
        hidden: The receiver's hidden size.

    Returns:
        sample id -> Gaussian vectors (L_i, hidden), fp32 on CPU.
    """
    ids = [sid for sid, _ in lengths]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique for the sequential random draw")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return {sid: torch.randn((1, int(n), hidden), generator=gen, dtype=torch.float32)[0] for sid, n in lengths}


@dataclass(frozen=True)
class Derangement:
    """Donor map of the shuffled-translation control.

    Args:
        donors: sample id -> donor sample id (same prompt length).
        self_fallback: Samples alone in their length bucket (mapped to themselves), sorted (the paper's
            ``shuffle_self_fallback_count`` is their number).
    """

    donors: dict[str, str]
    self_fallback: tuple[str, ...]

    def strict_ids(self) -> list[str]:
        """Samples with a real (non-self) donor: the strict control's sample set."""
        fallback = set(self.self_fallback)
        return [s for s in self.donors if s not in fallback]


def bucketed_derangement(sample_ids: Sequence[str], lengths: Sequence[int], seed: int) -> Derangement:
    """Map every sample to a donor with the same prompt length, never itself unless alone in its bucket.

    The paper's algorithm (arXiv 2606.03280, section 4.2): buckets keyed by prompt length in order of first
    appearance in the evaluation set, each bucket's ids in dataset order; one ``random.Random(seed)`` runs through
    the buckets in that order, shuffling a copy of each, and ``donor(ids[k]) = ids[(k + 1) % n]``, a derangement
    for n >= 2. The map therefore depends on the dataset order: pass the whole evaluation set in its given order
    (not one rank's share), so every rank builds the same map.

    Args:
        sample_ids: Unique sample ids, in dataset order.
        lengths: Prompt length (tokens) of each sample.
        seed: The run seed.
    """
    if len(sample_ids) != len(lengths):
        raise ValueError(f"{len(sample_ids)} sample ids but {len(lengths)} lengths")
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError("sample ids must be unique for the shuffled-translation derangement")
    buckets: dict[int, list[str]] = {}
    for sid, n in zip(sample_ids, lengths, strict=True):
        buckets.setdefault(int(n), []).append(sid)
    rng = random.Random(seed)
    donors: dict[str, str] = {}
    fallback: list[str] = []
    for bucket in buckets.values():  # insertion order = order of first appearance
        ids = list(bucket)
        rng.shuffle(ids)
        if len(ids) == 1:
            fallback.append(ids[0])
        for k, sid in enumerate(ids):
            donors[sid] = ids[(k + 1) % len(ids)]
    return Derangement(donors={s: donors[s] for s in sample_ids}, self_fallback=tuple(sorted(fallback)))
