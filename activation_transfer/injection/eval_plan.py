"""The evaluation plan: which condition x seed runs exist, which still need computing, on which samples.

Finished runs are skipped and partial ones resumed; pending runs that give identical answers (one translator, an
unseeded condition) share one computation. Plain data, so resume and grouping are tested without models.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from activation_transfer.errors import UsageError
from activation_transfer.injection.conditions import (
    SOURCE_RELAY,
    SOURCE_SHUFFLED,
    ConditionSpec,
    Derangement,
    bucketed_derangement,
)
from activation_transfer.report.records import run_key

Run = tuple[ConditionSpec, int | None]


def plan_runs(specs: Sequence[ConditionSpec], seeds: Sequence[int]) -> list[Run]:
    """Deterministic conditions once with seed ``None``, then every other condition once per seed."""
    return [(s, None) for s in specs if s.deterministic] + [
        (s, seed) for s in specs if not s.deterministic for seed in seeds
    ]


def checkpoint_list(
    value: str | Sequence[str] | None,
    seeds: Sequence[int],
    specs: Sequence[ConditionSpec],
    kind: str = "aligned",
    option: str = "translator_ckpt",
) -> list[str]:
    """A translator option as a list (one checkpoint, or one per seed in the order of ``seeds``).

    Raises:
        ValueError: Another number of checkpoints than 1 or ``len(seeds)``, or none while a selected condition reads
            a translator of ``kind``.
    """
    ckpts = [value] if isinstance(value, str) else list(value or [])
    if len(ckpts) > 1 and len(ckpts) != len(seeds):
        raise UsageError(
            f"model.{option} lists {len(ckpts)} checkpoints for {len(seeds)} seeds; give one "
            "checkpoint, or one per seed in the order of model.seeds"
        )
    needing = [s.name for s in specs if s.translator_kind == kind]
    if not ckpts and needing:
        raise UsageError(f"conditions {', '.join(needing)} need a translator: set --model.{option}")
    return ckpts


def _no_partials(condition: str, seed: int | None) -> dict[str, dict]:
    return {}


@dataclass
class EvalPlan:
    """What an evaluation computes this time (see :meth:`build`).

    Args:
        seeds: The run seeds, in order (``seeds[i]`` uses translator ``i`` when there is one per seed).
        translator_count: Number of translator checkpoints (0, 1, or one per seed).
        runs: Every condition x seed of the configuration.
        pending: The runs without a finished records file.
        skipped: Keys of the runs whose records file exists.
        derangements: The shuffled-translation donor map of each seed a pending shuffled run uses.
        expected: Per pending run key, the sample ids its records file must hold (strict runs: real donors only).
        done: Per pending run key, the records already in its partial shards (sample id -> record).
        todo: Per pending run key, the sample ids still to generate.
        groups: Pending runs that share one computation, in run order.
        functional_count: Number of functional translator checkpoints (0, 1, or one per seed).
    """

    seeds: list[int]
    translator_count: int
    runs: list[Run]
    pending: list[Run]
    skipped: list[str]
    derangements: dict[int | None, Derangement] = field(default_factory=dict)
    expected: dict[str, set[str]] = field(default_factory=dict)
    done: dict[str, dict[str, dict]] = field(default_factory=dict)
    todo: dict[str, set[str]] = field(default_factory=dict)
    groups: list[list[Run]] = field(default_factory=list)
    functional_count: int = 0

    @classmethod
    def build(
        cls,
        specs: Sequence[ConditionSpec],
        seeds: Sequence[int],
        translator_count: int,
        prompt_len: Mapping[str, int],
        finished: Collection[str] = (),
        partials: Callable[[str, int | None], Mapping[str, dict]] = _no_partials,
        functional_count: int = 0,
    ) -> EvalPlan:
        """Plan the runs of ``specs`` x ``seeds`` over the samples of ``prompt_len``.

        Args:
            specs: The selected conditions.
            seeds: The run seeds.
            translator_count: Number of translator checkpoints (one shared, or one per seed).
            prompt_len: Receiver prompt length (tokens) of every sample, in dataset order; the shuffle buckets (the
                split protocol passes slot counts).
            finished: Keys of the runs whose records file exists (skipped).
            partials: ``(condition, seed) -> {sample_id: record}`` of an interrupted run's shards.
            functional_count: Number of functional translator checkpoints.
        """
        runs = plan_runs(specs, seeds)
        keys = [run_key(s.name, seed) for s, seed in runs]
        pending = [run for run, key in zip(runs, keys) if key not in finished]
        plan = cls(
            list(seeds),
            translator_count,
            runs,
            pending,
            skipped=[k for k in keys if k in finished],
            functional_count=functional_count,
        )
        ids = list(prompt_len)
        for s, seed in pending:
            if s.source == SOURCE_SHUFFLED and seed not in plan.derangements:
                plan.derangements[seed] = bucketed_derangement(ids, [prompt_len[i] for i in ids], seed)
        groups: dict[tuple, list[Run]] = {}
        for s, seed in pending:
            key = run_key(s.name, seed)
            plan.expected[key] = set(plan.derangements[seed].strict_ids()) if s.strict else set(ids)
            plan.done[key] = {k: v for k, v in partials(s.name, seed).items() if k in plan.expected[key]}
            plan.todo[key] = plan.expected[key] - set(plan.done[key])
            groups.setdefault(plan.compute_key(s, seed), []).append((s, seed))
        plan.groups = list(groups.values())
        return plan

    def translator_index(self, seed: int | None, kind: str = "aligned") -> int:
        """The translator of ``kind`` a seed uses: the only one, or ``seeds.index(seed)`` with one per seed."""
        count = self.functional_count if kind == "functional" else self.translator_count
        return 0 if count <= 1 else self.seeds.index(seed)

    def compute_key(self, spec: ConditionSpec, seed: int | None) -> tuple:
        """Runs with equal keys produce identical answers (condition, translator, and the seed only if seeded)."""
        kind = spec.translator_kind
        translator = (kind, self.translator_index(seed, kind)) if kind else None
        return spec.name, translator, seed if spec.seeded else None

    @property
    def needs_same_tokens(self) -> bool:
        """Whether a pending run uses sender states position by position (sender and receiver ids must agree)."""
        return any(s.needs_same_tokens for s, _ in self.pending)

    def prompt_kinds(self) -> list[str]:
        """Which prompts this invocation tokenizes: ``receiver`` always, ``sender`` (the same prompt) when a
        translator or a same-token check reads it, ``relay_sender`` when ``nl_relay`` has samples left."""
        kinds = ["receiver"]
        if self.translators_needed() or self.translators_needed("functional") or self.needs_same_tokens:
            kinds.append("sender")
        if any(s.source == SOURCE_RELAY and self.todo[run_key(s.name, sd)] for s, sd in self.pending):
            kinds.append("relay_sender")
        return kinds

    def translators_needed(self, kind: str = "aligned") -> list[int]:
        """Indices of the translators of ``kind`` that a pending run with samples left to generate uses."""
        return sorted(
            {
                self.translator_index(sd, kind)
                for s, sd in self.pending
                if s.translator_kind == kind and self.todo[run_key(s.name, sd)]
            }
        )

    def shuffle_diagnostics(self) -> dict[str, dict[str, object]]:
        """Per seed of a pending shuffled run: the samples alone in their length bucket (donor = themselves)."""
        d = self.derangements
        return {
            "shuffle_self_fallback_count": {str(k): len(v.self_fallback) for k, v in d.items()},
            "shuffle_self_fallback_ids": {str(k): list(v.self_fallback) for k, v in d.items()},
        }

    def rows_to_generate(self, group: Sequence[Run], sample_ids: Sequence[str]) -> list[int]:
        """Positions in ``sample_ids`` that some run of ``group`` still needs."""
        keys = [run_key(s.name, seed) for s, seed in group]
        return [i for i, sid in enumerate(sample_ids) if any(sid in self.todo[k] for k in keys)]

    def merge(self, key: str, new_records: Iterable[dict]) -> list[dict]:
        """A pending run's complete records, sorted by sample id: its partial shards plus the new records.

        The first record of a sample wins: ``DistributedSampler`` pads the last batches with duplicates.

        Raises:
            RuntimeError: When an expected sample has no record.
        """
        merged = dict(self.done[key])
        for rec in new_records:
            merged.setdefault(rec["sample_id"], rec)
        missing = self.expected[key] - set(merged)
        if missing:
            raise RuntimeError(f"{key}: {len(missing)} sample(s) were never evaluated, e.g. {sorted(missing)[:3]}")
        return [merged[k] for k in sorted(self.expected[key])]
