"""The KV protocol: the sender reads the context and the question, the receiver only the question, after an attention
prefix of one key and value per context token at each receiver layer (or a chosen subset of layers).

The prefix is the receiver's own context pass (``kv_self``, which must answer as ``skyline``), the sender's context
states through a KV projector (``translators/kv_projector.py``), another sample's, seeded random entries with the
projected norms, or zeros (docs/conditions.md, "KV protocol"). Parts, truncation checks and the ``receiver_alone`` /
``skyline`` answers are the split protocol's; the report compares with the same two baselines, and the controls that
say what crossed are the split protocol's in KV form (each with a projector of its own, in a run of its own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from activation_transfer.errors import UsageError
from activation_transfer.injection.answering import PendingAnswers
from activation_transfer.injection.conditions import (
    RANDOM_DRAW_NOTES,
    SOURCE_NONE,
    SOURCE_RANDOM,
    SOURCE_RECEIVER,
    SOURCE_SHUFFLED,
    SOURCE_TRANSLATED,
    SOURCE_ZEROS,
    ConditionSpec,
    random_vectors,
    rescale_to,
)
from activation_transfer.injection.eval_plan import EvalPlan
from activation_transfer.injection.kv_prefix import (
    KVPrefix,
    assemble,
    bytes_sent,
    context_states,
    generate_after_prefix,
    geometry,
    own_prefix,
    resolve_layers,
    zero_prefix,
)
from activation_transfer.injection.protocols.split import SplitProtocol, check_translator_training, sample_fields
from activation_transfer.injection.slots import SlotSpec, left_padded, sender_batch
from activation_transfer.models.generation import GenerationSettings, decode

CONDITION_NAMES: tuple[str, ...] = (
    "receiver_alone",
    "skyline",
    "kv_self",
    "kv_functional",
    "kv_shuffled_functional",
    "kv_random_functional",
    "kv_zero",
)
# The split protocol's controls in KV form, not in the default list: a projector trained and read on the sender's token
# embeddings (``sender_site: embeddings``: which tokens the context held, nothing the sender computed), or trained on
# contexts swapped between samples (``QATrainingDataModule.mismatched_contexts``: what the question alone tells).
CONTROL_CONDITIONS: tuple[str, ...] = ("kv_functional_lexical", "kv_functional_mismatched")
KV_LEXICAL, KV_MISMATCHED = CONTROL_CONDITIONS
# The translator option whose checkpoints the KV conditions read (``--model.functional_translator_ckpt``).
KV_OPTION = "functional"


def kv_conditions() -> dict[str, ConditionSpec]:
    """The KV protocol's conditions (``mode`` is only a label here: the prefix replaces nothing)."""
    f = KV_OPTION
    return {
        "receiver_alone": ConditionSpec("receiver_alone", "none", SOURCE_NONE),
        "skyline": ConditionSpec("skyline", "none", SOURCE_NONE),
        "kv_self": ConditionSpec("kv_self", "replace", SOURCE_RECEIVER),
        "kv_functional": ConditionSpec("kv_functional", "replace", SOURCE_TRANSLATED, translator=f),
        "kv_shuffled_functional": ConditionSpec("kv_shuffled_functional", "replace", SOURCE_SHUFFLED, translator=f),
        # Random entries take the norms of the projected ones: they read the projector.
        "kv_random_functional": ConditionSpec("kv_random_functional", "replace", SOURCE_RANDOM, translator=f),
        "kv_zero": ConditionSpec("kv_zero", "replace", SOURCE_ZEROS),
        **{name: ConditionSpec(name, "replace", SOURCE_TRANSLATED, translator=f) for name in CONTROL_CONDITIONS},
    }


class KVProtocol(SplitProtocol):
    """The KV protocol: the split protocol's two-part prompts, answered after an attention prefix.

    Args:
        slots: Only ``max_context_tokens`` is read (context tokens kept, right truncation: the prefix length).
        layers: Receiver layers that get a prefix (None: all; negative: from the end); the others hold zeros.
        sender_site: Where the projectors read the sender: ``block`` (its ``sender.layer`` output) or ``embeddings``
            (its token embeddings: ``kv_functional_lexical`` only).
    """

    name = "kv"
    default_conditions = CONDITION_NAMES
    lexical_condition = KV_LEXICAL

    def __init__(self, slots: SlotSpec, layers: Sequence[int] | None = None, sender_site: str = "block") -> None:
        super().__init__(slots, sender_site)
        self.layers_option = None if layers is None else [int(i) for i in layers]
        self.layers: list[int] = []
        self.projectors: dict[tuple[str, int], torch.nn.Module] = {}

    @classmethod
    def configured(
        cls, slots: SlotSpec | None = None, layers: Sequence[int] | None = None, sender_site: str = "block", **options
    ) -> KVProtocol:
        return cls(slots or SlotSpec(), layers, sender_site)

    def condition_table(self, scale: float, alpha: float) -> dict[str, ConditionSpec]:
        return kv_conditions()

    def identity(self) -> dict:
        # The site only when it is not the default: the fingerprints (run folders) of block runs stay what they were.
        site = {} if self.sender_site == "block" else {"sender_site": self.sender_site}
        return {
            "protocol": self.name,
            "max_context_tokens": self.slots.max_context_tokens,
            "layers": self.layers_option,
            **site,
        }

    def translator_slots(self) -> dict:
        """The layer subset a projector must have been trained for (as given: None means all)."""
        return {"layers": self.layers_option}

    def translator_kind(self, option: str) -> str:
        return "kv" if option == KV_OPTION else option

    # ------------------------------------------------------------------------------------------------ preparing

    def start(
        self,
        sender,
        receiver,
        settings: GenerationSettings,
        samples: Sequence,
        random_draw: str = "sequential",
    ) -> dict[str, int]:
        """The split protocol's parts; one shuffle bucket for all (a prefix of any length fits any question), so a
        shuffled donor is never the sample itself (two samples or more)."""
        super().start(sender, receiver, settings, samples, random_draw)
        self.layers = resolve_layers(self.layers_option, geometry(receiver.model)[0])
        return {sid: 0 for sid in self.ids}

    def prepare(
        self, plan: EvalPlan, translators: Mapping[str, Sequence], shas: Mapping[str, list[str]], batch_size: int
    ) -> None:
        """Keep the projectors the pending runs need (prefixes are computed per batch: a whole set's would not fit),
        refusing one trained for other layers, another sender site or other contexts than its condition reads."""
        self.shas = {k: list(v) for k, v in shas.items()}
        for spec, seed in plan.pending:
            if spec.translator_kind == KV_OPTION:
                t = plan.translator_index(seed, KV_OPTION)
                projector = translators[KV_OPTION][t]
                training = (getattr(projector, "hparams", None) or {}).get("training") or {}
                where = f"{KV_OPTION} #{t} ({getattr(projector, 'path', '?')})"
                check_translator_training(spec, training, self.sender_site, where, KV_MISMATCHED)
        for t in plan.translators_needed(KV_OPTION):
            projector = translators[KV_OPTION][t]
            trained = list(getattr(projector.translator, "layers", []))
            if trained != self.layers:
                raise UsageError(
                    f"the KV projector {getattr(projector, 'path', t)} writes receiver layers {trained}, the "
                    f"evaluation's prefix layers are {self.layers}; evaluate with the layers it was trained for"
                )
            self.projectors[(KV_OPTION, t)] = projector

    # ------------------------------------------------------------------------------------------------ prefixes

    @torch.no_grad()
    def project(self, projector, owners: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unrotated keys and values ``(S, B, H, P, hd)`` of the owners' sender context states through the projector
        (receiver dtype and device), and the prefix mask ``(B, P)`` (left padded, one entry per context token)."""
        ctx, qst = zip(*(self.parts["sender"][sid] for sid in owners))
        batch = sender_batch(ctx, qst, self.sender.tokenizer.eos_token_id)
        grid, mask = context_states(self.sender.model, self.sender.layer.path, batch, self.sender_site)
        keys, values = projector.translate(grid)
        param = next(self.receiver.model.parameters())
        return keys.to(param), values.to(param), mask

    def random_draw_note(self, random_draw: str) -> str:
        """The KV controls always draw per sample (:meth:`random_like`), whatever ``random_draw`` says."""
        return (
            f"{RANDOM_DRAW_NOTES['per_sample']}, randn of the projected keys' and values' shape, rescaled to each "
            "(layer, head, position) vector's norm (the KV protocol always draws per sample)"
        )

    def random_like(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, seed: int, sample_ids):
        """Gaussian keys and values with the norm of each projected (layer, head, position) vector; one generator
        per sample seeded by (run seed, sample id), so a sample's draw does not depend on the batch."""
        keys, values = keys.clone(), values.clone()
        s, _, heads, _, hd = keys.shape
        for i, sid in enumerate(sample_ids):
            n = int(mask[i].sum())
            draw = random_vectors(seed, sid, 2 * s * n, heads * hd).view(2, s, n, heads, hd).transpose(2, 3)
            for j, t in enumerate((keys, values)):
                t[:, i, :, -n:] = rescale_to(draw[j], t[:, i, :, -n:].cpu()).to(t)
        return keys, values

    def prefix(self, spec: ConditionSpec, seed: int | None, plan: EvalPlan, sample_ids: Sequence[str]):
        """``(prefix, donors)`` of a KV condition for these samples (donors: the shuffled ones, else None)."""
        model = self.receiver.model
        if spec.source == SOURCE_RECEIVER:
            rows = [self.parts["receiver"][sid][0] for sid in sample_ids]
            return own_prefix(model, rows, self.pad_id, self.layers), None
        if spec.source == SOURCE_ZEROS:  # as many entries as the sender's message would have
            return zero_prefix(model, [len(self.parts["sender"][sid][0]) for sid in sample_ids], self.layers), None
        donors = [plan.derangements[seed].donors[sid] for sid in sample_ids] if spec.source == SOURCE_SHUFFLED else None
        projector = self.projectors[(KV_OPTION, plan.translator_index(seed, KV_OPTION))]
        keys, values, mask = self.project(projector, donors or sample_ids)
        if spec.source == SOURCE_RANDOM:
            keys, values = self.random_like(keys, values, mask, seed, sample_ids)
        return assemble(model, self.layers, keys, values, mask, rotate=True), donors

    # ------------------------------------------------------------------------------------------------ answering

    def answer(self, spec: ConditionSpec, seed: int | None, plan: EvalPlan, sub: Sequence) -> PendingAnswers:
        """One condition's answers and diagnostics (``bytes_sent``, prefix length and norms) for ``sub``; a prefix
        condition generates here, by itself (its prefix and question widths are its own), the text-only ones are
        left to the module's stacked ``generate``."""
        if spec.source == SOURCE_NONE:  # receiver_alone and skyline read text only: the split protocol's answers
            return super().answer(spec, seed, plan, sub)
        sample_ids = [s.sample_id for s in sub]
        prefix, donors = self.prefix(spec, seed, plan, sample_ids)
        key_norm, value_norm = prefix.norms(self.layers)
        check_finite_prefix(key_norm + value_norm, spec.name, sample_ids)
        ids, mask = left_padded([self.parts["receiver"][sid][1] for sid in sample_ids], self.pad_id)
        tok = self.receiver.tokenizer
        new_ids = generate_after_prefix(self.receiver.model, tok, prefix, ids, mask, self.settings)
        preds = [p.strip() for p in decode(tok, new_ids)]
        diags = self.diagnostics(spec, seed, plan, prefix, mask, (key_norm, value_norm), donors)
        # The subgroup report reads candidates (and gold_original) from every condition, as the text-only ones carry.
        diags = [{**d, **sample_fields(s)} for d, s in zip(diags, sub, strict=True)]
        return PendingAnswers.answered((preds, diags), spec.name)

    def diagnostics(self, spec, seed, plan, prefix: KVPrefix, mask, norms, donors) -> list[dict]:
        hidden = self.receiver.identity()["hidden_size"]
        dtype = next(self.receiver.model.parameters()).dtype
        fields = self.run_fields(spec, seed, plan)
        out = []
        for i, n in enumerate(prefix.mask.sum(1).tolist()):
            d = {
                "prompt_len": int(mask[i].sum()),
                "prefix_len": int(n),
                "kv_layers": len(self.layers),
                "bytes_sent": bytes_sent(n, len(self.layers), hidden, dtype),
                "key_norm_mean": float(norms[0][i]),
                "value_norm_mean": float(norms[1][i]),
                **fields,
            }
            if donors is not None:
                d["donor_id"] = donors[i]
            out.append(d)
        return out


def check_finite_prefix(norms: torch.Tensor, condition: str, sample_ids: Sequence[str]) -> None:
    """Raise ``FloatingPointError`` naming the samples whose prefix holds a NaN or infinity (it would decode to
    nothing and score as wrong)."""
    bad = [sid for sid, ok in zip(sample_ids, torch.isfinite(norms).tolist()) if not ok]
    if bad:
        raise FloatingPointError(
            f"condition {condition}: the attention prefix is NaN or infinite for {len(bad)} sample(s), e.g. "
            f"{', '.join(map(str, bad[:5]))}; a projector weight is broken or the precision overflows"
        )
