"""The split-context protocol: the sender reads the context and the question, the receiver only the question.

The receiver reads ``[slot] * K + Q: {question}\nA:``; a prefill hook writes, at the slot positions of its block
output only, what the condition supplies: the sender's context states through a translator, the receiver's own,
another sample's, seeded random vectors or zeros (docs/conditions.md, "Split protocol"). It asks whether the receiver
uses what only the sender knows; the report compares with ``receiver_alone`` (floor) and ``skyline`` (ceiling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from activation_transfer.errors import UsageError
from activation_transfer.injection.answering import PendingAnswers, request_injected
from activation_transfer.injection.conditions import (
    SOURCE_NONE,
    SOURCE_RANDOM,
    SOURCE_RECEIVER,
    SOURCE_RELAY,
    SOURCE_SHUFFLED,
    SOURCE_TRANSLATED,
    SOURCE_ZEROS,
    ConditionSpec,
    rescale_to,
)
from activation_transfer.injection.eval_plan import EvalPlan
from activation_transfer.injection.protocols.base import EvalProtocol, TranslatorKey
from activation_transfer.injection.slots import (
    SlotSpec,
    encode_parts,
    left_padded,
    receiver_batch,
    sender_batch,
    slot_grid,
)
from activation_transfer.injection.sources import (
    SENDER_SITES,
    capture_block,
    capture_site,
    check_finite_rows,
    random_draws,
)
from activation_transfer.models.frozen_lm import LoadedModel
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.report.records import run_key
from activation_transfer.report.run import SPLIT_BASELINES
from activation_transfer.task.entities import candidates
from activation_transfer.task.prompts import over_length, split_prompt, tokenize_left_padded

CONDITION_NAMES: tuple[str, ...] = (
    "receiver_alone",
    "skyline",
    "nl_relay",
    "slots_self",
    "slots_translated",
    "slots_functional",
    "slots_shuffled",
    "slots_shuffled_functional",
    "slots_random",
    "slots_random_functional",
    "slots_zero",
)
# Controls that say what crossed, each with a functional translator of its own (``functional_translator_ckpt`` of a
# run of its own): trained and read on the sender's token embeddings (``sender_site: embeddings``), or trained on
# contexts swapped between samples (``QATrainingDataModule.mismatched_contexts``). Not in the default list.
CONTROL_CONDITIONS: tuple[str, ...] = ("slots_functional_lexical", "slots_functional_mismatched")
# What a functional translator's training spec must say for each functional condition (absent keys: an older
# translator, read at its block on its own contexts).
LEXICAL, MISMATCHED = CONTROL_CONDITIONS


def split_conditions() -> dict[str, ConditionSpec]:
    """The split protocol's conditions: slot conditions replace the receiver's block output at the slots only."""
    f = "functional"
    return {
        "receiver_alone": ConditionSpec("receiver_alone", "none", SOURCE_NONE),
        "skyline": ConditionSpec("skyline", "none", SOURCE_NONE),
        "nl_relay": ConditionSpec("nl_relay", "none", SOURCE_RELAY),
        "slots_self": ConditionSpec("slots_self", "replace", SOURCE_RECEIVER),
        "slots_translated": ConditionSpec("slots_translated", "replace", SOURCE_TRANSLATED),
        "slots_functional": ConditionSpec("slots_functional", "replace", SOURCE_TRANSLATED, translator=f),
        "slots_shuffled": ConditionSpec("slots_shuffled", "replace", SOURCE_SHUFFLED),
        "slots_shuffled_functional": ConditionSpec(
            "slots_shuffled_functional", "replace", SOURCE_SHUFFLED, translator=f
        ),
        # Random vectors take the norms of the translated slot vectors they replace: they read a translator.
        "slots_random": ConditionSpec("slots_random", "replace", SOURCE_RANDOM, translator="aligned"),
        "slots_random_functional": ConditionSpec("slots_random_functional", "replace", SOURCE_RANDOM, translator=f),
        "slots_zero": ConditionSpec("slots_zero", "replace", SOURCE_ZEROS),
        **{name: ConditionSpec(name, "replace", SOURCE_TRANSLATED, translator=f) for name in CONTROL_CONDITIONS},
    }


def check_translator_training(
    spec: ConditionSpec, training: dict, sender_site: str, where: str, mismatched: str = MISMATCHED
) -> None:
    """Refuse a translator whose training does not fit the condition reading it: the sender site it was trained on
    must be the evaluation's (``model.sender_site``), and only the condition ``mismatched`` (the protocol's
    mismatched-training control) reads a translator trained on mismatched contexts (and it reads nothing else)."""
    trained_site = training.get("sender_site", "block")
    if trained_site != sender_site:
        raise UsageError(
            f"translator {where} was trained on the sender's {trained_site} but the evaluation reads its "
            f"{sender_site} (condition {spec.name}); set --model.sender_site {trained_site} or pass a translator "
            f"trained with model.sender_site {sender_site}"
        )
    if spec.translator_kind != "functional":
        return
    contexts = training.get("contexts", "own")
    wanted = "mismatched" if spec.name == mismatched else "own"
    if contexts != wanted:
        raise UsageError(
            f"condition {spec.name} needs a functional translator trained on {wanted} contexts, but {where} was "
            f"trained on {contexts} contexts (data.mismatched_contexts); pass the matching functional_translator_ckpt"
        )


def sample_fields(sample) -> dict:
    """What a record's diagnostics carry about its sample for the subgroup report (report/subgroups.py)."""
    gold_original = getattr(sample, "gold_original", None)
    return {
        "candidates": candidates(sample.context, sample.answer),
        **({"gold_original": gold_original} if gold_original is not None else {}),
    }


class SplitProtocol(EvalProtocol):
    """The split-context protocol: the samples' two-part tokens, translated slots, random draws and answers.

    Args:
        slots: The slot scheme (which context positions feed how many slots, slot token, context length).
        sender_site: Where the translators read the sender: ``block`` (its ``sender.layer`` output) or
            ``embeddings`` (its token embeddings, ``hidden_states[0]``: ``slots_functional_lexical``).
    """

    name = "split"
    default_conditions = CONDITION_NAMES
    lexical_condition = LEXICAL  # the only translator condition read at the sender's embeddings
    baselines = SPLIT_BASELINES

    def __init__(self, slots: SlotSpec, sender_site: str = "block") -> None:
        if sender_site not in SENDER_SITES:
            raise UsageError(f"model.sender_site must be one of {', '.join(SENDER_SITES)}, got {sender_site!r}")
        self.slots, self.sender_site = slots, sender_site
        self.ids: list[str] = []
        self.texts: dict[str, tuple[str, str]] = {}
        self.parts: dict[str, dict[str, tuple[list[int], list[int]]]] = {}  # side -> sample id -> (context, question)
        self.slot_counts: dict[str, int] = {}
        self.translated: dict[TranslatorKey, dict[str, torch.Tensor]] = {}  # -> sample id -> slot vectors (K, d_r)
        self.random_rows: dict[tuple[int, TranslatorKey], dict[str, torch.Tensor]] = {}
        self.shas: dict[str, list[str]] = {}

    @classmethod
    def configured(cls, slots: SlotSpec | None = None, sender_site: str = "block", **options) -> SplitProtocol:
        return cls(slots or SlotSpec(), sender_site)

    def condition_table(self, scale: float, alpha: float) -> dict[str, ConditionSpec]:
        return split_conditions()

    def conditions(self, names: Sequence[str], scale: float, alpha: float) -> list[ConditionSpec]:
        """As the base's; ``slots_functional_lexical`` only with ``sender_site: embeddings`` and, there, no other
        condition that reads a translator (every translator of the run is read at the embeddings)."""
        specs = super().conditions(names, scale, alpha)
        lexical = self.sender_site == "embeddings"
        name = self.lexical_condition
        wrong = [s.name for s in specs if s.translator_kind and (s.name == name) != lexical]
        if wrong:
            raise UsageError(
                f"conditions {', '.join(wrong)} cannot run with model.sender_site {self.sender_site}: "
                f"{name} needs sender_site embeddings, every other translator condition sender_site block"
            )
        return specs

    def identity(self) -> dict:
        # The site only when it is not the default: the fingerprints (run folders) of block runs stay what they were.
        site = {} if self.sender_site == "block" else {"sender_site": self.sender_site}
        return {"protocol": self.name, "slots": self.slots.to_dict(), **site}

    def translator_slots(self) -> dict:
        return self.slots.to_dict()

    # ------------------------------------------------------------------------------------------------ preparing

    def start(
        self,
        sender: LoadedModel,
        receiver: LoadedModel,
        settings: GenerationSettings,
        samples: Sequence,
        random_draw: str = "sequential",
    ) -> dict[str, int]:
        """Encode every sample's context and question part for both models; the buckets are the slot counts.

        ``settings.max_prompt_tokens`` also bounds the question part; ``random_draw``: ``sequential`` (one generator
        per seed run through the dataset in order) or ``per_sample``.
        """
        self.sender, self.receiver, self.settings, self.random_draw = sender, receiver, settings, random_draw
        self.pad_id = receiver.tokenizer.eos_token_id
        # The measurement the protocol is built on uses EOS slots; EOS is also the pad id, but slots are real tokens.
        self.slot_id = self.pad_id if self.slots.token_id is None else int(self.slots.token_id)
        self.ids = [s.sample_id for s in samples]
        self.texts = {s.sample_id: (s.context, s.question) for s in samples}
        for side, model in (("sender", sender), ("receiver", receiver)):
            ctx, qst = encode_parts(
                model.tokenizer,
                [s.context for s in samples],
                [s.question for s in samples],
                self.slots.max_context_tokens,
                settings.max_prompt_tokens,
            )
            self.parts[side] = dict(zip(self.ids, zip(ctx, qst, strict=True), strict=True))
        # Slots of the translated conditions (the sender's context length); also the shuffle buckets.
        self.slot_counts = {sid: self.slots.count(len(c)) for sid, (c, _) in self.parts["sender"].items()}
        return self.slot_counts

    def check_inputs(self, plan: EvalPlan) -> tuple[dict, str | None]:
        """Context parts cut at ``slots.max_context_tokens`` and question parts cut at ``max_prompt_tokens``."""
        parts = [split_prompt(*self.texts[sid]) for sid in self.ids]
        cut = {
            "sender_context": over_length(
                self.sender.tokenizer, self.ids, [p for p, _ in parts], self.slots.max_context_tokens
            ),
            "question": over_length(
                self.receiver.tokenizer, self.ids, [q for _, q in parts], self.settings.max_prompt_tokens
            ),
        }
        info = {
            "max_context_tokens": self.slots.max_context_tokens,
            "max_prompt_tokens": self.settings.max_prompt_tokens,
            **{k: {"count": len(v), "ids": v} for k, v in cut.items()},
        }
        if not any(cut.values()):
            return info, None
        # Right truncation keeps the context's start: facts at its end are lost, so the slots never carry them.
        return info, (
            f"split protocol: {len(cut['sender_context'])} context parts are cut at slots.max_context_tokens="
            f"{self.slots.max_context_tokens} and {len(cut['question'])} question parts at "
            "generation.max_prompt_tokens (ids in meta.json)"
        )

    def prepare(
        self, plan: EvalPlan, translators: Mapping[str, Sequence], shas: Mapping[str, list[str]], batch_size: int
    ) -> None:
        """Translate every sample once per translator a pending run needs, and draw the pending random slots.

        Args:
            plan: The evaluation plan (built on :attr:`slot_counts`).
            translators: ``aligned`` / ``functional`` -> the loaded translators, one or one per seed.
            shas: The same keys -> each translator's SHA-256 (recorded per record).
            batch_size: Prompts per sender forward pass.
        """
        self.shas = {k: list(v) for k, v in shas.items()}
        for spec, _ in plan.pending:
            kind = spec.translator_kind
            for i, t in enumerate(translators.get(kind, ()) if kind else ()):
                training = (getattr(t, "hparams", None) or {}).get("training") or {}
                check_translator_training(spec, training, self.sender_site, f"{kind} #{i} ({getattr(t, 'path', '?')})")
        for kind, modules in translators.items():
            for t in plan.translators_needed(kind):
                self.translated[(kind, t)] = self.translate(modules[t], batch_size)
        hidden = self.receiver.identity()["hidden_size"]
        draws = random_draws(plan, list(self.slot_counts.items()), hidden, self.random_draw == "per_sample")
        for spec, seed in plan.pending:
            if spec.source != SOURCE_RANDOM or not plan.todo[run_key(spec.name, seed)]:
                continue
            key = (spec.translator_kind, plan.translator_index(seed, spec.translator_kind))
            # Per slot, the norm of the translated vector it replaces (fp32, then the receiver's dtype).
            trans = self.translated[key]
            self.random_rows[(seed, key)] = {
                sid: rescale_to(draws[seed][sid], trans[sid].cpu()).to(trans[sid].dtype) for sid in self.ids
            }

    @torch.no_grad()
    def translate(self, translator, batch_size: int) -> dict[str, torch.Tensor]:
        """Each sample's slot vectors (K, d_r): the sender reads context + question, its states at the context
        positions go through ``translator``, then ``SlotSpec.pick``; the receiver's dtype, on the sender's device."""
        t_dtype = next(translator.parameters()).dtype
        dtype = next(self.receiver.model.parameters()).dtype
        out: dict[str, torch.Tensor] = {}
        for start in range(0, len(self.ids), batch_size):
            chunk = self.ids[start : start + batch_size]
            ctx, qst = zip(*(self.parts["sender"][sid] for sid in chunk))
            batch = sender_batch(ctx, qst, self.sender.tokenizer.eos_token_id)
            h = capture_site(
                self.sender.model, self.sender.layer.path, batch["input_ids"], batch["attention_mask"], self.sender_site
            )
            tr = translator.translate(h.to(t_dtype)).to(dtype)
            for i, sid in enumerate(chunk):
                out[sid] = self.slots.pick(tr[i, batch["context_slices"][i]]).contiguous()
        return out

    def own_slots(self, sample_ids: Sequence[str]) -> list[torch.Tensor]:
        """The receiver's own block states of each sample's context part (a pass over that part alone), picked."""
        rows = [self.parts["receiver"][sid][0] for sid in sample_ids]
        ids, mask = left_padded(rows, self.pad_id)
        h = capture_block(self.receiver.model, self.receiver.layer.path, ids, mask)
        width = h.shape[1]
        return [self.slots.pick(h[i, width - len(r) :]) for i, r in enumerate(rows)]

    # ------------------------------------------------------------------------------------------------ answering

    def slot_vectors(self, spec: ConditionSpec, seed: int | None, plan: EvalPlan, sample_ids: Sequence[str]):
        """``(vectors, translated_rows, donors)`` for a slot condition: per sample the (K_i, H) slot vectors, the
        translated rows behind them (norm diagnostics) and the shuffled donors (or None)."""
        kind = spec.translator_kind
        key = (kind, plan.translator_index(seed, kind)) if kind else None
        if spec.source == SOURCE_RECEIVER:
            return self.own_slots(sample_ids), None, None
        if spec.source == SOURCE_ZEROS:
            hidden = self.receiver.identity()["hidden_size"]
            return [torch.zeros(self.slot_counts[sid], hidden) for sid in sample_ids], None, None
        if spec.source == SOURCE_RANDOM:
            return [self.random_rows[(seed, key)][sid] for sid in sample_ids], None, None
        donors = [plan.derangements[seed].donors[sid] for sid in sample_ids] if spec.source == SOURCE_SHUFFLED else None
        owners = donors or list(sample_ids)
        rows = [self.translated[key][sid] for sid in owners]
        check_finite_rows(rows, spec.name, sample_ids, owners)
        return rows, rows, donors

    def answer(self, spec: ConditionSpec, seed: int | None, plan: EvalPlan, sub: Sequence) -> PendingAnswers:
        """One condition's answers and diagnostics for the samples ``sub``; the diagnostics also carry
        ``candidates`` (entities of the answer's type in the context, None if untyped) and, for a counterfactual
        sample, ``gold_original`` (the answer its context stated before the substitution)."""
        run = self._answer(spec, seed, plan, sub)
        return run.then(
            lambda preds, diags: (preds, [{**d, **sample_fields(s)} for d, s in zip(diags, sub, strict=True)])
        )

    def _answer(self, spec: ConditionSpec, seed: int | None, plan: EvalPlan, sub: Sequence) -> PendingAnswers:
        """The run's pending answers; ``bytes_sent`` is what crossed from the sender per question: the relay's UTF-8
        text (``nl_relay``), the slot vectors at the receiver's dtype, nothing for ``receiver_alone``/``skyline``."""
        sample_ids = [s.sample_id for s in sub]
        if spec.source == SOURCE_RELAY:
            return self.answer_relay(sub).then(
                lambda preds, diags: (preds, [{**d, "bytes_sent": len(d["relay"].encode("utf-8"))} for d in diags])
            )
        if spec.name == "skyline":  # the paper's prompt, tokenized as the paper protocol's no_inject reads it
            tok = tokenize_left_padded(
                self.receiver.tokenizer, [s.prompt for s in sub], self.settings.max_prompt_tokens
            )
            run = request_injected(tok["input_ids"], tok["attention_mask"], spec, sample_ids, None)
            return run.then(
                lambda preds, diags: (preds, [{**d, "slot_count": 0, "bytes_sent": 0, "seeded": False} for d in diags])
            )
        # receiver_alone (no source) reads the question part without slots; every other condition writes slots.
        slotted = spec.source != SOURCE_NONE
        vectors, rows, donors = self.slot_vectors(spec, seed, plan, sample_ids) if slotted else (None, None, None)
        counts = [len(v) for v in vectors] if slotted else [0] * len(sub)
        batch = receiver_batch(
            [self.parts["receiver"][sid][1] for sid in sample_ids], counts, self.slot_id, self.pad_id
        )
        ids, mask, slot_mask = batch["input_ids"], batch["attention_mask"], batch["slot_mask"]
        param = next(self.receiver.model.parameters())
        source = slot_grid(vectors, slot_mask, dtype=param.dtype, device=param.device) if slotted else None
        run = request_injected(ids, mask, spec, sample_ids, source, rows, donors, slot_mask if slotted else None)
        fields = self.run_fields(spec, seed, plan)
        size = self.receiver.identity()["hidden_size"] * param.element_size()  # one slot vector at the dtype
        return run.then(
            lambda preds, diags: (
                preds,
                [{**d, "slot_count": k, "bytes_sent": k * size, **fields} for d, k in zip(diags, counts)],
            )
        )
