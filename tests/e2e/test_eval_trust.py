"""Evaluation results that can be trusted: one configuration per run folder, no silent NaN, torn shards repaired,
truncated prompts reported. Tiny offline models through ``trainer.test``."""

from __future__ import annotations

import json
import logging
import math

import pytest
import pytorch_lightning as pl
import torch
from test_injection_eval import RECEIVER, make_ckpt, run_eval

from activation_transfer.injection.conditions import build_conditions
from activation_transfer.injection.sources import condition_source
from activation_transfer.models.frozen_lm import load_ref
from activation_transfer.report import records as rio
from activation_transfer.report import run_report
from activation_transfer.report.load import load_records
from activation_transfer.report.subgroups import read_records as subgroup_records
from activation_transfer.translators.loading import load_translator
from datamodules.multihop_qa import MultiHopQADataModule


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "translator.ckpt")


def record(sid, **extra):
    rec = {
        "sample_id": sid,
        "condition": "no_inject",
        "seed": None,
        "gold": "B",
        "prediction": "B",
        "hops": 2,
        "metrics": {"exact_match": True},
        "diagnostics": {"receiver_norm_mean": 1.0},
    }
    rec["diagnostics"].update(extra)
    return rec


class _Crash(Exception):
    pass


class _Interrupt(pl.Callback):
    """Stop the run after its first batch, as a crash would: the partial shard holds that batch."""

    def on_test_batch_end(self, trainer, pl_module, *args, **kwargs):
        raise _Crash


# ------------------------------------------------------------------------------------ item 2: run folder identity


def test_rerun_with_another_alpha_under_the_same_run_name_is_refused(tmp_path, ckpt):
    with pytest.raises(_Crash):
        run_eval(
            tmp_path,
            ckpt,
            batch_size=4,
            conditions=["best_alpha"],
            seeds=[42],
            alpha=0.3,
            run_name="r",
            callbacks=[_Interrupt()],
        )
    with pytest.raises(
        ValueError,
        match=r"run folder .*r holds results of another configuration .*fingerprint.json.*"
        r"alpha: 0.3 there, 0.9 now.*--model.run_name",
    ):
        run_eval(tmp_path, ckpt, batch_size=4, conditions=["best_alpha"], seeds=[42], alpha=0.9, run_name="r")
    assert json.loads((tmp_path / "r" / "fingerprint.json").read_text())["identity"]["alpha"] == 0.3
    # the same configuration resumes the interrupted run
    module = run_eval(tmp_path, ckpt, batch_size=4, conditions=["best_alpha"], seeds=[42], alpha=0.3, run_name="r")
    assert len(module.results["best_alpha__seed42"]) == 8


def test_precision_is_part_of_the_fingerprint(tmp_path, ckpt):
    fp32 = run_eval(tmp_path, ckpt, conditions=["no_inject"], seeds=[], trainer_kw={"precision": "32-true"})
    bf16 = run_eval(tmp_path, ckpt, conditions=["no_inject"], seeds=[], trainer_kw={"precision": "bf16-mixed"})
    assert (fp32.run_identity["precision"], bf16.run_identity["precision"]) == ("32-true", "bf16-mixed")
    assert fp32.run_identity["device_type"] == "cpu" and fp32.run_identity["libraries"]["torch"] == torch.__version__
    assert fp32.fingerprint != bf16.fingerprint and fp32.run_dir != bf16.run_dir
    with pytest.raises(ValueError, match='precision: "32-true" there, "bf16-mixed" now'):
        run_eval(
            tmp_path,
            ckpt,
            conditions=["no_inject"],
            seeds=[],
            run_name=fp32.run_dir.name,
            trainer_kw={"precision": "bf16-mixed"},
        )


def test_two_invocations_leave_two_history_entries(tmp_path, ckpt):
    run_eval(tmp_path, ckpt, conditions=["no_inject", "additive"], seeds=[42])
    second = run_eval(tmp_path, ckpt, conditions=["no_inject", "additive", "shuffled_translation"], seeds=[42])
    meta = json.loads((second.run_dir / "meta.json").read_text())
    first_run, second_run = meta["invocations"]
    assert first_run["computed"] == ["additive__seed42", "no_inject__deterministic"]
    assert first_run["skipped_existing"] == [] and first_run["device"] == "cpu"
    assert second_run["computed"] == ["shuffled_translation__seed42"]
    assert second_run["skipped_existing"] == ["additive__seed42", "no_inject__deterministic"]
    assert set(first_run["run_seconds"]) == {"additive__seed42", "no_inject__deterministic"}
    assert first_run["started_at"] <= second_run["started_at"]
    assert "42" in meta["diagnostics"]["shuffle_self_fallback_count"] and meta["fingerprint"] == second.fingerprint


def test_folder_with_results_but_no_fingerprint_is_refused(tmp_path):
    (tmp_path / "records").mkdir()
    with pytest.raises(ValueError, match="holds results but no fingerprint.json"):
        rio.bind_run_dir(tmp_path, {"alpha": 0.3}, "ab" * 32)


# ------------------------------------------------------------------------------------ item 3: non-finite values


def test_checkpoint_with_a_nan_weight_is_refused_naming_the_file(tmp_path, ckpt):
    data = torch.load(ckpt, weights_only=True)
    name = next(iter(data["state_dict"]))
    data["state_dict"][name].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(data, bad)
    with pytest.raises(ValueError, match=f"translator checkpoint {bad} holds NaN or infinite weights .*{name}"):
        load_translator(bad)
    with pytest.raises(ValueError, match=f"{bad} holds NaN"):
        run_eval(tmp_path, str(bad), conditions=["additive"], seeds=[42])


class _NaNReceiverWeight(pl.Callback):
    def on_test_start(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.receiver_model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] = float("nan")


def test_receiver_going_non_finite_fails_naming_condition_and_sample(tmp_path, ckpt):
    first = MultiHopQADataModule(source="synthetic", num_samples=8)
    first.setup("test")
    with pytest.raises(
        FloatingPointError,
        match=f"condition no_inject: the receiver's block output .*NaN or infinite .*{first.samples[0].sample_id}",
    ):
        run_eval(tmp_path, ckpt, conditions=["no_inject"], seeds=[], callbacks=[_NaNReceiverWeight()])
    assert not list(tmp_path.glob("*/records/*.jsonl")) and not list(tmp_path.glob("*/partial/*/*.jsonl"))


def test_non_finite_translated_states_fail_naming_condition_and_donor():
    receiver = load_ref(RECEIVER)
    (spec,) = build_conditions(["replace"], 0.01, 0.3)
    ids, mask = torch.ones((2, 3), dtype=torch.long), torch.ones((2, 3), dtype=torch.long)
    translated = {"a": torch.zeros(3, 48), "b": torch.full((3, 48), float("inf"))}
    with pytest.raises(FloatingPointError, match="condition replace: the translated states .* 1 sample.*e.g. b;"):
        condition_source(spec, 42, ["a", "b"], ids, mask, receiver, translated)


def test_writing_a_record_with_nan_raises_and_leaves_the_files(tmp_path):
    good, bad = record("s1"), record("s2", receiver_norm_mean=math.nan)
    with pytest.raises(ValueError, match="sample 's2', condition 'no_inject' holds a NaN or infinity"):
        rio.write_records(tmp_path / "r.jsonl", [good, bad])
    assert not (tmp_path / "r.jsonl").exists()
    rio.append_partial(tmp_path, "no_inject", None, 0, [good])
    with pytest.raises(ValueError, match="sample 's2'"):
        rio.append_partial(tmp_path, "no_inject", None, 0, [bad])
    assert rio.read_partial(tmp_path, "no_inject", None) == {"s1": good}


# ------------------------------------------------------------------------------------ item 6: torn shard lines


def torn_shard(run_dir, condition, seed, records):
    shard = rio.partial_dir(run_dir, condition, seed) / "rank0.jsonl"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_text(rio.records_text(records) + rio.records_text([record("torn")])[:40])
    return shard


def test_append_after_a_torn_line_keeps_the_shard_readable(tmp_path):
    shard = torn_shard(tmp_path, "no_inject", None, [record("s1"), record("s2")])
    rio.append_partial(tmp_path, "no_inject", None, 0, [record("s3")])
    assert [r["sample_id"] for r in rio.read_records(shard)] == ["s1", "s2", "s3"]
    only_torn = torn_shard(tmp_path, "other", None, [])
    rio.append_partial(tmp_path, "other", None, 0, [record("s4")])
    assert [r["sample_id"] for r in rio.read_records(only_torn)] == ["s4"]


def test_resume_after_a_torn_line_and_a_second_interruption_finishes(tmp_path, ckpt):
    conds = ["no_inject", "same_norm_random"]
    first = run_eval(tmp_path, ckpt, conditions=conds, seeds=[42])
    target = rio.records_path(first.run_dir, "same_norm_random", 42)
    old = target.read_text()
    target.unlink()
    recs = [json.loads(line) for line in old.splitlines()]
    torn_shard(first.run_dir, "same_norm_random", 42, recs[:3])  # first crash: torn mid-append
    rio.append_partial(first.run_dir, "same_norm_random", 42, 0, recs[3:5])  # a second invocation, crashed again
    second = run_eval(tmp_path, ckpt, conditions=conds, seeds=[42])
    assert second.run_dir == first.run_dir and target.read_text() == old


def test_resume_after_a_line_torn_inside_a_multibyte_character_finishes(tmp_path, ckpt):
    conds = ["no_inject", "same_norm_random"]
    first = run_eval(tmp_path, ckpt, conditions=conds, seeds=[42])
    target = rio.records_path(first.run_dir, "same_norm_random", 42)
    old = target.read_text()
    target.unlink()
    recs = [json.loads(line) for line in old.splitlines()]
    shard = rio.partial_dir(first.run_dir, "same_norm_random", 42) / "rank0.jsonl"
    shard.parent.mkdir(parents=True)
    # records are written with ensure_ascii=False: a crash can cut the last line between the bytes of one character
    torn = rio.records_text([{**recs[3], "prediction": "\u00e9" * 20}]).encode()
    cut = torn.index("\u00e9".encode()) + 1
    shard.write_bytes(rio.records_text(recs[:3]).encode() + torn[:cut])
    second = run_eval(tmp_path, ckpt, conditions=conds, seeds=[42])
    assert second.run_dir == first.run_dir and target.read_text() == old


def test_a_gold_answer_with_a_unicode_line_separator_reads_back(tmp_path, ckpt):
    # U+2028 and U+0085 are left as they are by json.dumps(ensure_ascii=False) but are line breaks to str.splitlines
    rows = [
        {"id": f"q{i}", "context": f"A{i} is in B{i}.", "question": f"Where is A{i}?", "answer": f"B{i}"}
        for i in range(3)
    ] + [{"id": "sep", "context": "A is in Saint Louis.", "question": "Where is A?", "answer": "St\u2028\u0085Louis"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = lambda: MultiHopQADataModule(source=str(path), batch_size=4)  # noqa: E731 (one per trainer.test)
    first = run_eval(tmp_path, ckpt, conditions=["no_inject"], seeds=[], dm=dm())
    again = run_eval(tmp_path, ckpt, conditions=["no_inject"], seeds=[], dm=dm())  # rerun of a finished run
    assert again.run_dir == first.run_dir and again.results == first.results
    assert {r["sample_id"]: r["gold"] for r in again.results["no_inject__deterministic"]}["sep"] == rows[3]["answer"]
    assert len(load_records([first.run_dir])) == 4  # report.py's reader
    assert len(subgroup_records([first.run_dir])) == 4  # the split report's subgroups.json reader


def test_report_names_the_unfinished_runs_of_a_first_invocation_killed_while_writing(tmp_path, ckpt, monkeypatch):
    # Killed between two records files at the end of its first invocation: no meta.json or config.yaml yet
    real, written = rio.write_records, []

    def crash_on_second(path, records):
        if written:
            raise _Crash
        written.append(path)
        return real(path, records)

    monkeypatch.setattr(rio, "write_records", crash_on_second)
    with pytest.raises(_Crash):
        run_eval(tmp_path, ckpt, conditions=["no_inject", "additive"], seeds=[42], run_name="r")
    monkeypatch.undo()
    run = tmp_path / "r"
    assert [p.stem for p in written] == ["no_inject__deterministic"] and not (run / "meta.json").exists()
    res = run_report([run], tmp_path / "report", resamples=20, permutations=20)
    assert set(res.summary["conditions"]) == {"no_inject"}
    assert any(f"{run}: unfinished run(s) additive__seed42 (partial/" in n for n in res.notes), res.notes


# ------------------------------------------------------------------------------------ item 9b: truncated prompts


def test_a_huge_context_warns_once_and_is_recorded(tmp_path, ckpt, caplog):
    rows = [
        {"id": f"q{i}", "context": f"A{i} is in B{i}.", "question": f"Where is A{i}?", "answer": f"B{i}"}
        for i in range(3)
    ] + [{"id": "huge", "context": "filler words " * 3000, "question": "Where?", "answer": "B"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = MultiHopQADataModule(source=str(path), batch_size=4)
    with caplog.at_level(logging.WARNING, logger="lightning_modules.injection_eval"):
        module = run_eval(tmp_path, ckpt, conditions=["no_inject", "replace"], seeds=[42], dm=dm, max_prompt_tokens=64)
    warnings = [r.getMessage() for r in caplog.records if r.name == "lightning_modules.injection_eval"]
    assert len(warnings) == 1
    assert "1 of 4 prompts" in warnings[0] and "huge" in warnings[0]
    assert "--model.generation.max_prompt_tokens" in warnings[0]
    truncated = json.loads((module.run_dir / "meta.json").read_text())["truncated_prompts"]
    assert truncated["max_prompt_tokens"] == 64
    assert truncated["receiver"] == truncated["sender"] == {"count": 1, "ids": ["huge"]}
