"""What an evaluation protocol is: the part of an injection evaluation that differs from one protocol to the next.

A protocol decides what the receiver reads, what each of its conditions writes there, which conditions exist and
which of them the report compares with; planning, records, resume and the report are shared
(``lightning_modules/injection_eval.py`` only calls this interface). ``protocols/__init__.py`` names the protocols.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

from activation_transfer.injection.answering import Answers, PendingAnswers, request_relay
from activation_transfer.injection.conditions import RANDOM_DRAW_NOTES, ConditionSpec, select_conditions
from activation_transfer.injection.eval_plan import EvalPlan
from activation_transfer.models.frozen_lm import LoadedModel
from activation_transfer.models.generation import GenerationSettings

TranslatorKey = tuple[str, int]  # (kind: aligned | functional, index in that kind's checkpoint list)


class EvalProtocol(ABC):
    """One protocol of one evaluation: configured without models, then started on the models and the samples.

    Life cycle: :meth:`configured` (the module's constructor: conditions, fingerprint, translator checks), then at test
    start :meth:`start` -> ``EvalPlan`` on its buckets -> :meth:`check_inputs` -> :meth:`prepare`, then
    :meth:`answer` per condition and sub-batch.

    Attributes:
        name: The ``model.protocol`` value.
        default_conditions: The conditions run when ``model.conditions`` is left at its default, in order.
        baselines: What the report compares every other condition with (those present in the run).
    """

    name: ClassVar[str]
    default_conditions: ClassVar[tuple[str, ...]]
    baselines: ClassVar[tuple[str, ...]]

    sender: LoadedModel
    receiver: LoadedModel
    settings: GenerationSettings
    shas: Mapping[str, Sequence[str]]  # translator kind -> each checkpoint's SHA-256 (set by prepare)

    @classmethod
    def configured(cls, **options) -> EvalProtocol:
        """The protocol for the module's protocol options (``slots``, ...); a protocol reads only its own."""
        return cls()

    # ------------------------------------------------------------------------------------------------ configuration

    @abstractmethod
    def condition_table(self, scale: float, alpha: float) -> dict[str, ConditionSpec]:
        """Every condition of this protocol by name (``scale``/``alpha``: ``model.scale``/``model.alpha``)."""

    def conditions(self, names: Sequence[str], scale: float, alpha: float) -> list[ConditionSpec]:
        """The named conditions' specs, in order; an unknown or repeated name is one clear error."""
        return select_conditions(self.condition_table(scale, alpha), names, self.name)

    def identity(self) -> dict:
        """What the protocol adds to the run's fingerprint and ``meta.json`` (none: the paper's folders keep theirs)."""
        return {}

    def random_draw_note(self, random_draw: str) -> str:
        """What ``meta.json`` says of the random controls' draw under the module's ``random_draw`` option."""
        return RANDOM_DRAW_NOTES[random_draw]

    def translator_slots(self) -> dict | None:
        """The slot scheme a functional translator must have been trained with, or None (nothing to check)."""
        return None

    def translator_kind(self, option: str) -> str:
        """The kind of translator the module's ``option`` (``aligned``/``functional``) must hold here (KV: ``kv``)."""
        return option

    # ------------------------------------------------------------------------------------------------ one run

    @abstractmethod
    def start(
        self,
        sender: LoadedModel,
        receiver: LoadedModel,
        settings: GenerationSettings,
        samples: Sequence,
        random_draw: str,
    ) -> dict[str, int]:
        """Read the whole evaluation set (dataset order) for these models; return each sample's shuffle bucket
        (the length a shuffled donor must share), in dataset order."""

    @abstractmethod
    def check_inputs(self, plan: EvalPlan) -> tuple[dict, str | None]:
        """Check what the models read for the plan's pending runs: raise on unusable input; return what is cut
        (``meta.json``'s ``truncated_prompts``) and one warning line, or None."""

    @abstractmethod
    def prepare(
        self, plan: EvalPlan, translators: Mapping[str, Sequence], shas: Mapping[str, Sequence[str]], batch_size: int
    ) -> None:
        """Compute up front what crosses batches and ranks: each sample's translation per translator a pending run
        needs (a shuffled donor may sit in another batch) and the random draws (the sequential draw runs in dataset
        order). ``translators``/``shas``: ``aligned``/``functional`` -> the loaded translators / their SHA-256."""

    @abstractmethod
    def answer(self, spec: ConditionSpec, seed: int | None, plan: EvalPlan, sub: Sequence) -> PendingAnswers | Answers:
        """The receiver's answers and each record's diagnostics for the samples ``sub`` under one condition: a
        :class:`PendingAnswers` (its ``generate`` is left to the module, which stacks the runs of a sub-batch), or
        the finished ``Answers`` of a run that generates by itself."""

    # ------------------------------------------------------------------------------------------------ shared steps

    def answer_relay(self, sub: Sequence) -> PendingAnswers:
        """``nl_relay``: the sender's relay of the context, then the receiver answers from it (the same everywhere)."""
        return request_relay(
            self.sender,
            self.receiver,
            [s.sample_id for s in sub],
            [s.context for s in sub],
            [s.question for s in sub],
            self.settings,
        )

    def run_fields(self, spec: ConditionSpec, seed: int | None, plan: EvalPlan) -> dict:
        """Whether the seed matters and which translator answered: the report counts one translator's seed-free
        answers once."""
        fields: dict = {"seeded": spec.seeded}
        if kind := spec.translator_kind:
            fields["translator_sha256"] = self.shas[kind][plan.translator_index(seed, kind)]
        return fields
