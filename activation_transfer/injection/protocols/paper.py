"""The paper's protocol (arXiv 2606.03280, section 4.2): sender and receiver read the same prompt.

Each condition writes its vectors (the sample's translated sender states, another sample's, seeded random vectors,
the receiver's own states, zeros) at every real position of the receiver's block output (``sources.py``); the report
compares them with ``no_inject`` and ``nl_relay``. Its answers are locked by ``tests/test_paper_protocol_lock.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from activation_transfer.injection.answering import PendingAnswers, request_injected
from activation_transfer.injection.conditions import (
    CONDITION_NAMES,
    SOURCE_RELAY,
    SOURCE_SHUFFLED,
    ConditionSpec,
    paper_conditions,
)
from activation_transfer.injection.eval_plan import EvalPlan
from activation_transfer.injection.protocols.base import EvalProtocol, TranslatorKey
from activation_transfer.injection.sources import condition_source, random_draws, translate_prompts
from activation_transfer.models.frozen_lm import LoadedModel
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.report.run import DEFAULT_BASELINES
from activation_transfer.task.prompts import (
    check_same_tokens,
    format_relay_sender_prompt,
    tokenize_left_padded,
    truncation_check,
)


class PaperProtocol(EvalProtocol):
    """The paper's protocol: both models read ``Context: ...\\nQ: ...\\nA:``; shuffle buckets are prompt lengths."""

    name = "paper"
    default_conditions = CONDITION_NAMES
    baselines = DEFAULT_BASELINES

    def __init__(self) -> None:
        self.samples: list = []
        self.lengths: dict[str, int] = {}  # sample id -> receiver prompt tokens (the shuffle buckets)
        self.receiver_rows: list[list[int]] = []  # the receiver's token ids of every prompt, dataset order
        self.translated: dict[TranslatorKey, dict[str, torch.Tensor]] = {}  # -> sample id -> (L_i, d_r)
        self.random_rows: dict[int, dict[str, torch.Tensor]] = {}  # seed -> sample id -> (L_i, d_r), sequential draw
        self.shas = {}
        self._last_batch: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def condition_table(self, scale: float, alpha: float) -> dict[str, ConditionSpec]:
        return paper_conditions(scale, alpha)

    def start(
        self,
        sender: LoadedModel,
        receiver: LoadedModel,
        settings: GenerationSettings,
        samples: Sequence,
        random_draw: str,
    ) -> dict[str, int]:
        self.sender, self.receiver, self.settings, self.random_draw = sender, receiver, settings, random_draw
        self.samples = list(samples)
        self._last_batch = None
        self.receiver_rows = self._token_rows(receiver.tokenizer, self._prompts())
        self.lengths = {s.sample_id: len(r) for s, r in zip(self.samples, self.receiver_rows, strict=True)}
        return self.lengths

    def _prompts(self) -> list[str]:
        return [s.prompt for s in self.samples]

    def _token_rows(self, tokenizer, texts: list[str]) -> list[list[int]]:
        enc = tokenizer(texts, truncation=True, max_length=self.settings.max_prompt_tokens, padding=False)
        return enc["input_ids"]

    def check_inputs(self, plan: EvalPlan) -> tuple[dict, str | None]:
        """Sender and receiver must read the same ids where states are used position by position; prompts cut at
        ``max_prompt_tokens`` lose their question (one warning for the dataset, the ids in meta.json)."""
        ids, prompts = list(self.lengths), self._prompts()
        if plan.needs_same_tokens:
            check_same_tokens(self._token_rows(self.sender.tokenizer, prompts), self.receiver_rows, ids)
        checks = {
            "receiver": (self.receiver.tokenizer, prompts),
            "sender": (self.sender.tokenizer, prompts),
            "relay_sender": (self.sender.tokenizer, [format_relay_sender_prompt(s.context) for s in self.samples]),
        }
        return truncation_check({k: checks[k] for k in plan.prompt_kinds()}, ids, self.settings.max_prompt_tokens)

    def prepare(
        self, plan: EvalPlan, translators: Mapping[str, Sequence], shas: Mapping[str, Sequence[str]], batch_size: int
    ) -> None:
        self.shas = {k: list(v) for k, v in shas.items()}
        hidden = self.receiver.identity()["hidden_size"]
        dtype = next(self.receiver.model.parameters()).dtype
        # The paper's sequential draw runs through the whole dataset in order (batch and rank invariant);
        # per_sample: condition_source draws per batch.
        sequential = self.random_draw == "sequential"
        self.random_rows = random_draws(plan, list(self.lengths.items()), hidden) if sequential else {}
        ids, prompts = list(self.lengths), self._prompts()
        for kind, modules in translators.items():
            needed = plan.translators_needed(kind)
            rows = translate_prompts(
                self.sender,
                [modules[t] for t in needed],
                ids,
                prompts,
                batch_size,
                self.settings.max_prompt_tokens,
                dtype,
            )
            self.translated.update({(kind, t): r for t, r in zip(needed, rows, strict=True)})

    def _receiver_batch(self, sub: Sequence, sample_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The receiver's left-padded ids and mask of ``sub``; tokenized once for the runs that ask the same
        samples one after another (every condition of a sub-batch). Nothing writes into them (``generate`` and the
        stacking copy)."""
        if self._last_batch is None or self._last_batch[0] != tuple(sample_ids):
            texts = [s.prompt for s in sub]
            tok = tokenize_left_padded(self.receiver.tokenizer, texts, self.settings.max_prompt_tokens)
            self._last_batch = (tuple(sample_ids), (tok["input_ids"], tok["attention_mask"]))
        return self._last_batch[1]

    def answer(self, spec: ConditionSpec, seed: int | None, plan: EvalPlan, sub: Sequence) -> PendingAnswers:
        if spec.source == SOURCE_RELAY:
            return self.answer_relay(sub)
        sample_ids = [s.sample_id for s in sub]
        ids, mask = self._receiver_batch(sub, sample_ids)
        kind = spec.translator_kind
        translated = self.translated.get((kind, plan.translator_index(seed, kind))) if kind else None
        derangement = plan.derangements.get(seed) if spec.source == SOURCE_SHUFFLED else None
        source, rows = condition_source(
            spec, seed, sample_ids, ids, mask, self.receiver, translated, derangement, self.random_rows.get(seed)
        )
        donors = [derangement.donors[sid] for sid in sample_ids] if derangement is not None else None
        fields = self.run_fields(spec, seed, plan)
        run = request_injected(ids, mask, spec, sample_ids, source, rows, donors)
        return run.then(lambda preds, diags: (preds, [{**d, **fields} for d in diags]))
