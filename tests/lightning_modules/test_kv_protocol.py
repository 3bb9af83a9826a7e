"""The KV protocol (``--model.protocol kv``) through ``trainer.test`` on tiny offline models: every condition's
records with their cost, kv_self answering as the skyline, shuffled donors, seeded norm-matched random entries and
the projector checks."""

from __future__ import annotations

import json

import pytest
import torch
from lightning_helpers import quiet_trainer
from test_injection_eval import RECEIVER, SENDER, N, preds, run_eval
from test_kv_translator import make_kv_ckpt
from test_translator_loading import make_functional_ckpt

from activation_transfer.injection.eval_plan import EvalPlan
from activation_transfer.injection.protocols import protocol_for
from activation_transfer.injection.protocols.kv import CONDITION_NAMES as KV_CONDITION_NAMES
from activation_transfer.injection.slots import SlotSpec, encode_parts
from activation_transfer.models.frozen_lm import load_ref
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.report import records as rio
from activation_transfer.task.entities import candidates
from activation_transfer.task.prompts import tokenize_left_padded
from activation_transfer.translators.loading import load_translator
from datamodules.multihop_qa import MultiHopQADataModule
from lightning_modules.injection_eval import InjectionEvalModule

SEEDS = [42, 123]
NO_PENALTY = GenerationSettings(max_new_tokens=6, repetition_penalty=1.0, no_repeat_ngram_size=0)


@pytest.fixture(scope="module")
def kv_ckpt(tmp_path_factory):
    return make_kv_ckpt(tmp_path_factory.mktemp("kv") / "kv.ckpt", seed=3)


@pytest.fixture(scope="module")
def kv_run(tmp_path_factory, kv_ckpt):
    return run_eval(
        tmp_path_factory.mktemp("kvrun"),
        None,
        conditions=KV_CONDITION_NAMES,
        seeds=SEEDS,
        protocol="kv",
        functional_translator_ckpt=kv_ckpt,
    )


def _records(module, condition, seed=None):
    return {r["sample_id"]: r for r in module.results[rio.run_key(condition, seed)]}


def test_every_kv_condition_is_written_with_its_cost(kv_run):
    module = kv_run
    deterministic = {"receiver_alone", "skyline", "kv_self", "kv_zero"}
    expected = {f"{c}__deterministic" for c in deterministic} | {
        f"{c}__seed{s}" for c in KV_CONDITION_NAMES if c not in deterministic for s in SEEDS
    }
    assert {p.stem for p in (module.run_dir / "records").glob("*.jsonl")} == expected
    receiver = load_ref(RECEIVER)
    sender = load_ref(SENDER)
    for key in expected:
        recs = rio.read_records(module.run_dir / "records" / f"{key}.jsonl")
        assert len(recs) == N and all(list(r) == list(rio.RECORD_FIELDS) for r in recs)
        condition = recs[0]["condition"]
        for r in recs:
            d = r["diagnostics"]
            if not condition.startswith("kv_"):
                assert d["bytes_sent"] == 0  # receiver_alone and skyline: nothing crosses
                continue
            s = module.samples_by_id[r["sample_id"]]
            tok = (receiver if condition == "kv_self" else sender).tokenizer
            owner = module.samples_by_id[d.get("donor_id", r["sample_id"])]
            (ctx,), _ = encode_parts(tok, [owner.context], [s.question], 224, 256)
            assert d["prefix_len"] == len(ctx) and d["kv_layers"] == 4
            assert d["bytes_sent"] == len(ctx) * 4 * 2 * 48 * 4  # entries x layers x (K, V) x hidden x fp32
    sha = load_translator(module.functional_info[0]["path"]).sha256
    for c in ("kv_functional", "kv_shuffled_functional", "kv_random_functional"):
        assert all(r["diagnostics"]["translator_sha256"] == sha for r in _records(module, c, 42).values())
    meta = json.loads((module.run_dir / "meta.json").read_text())
    assert meta["protocol"] == "kv" and meta["layers"] is None and meta["max_context_tokens"] == 224
    # The module's random_draw is "sequential" (the paper's), but the KV controls draw per sample: meta says so.
    assert module.random_draw == "sequential" and "always draws per sample" in meta["random_vectors"]
    assert {c["baseline"] for c in module.report_result.comparisons} == {"receiver_alone", "skyline"}


def test_every_kv_condition_carries_the_subgroup_fields_on_counterfactual_data(tmp_path, kv_ckpt):
    # The prefix conditions built their own diagnostics and left out candidates and gold_original: the report then
    # dropped every kv condition from the by-candidates table and the "follows the new context" rates.
    dm = MultiHopQADataModule(num_samples=6, counterfactual=True, batch_size=6)
    conditions = ["receiver_alone", "kv_self", "kv_zero", "kv_functional"]
    module = run_eval(
        tmp_path, None, conditions=conditions, seeds=[42], protocol="kv", functional_translator_ckpt=kv_ckpt, dm=dm
    )
    by_id = {s.sample_id: s for s in dm.samples}
    for key, records in module.results.items():
        assert len(records) == 6, key
        for r in records:
            s = by_id[r["sample_id"]]
            assert r["diagnostics"]["gold_original"] == s.gold_original != r["gold"], key
            assert r["diagnostics"]["candidates"] == candidates(s.context, s.answer), key
    assert {k.split("__")[0] for k in module.results} == set(conditions)


def test_kv_zero_entries_are_zero_and_kv_functional_ones_are_not(kv_run):
    zero = _records(kv_run, "kv_zero")
    functional = _records(kv_run, "kv_functional", 42)
    assert all(r["diagnostics"]["key_norm_mean"] == r["diagnostics"]["value_norm_mean"] == 0 for r in zero.values())
    assert all(r["diagnostics"]["key_norm_mean"] > 0 for r in functional.values())


def test_shuffled_donors_never_map_a_question_to_itself(kv_run):
    functional = _records(kv_run, "kv_functional", 42)
    for seed in SEEDS:
        shuffled = _records(kv_run, "kv_shuffled_functional", seed)
        donors = {sid: r["diagnostics"]["donor_id"] for sid, r in shuffled.items()}
        assert all(d != sid for sid, d in donors.items()) and sorted(donors.values()) == sorted(donors)
        assert donors == kv_run.plan.derangements[seed].donors
        for sid, r in shuffled.items():  # the prefix is the donor's projected context
            got, own = r["diagnostics"], functional[donors[sid]]["diagnostics"]
            assert got["key_norm_mean"] == pytest.approx(own["key_norm_mean"], rel=1e-5)
    assert json.loads((kv_run.run_dir / "meta.json").read_text())["diagnostics"]["shuffle_self_fallback_count"] == {
        str(s): 0 for s in SEEDS
    }


def test_random_entries_are_seeded_and_norm_matched_per_layer_and_head(kv_run):
    protocol = kv_run.protocol
    ids = sorted(kv_run.samples_by_id)[:3]
    projector = protocol.projectors[("functional", 0)]
    keys, values, mask = protocol.project(projector, ids)
    a = protocol.random_like(keys, values, mask, 42, ids)
    b = protocol.random_like(keys, values, mask, 42, ids)
    c = protocol.random_like(keys, values, mask, 123, ids)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    real = mask.bool()[None, :, None, :].expand(keys.shape[:-1])
    for rand, proj in zip(a, (keys, values)):
        torch.testing.assert_close(rand.norm(dim=-1)[real], proj.norm(dim=-1)[real])
        assert not torch.allclose(rand[real], proj[real])
    # One sample's draw does not depend on the batch it is drawn in.
    alone = protocol.random_like(*protocol.project(projector, ids[1:2]), 42, ids[1:2])
    n = int(mask[1].sum())
    torch.testing.assert_close(alone[0][:, 0, :, -n:], a[0][:, 1, :, -n:])
    for seed in SEEDS:
        recs, functional = _records(kv_run, "kv_random_functional", seed), _records(kv_run, "kv_functional", 42)
        for sid, r in recs.items():
            assert r["diagnostics"]["value_norm_mean"] == pytest.approx(
                functional[sid]["diagnostics"]["value_norm_mean"], rel=1e-5
            )


def test_kv_self_answers_equal_the_skyline_in_fp32_without_penalties(tmp_path):
    dm = MultiHopQADataModule(source="synthetic", num_samples=16, batch_size=5)  # several unequal batches
    module = InjectionEvalModule(
        SENDER, RECEIVER, conditions=["skyline", "kv_self"], seeds=[], generation=NO_PENALTY, protocol="kv"
    )
    trainer = quiet_trainer(tmp_path)
    trainer.test(module, datamodule=dm, verbose=False)
    got = preds(module)
    assert len(got["kv_self__deterministic"]) == 16
    assert got["kv_self__deterministic"] == got["skyline__deterministic"]
    assert len(set(got["skyline__deterministic"].values())) > 1  # the answers are not all alike
    # The comparison is meaningful: the receiver's context + question parts are the skyline's prompt tokens.
    tok = load_ref(RECEIVER).tokenizer
    for s in module.samples_by_id.values():
        (ctx,), (qst,) = encode_parts(tok, [s.context], [s.question], 224, 256)
        full = tokenize_left_padded(tok, [s.prompt], 256)["input_ids"][0].tolist()
        assert ctx + qst == full


def test_projector_and_protocol_must_agree(tmp_path, kv_ckpt):
    split_functional = make_functional_ckpt(tmp_path / "functional.ckpt")
    with pytest.raises(ValueError, match="was trained as functional, but .* takes kv translators"):
        run_eval(
            tmp_path / "a",
            None,
            conditions=["kv_functional"],
            protocol="kv",
            functional_translator_ckpt=split_functional,
        )
    with pytest.raises(ValueError, match="was trained as kv, but --model.functional_translator_ckpt takes functional"):
        run_eval(
            tmp_path / "b", None, conditions=["slots_functional"], protocol="split", functional_translator_ckpt=kv_ckpt
        )
    # A projector for other layers than the evaluation's prefix layers is refused before any answer.
    protocol = protocol_for("kv", slots=SlotSpec(), layers=[0, 1])
    samples = MultiHopQADataModule(source="synthetic", num_samples=4).load_samples()
    buckets = protocol.start(load_ref(SENDER), load_ref(RECEIVER), NO_PENALTY, samples)
    assert protocol.layers == [0, 1] and protocol.translator_slots() == {"layers": [0, 1]}
    plan = EvalPlan.build(protocol.conditions(["kv_functional"], 0.01, 0.3), [42], 0, buckets, functional_count=1)
    with pytest.raises(ValueError, match=r"writes receiver layers \[0, 1, 2, 3\], the evaluation's prefix layers"):
        protocol.prepare(plan, {"aligned": [], "functional": [load_translator(kv_ckpt)]}, {"functional": ["x"]}, 4)


def test_a_layer_subset_reaches_the_records_and_must_match_the_projector(tmp_path, kv_ckpt):
    subset_ckpt = make_kv_ckpt(tmp_path / "subset.ckpt", layers=[0, -1])
    module = run_eval(
        tmp_path / "run",
        None,
        conditions=["kv_self", "kv_functional"],
        seeds=[42],
        protocol="kv",
        kv_layers=[0, -1],
        functional_translator_ckpt=subset_ckpt,
        report=False,
    )
    assert module.protocol.layers == [0, 3] and module.run_identity["layers"] == [0, -1]
    for c, seed in (("kv_self", None), ("kv_functional", 42)):
        for r in _records(module, c, seed).values():
            d = r["diagnostics"]
            assert d["kv_layers"] == 2 and d["bytes_sent"] == d["prefix_len"] * 2 * 2 * 48 * 4
    # The answers change with the subset (two layers of zeros instead of the receiver's own entries).
    full = run_eval(tmp_path / "full", None, conditions=["kv_self"], protocol="kv", report=False)
    assert preds(full)["kv_self__deterministic"] != preds(module)["kv_self__deterministic"]
    with pytest.raises(
        ValueError, match=r"slots: trained with \{'layers': None\}, evaluated with \{'layers': \[0, -1\]\}"
    ):
        run_eval(
            tmp_path / "bad",
            None,
            conditions=["kv_functional"],
            protocol="kv",
            kv_layers=[0, -1],
            functional_translator_ckpt=kv_ckpt,
        )
