"""EvalPlan without models: which runs are skipped, resumed, grouped, and what a finished run must hold."""

from __future__ import annotations

import pytest

from activation_transfer.injection.conditions import build_conditions
from activation_transfer.injection.eval_plan import EvalPlan, plan_runs
from activation_transfer.report.records import run_key

# s4 is alone in its length bucket: the shuffle maps it to itself, the strict control drops it.
LENGTHS = {"s1": 5, "s2": 5, "s3": 5, "s4": 9}
ALL = ["no_inject", "additive", "same_norm_random", "shuffled_translation", "shuffled_translation_strict_matched"]


def build(names=ALL, seeds=(42, 123), translators=1, **kw):
    return EvalPlan.build(build_conditions(names), list(seeds), translators, LENGTHS, **kw)


def keys(runs):
    return [run_key(s.name, seed) for s, seed in runs]


def test_runs_deterministic_once_then_per_seed():
    runs = plan_runs(build_conditions(["additive", "no_inject"]), [42, 123])
    assert keys(runs) == ["no_inject__deterministic", "additive__seed42", "additive__seed123"]


def test_finished_runs_are_skipped_and_not_pending():
    plan = build(finished={"no_inject__deterministic", "additive__seed42"})
    assert sorted(plan.skipped) == ["additive__seed42", "no_inject__deterministic"]
    assert "additive__seed42" not in keys(plan.pending) and "additive__seed123" in keys(plan.pending)
    assert set(plan.todo) == set(keys(plan.pending)) == set(plan.expected)


def test_strict_runs_expect_only_samples_with_a_real_donor():
    plan = build()
    assert plan.expected["shuffled_translation__seed42"] == set(LENGTHS)
    assert plan.expected["shuffled_translation_strict_matched__seed42"] == {"s1", "s2", "s3"}
    assert plan.shuffle_diagnostics()["shuffle_self_fallback_ids"] == {"42": ["s4"], "123": ["s4"]}
    donors = plan.derangements[42].donors
    assert all(donors[s] != s and LENGTHS[donors[s]] == LENGTHS[s] for s in ("s1", "s2", "s3"))


def test_derangements_only_for_pending_shuffled_seeds():
    plan = build(finished={"shuffled_translation__seed42", "shuffled_translation_strict_matched__seed42"})
    assert set(plan.derangements) == {123}
    assert set(build(["no_inject", "additive"]).derangements) == set()


def test_partial_shards_are_done_and_leave_the_rest_to_do():
    shards = {("same_norm_random", 42): {"s1": {"sample_id": "s1"}, "gone": {"sample_id": "gone"}}}
    plan = build(partials=lambda c, seed: shards.get((c, seed), {}))
    assert set(plan.done["same_norm_random__seed42"]) == {"s1"}  # a sample no longer in the data is dropped
    assert plan.todo["same_norm_random__seed42"] == {"s2", "s3", "s4"}
    assert plan.todo["same_norm_random__seed123"] == set(LENGTHS)


def test_one_translator_groups_the_unseeded_translator_runs_across_seeds():
    plan = build()
    groups = {tuple(keys(g)) for g in plan.groups}
    assert ("additive__seed42", "additive__seed123") in groups
    assert ("same_norm_random__seed42",) in groups and ("same_norm_random__seed123",) in groups
    assert sum(len(g) for g in plan.groups) == len(plan.pending)


def test_one_translator_per_seed_never_groups_across_seeds():
    plan = build(translators=2)
    assert all(len(g) == 1 for g in plan.groups)
    assert [plan.translator_index(s) for s in (42, 123)] == [0, 1]
    assert plan.translators_needed() == [0, 1]


def test_translators_needed_ignores_runs_with_nothing_left():
    everything = {"additive__seed42": {sid: {} for sid in LENGTHS}}
    plan = build(["additive"], seeds=[42], partials=lambda c, seed: everything.get(run_key(c, seed), {}))
    assert plan.todo["additive__seed42"] == set() and plan.translators_needed() == []
    assert plan.rows_to_generate(plan.groups[0], list(LENGTHS)) == []


def test_rows_to_generate_are_the_positions_some_run_of_the_group_needs():
    plan = build(["shuffled_translation_strict_matched"], seeds=[42])
    assert plan.rows_to_generate(plan.groups[0], ["s4", "s2", "s1"]) == [1, 2]


def test_merge_keeps_the_first_record_sorts_and_checks_completeness():
    shards = {"s2": {"sample_id": "s2", "from": "shard"}}
    plan = build(["no_inject"], partials=lambda c, seed: shards)
    new = [{"sample_id": s, "from": "new"} for s in ("s4", "s1", "s3", "s1")]
    merged = plan.merge("no_inject__deterministic", new)
    assert [r["sample_id"] for r in merged] == ["s1", "s2", "s3", "s4"]
    assert merged[1]["from"] == "shard"
    with pytest.raises(RuntimeError, match="1 sample.*never evaluated.*s3"):
        plan.merge("no_inject__deterministic", new[:2])


def test_needs_same_tokens_only_for_positionwise_translator_runs():
    assert not build(["no_inject", "additive"]).needs_same_tokens
    assert build(["shuffled_translation"]).needs_same_tokens
    finished = {"shuffled_translation__seed42", "shuffled_translation__seed123"}
    assert not build(["shuffled_translation"], finished=finished).needs_same_tokens


def test_prompt_kinds_name_the_tokenizers_that_read_a_prompt_this_time():
    assert build(["no_inject"]).prompt_kinds() == ["receiver"]
    assert build(["no_inject", "additive", "nl_relay"]).prompt_kinds() == ["receiver", "sender", "relay_sender"]
    done = {"nl_relay__deterministic", "additive__seed42", "additive__seed123"}
    assert build(["no_inject", "additive", "nl_relay"], finished=done).prompt_kinds() == ["receiver"]
