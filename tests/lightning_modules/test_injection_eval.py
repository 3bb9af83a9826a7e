"""InjectionEvalModule through ``trainer.test`` on tiny offline models: records, invariants, resume, bad input."""

from __future__ import annotations

import json
import time

import pytest
import pytorch_lightning as pl
import torch
from lightning_helpers import quiet_trainer, save_weights

import activation_transfer.injection.answering as answering
from activation_transfer.models.frozen_lm import ModelRef, load_ref
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.models.hooks import capture_hidden
from activation_transfer.report import records as rio
from activation_transfer.translators.loading import load_translator
from datamodules.multihop_qa import MultiHopQADataModule
from lightning_modules.injection_eval import InjectionEvalModule
from lightning_modules.translator import TranslatorModule

SENDER = ModelRef("tiny-neox", layer=0.67)
RECEIVER = ModelRef("tiny-neox-large", layer=0.67)
CONDS = [
    "no_inject",
    "nl_relay",
    "additive",
    "replace",
    "b_to_b_self_inject",
    "same_norm_random",
    "shuffled_translation",
    "shuffled_translation_strict_matched",
    "zero_replacement",
]
N = 8


def make_ckpt(path, sender=SENDER, receiver=RECEIVER, seed=0):
    s, r = load_ref(sender), load_ref(receiver)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = TranslatorModule(
            s.identity()["hidden_size"], r.identity()["hidden_size"], sender=s.identity(), receiver=r.identity()
        )
    return save_weights(module, path)


def run_eval(
    tmp, ckpt, batch_size=8, conditions=CONDS, callbacks=(), max_prompt_tokens=256, dm=None, trainer_kw=None, **kw
):
    kw.setdefault("seeds", [42, 123])
    generation = GenerationSettings(max_new_tokens=4, relay_max_new_tokens=6, max_prompt_tokens=max_prompt_tokens)
    module = InjectionEvalModule(
        SENDER,
        RECEIVER,
        translator_ckpt=ckpt,
        conditions=list(conditions),
        generation=generation,
        report_resamples=50,
        **kw,
    )
    dm = dm or MultiHopQADataModule(source="synthetic", num_samples=N, batch_size=batch_size)
    trainer = quiet_trainer(tmp, callbacks=list(callbacks), **(trainer_kw or {}))
    trainer.test(module, datamodule=dm, verbose=False)
    return module


def preds(module):
    return {k: {r["sample_id"]: r["prediction"] for r in v} for k, v in module.results.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "translator.ckpt")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, ckpt):
    return run_eval(tmp_path_factory.mktemp("eval"), ckpt)


def test_writes_every_condition_and_seed_with_the_fixed_schema(full_run):
    run_dir = full_run.run_dir
    expected = {
        "no_inject__deterministic",
        "nl_relay__deterministic",
        "b_to_b_self_inject__deterministic",
        "zero_replacement__deterministic",
    } | {f"{c}__seed{s}" for c in CONDS[2:] if c not in ("b_to_b_self_inject", "zero_replacement") for s in (42, 123)}
    assert {p.stem for p in (run_dir / "records").glob("*.jsonl")} == expected
    for key in expected:
        recs = rio.read_records(run_dir / "records" / f"{key}.jsonl")
        cond = key.split("__")[0]
        seed = None if key.endswith("deterministic") else int(key.split("seed")[1])
        assert all(r["condition"] == cond and r["seed"] == seed for r in recs)
        assert all(
            set(r["diagnostics"]) >= {"prompt_len", "translated_norm_mean", "receiver_norm_mean", "injected_norm_mean"}
            for r in recs
        )
        if not cond.endswith("strict_matched"):
            assert len(recs) == N and len({r["sample_id"] for r in recs}) == N
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["models"]["receiver"]["layer"] == "gpt_neox.layers.2"
    assert len(meta["translators"][0]["sha256"]) == 64 and meta["dataset"]["samples_sha256"]
    (invocation,) = meta["invocations"]
    assert invocation["libraries"]["torch"] and invocation["elapsed_seconds"] > 0 and invocation["device"] == "cpu"
    assert (run_dir / "report" / "summary.json").exists()
    assert not (run_dir / "partial").exists()
    # The logged accuracy of a seeded condition: the mean over its seeds of each run's share of correct records.
    runs = [full_run.results[f"additive__seed{s}"] for s in (42, 123)]
    by_hand = sum(sum(r["metrics"]["word_boundary_contains"] for r in recs) / len(recs) for recs in runs) / 2
    assert full_run.summary_metrics["eval/word_boundary_contains/condition=additive"] == pytest.approx(by_hand)


def test_self_inject_answers_equal_no_inject_on_every_sample(full_run):
    p = preds(full_run)
    assert p["b_to_b_self_inject__deterministic"] == p["no_inject__deterministic"]
    assert any(p["no_inject__deterministic"].values())


def test_additive_diagnostics_and_seed_semantics(full_run, ckpt):
    # Expected norms from a second path: the checkpoint loaded by hand, the sender run on each prompt alone
    # (unpadded), the translator applied to its last position: the paper's additive injects 0.01 * T[last].
    sender, translator = load_ref(SENDER), load_translator(ckpt)
    recs = {r["sample_id"]: r for r in full_run.results["additive__seed42"]}
    assert len(recs) == N
    for sid, r in recs.items():
        ids = sender.tokenizer(full_run.samples_by_id[sid].prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            last = translator.translate(capture_hidden(sender.model, sender.layer.path, ids))[0, -1]
        assert r["diagnostics"]["translated_norm_mean"] == pytest.approx(float(last.norm()), rel=1e-4)
        assert r["diagnostics"]["injected_norm_mean"] == pytest.approx(0.01 * float(last.norm()), rel=1e-4)
        assert r["diagnostics"]["prompt_len"] == ids.shape[1]
    p = preds(full_run)
    # one translator: the seeds change only seeded conditions; additive is generated once and written per seed
    assert p["additive__seed42"] == p["additive__seed123"]
    rnd = {
        s: [r["diagnostics"]["receiver_norm_mean"] for r in full_run.results[f"same_norm_random__seed{s}"]]
        for s in (42, 123)
    }
    assert rnd[42] == rnd[123]  # prefill norms before injection do not depend on the seed


def test_same_norm_random_records_the_receivers_own_norm(full_run):
    # PAPER.md: the random vectors are rescaled per position to ||h||, so the injected state's mean norm is the
    # receiver's own (left unscaled, Gaussian vectors of 48 dims would have norms near 7).
    for seed in (42, 123):
        for r in full_run.results[f"same_norm_random__seed{seed}"]:
            d = r["diagnostics"]
            assert d["injected_norm_mean"] == pytest.approx(d["receiver_norm_mean"], rel=1e-5)


def test_shuffled_donors_and_strict_variant(full_run):
    lengths = {r["sample_id"]: r["diagnostics"]["prompt_len"] for r in full_run.results["no_inject__deterministic"]}
    for seed in (42, 123):
        full = full_run.results[f"shuffled_translation__seed{seed}"]
        strict = full_run.results[f"shuffled_translation_strict_matched__seed{seed}"]
        assert all(lengths[r["diagnostics"]["donor_id"]] == lengths[r["sample_id"]] for r in full)
        fallback = [r["sample_id"] for r in full if r["diagnostics"]["donor_id"] == r["sample_id"]]
        assert all(r["diagnostics"]["donor_id"] != r["sample_id"] for r in strict)
        assert len(strict) == N - len(fallback)
        meta = json.loads((full_run.run_dir / "meta.json").read_text())
        assert meta["diagnostics"]["shuffle_self_fallback_count"][str(seed)] == len(fallback)


def test_batch_size_does_not_change_answers(tmp_path, ckpt, full_run):
    one = run_eval(
        tmp_path,
        ckpt,
        batch_size=3,
        conditions=["no_inject", "additive", "same_norm_random", "shuffled_translation"],
        seeds=[42],
    )
    p_full, p_one = preds(full_run), preds(one)
    for key in p_one:
        assert p_one[key] == p_full[key], key


def test_rerun_computes_only_missing_parts(tmp_path, ckpt, monkeypatch):
    conds = ["no_inject", "zero_replacement", "same_norm_random"]
    first = run_eval(tmp_path, ckpt, conditions=conds, seeds=[42])
    run_dir = first.run_dir
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "records").glob("*.jsonl")}
    target = rio.records_path(run_dir, "same_norm_random", 42)
    old = target.read_text()
    # simulate a crash: the final file is gone, 3 samples had reached the partial shard
    target.unlink()
    done = [json.loads(line) for line in old.splitlines()[:3]]
    rio.append_partial(run_dir, "same_norm_random", 42, 0, done)
    rows = []
    real = answering.generate_ids
    monkeypatch.setattr(answering, "generate_ids", lambda *a, **k: rows.append(a[2].shape[0]) or real(*a, **k))
    second = run_eval(tmp_path, ckpt, conditions=conds, seeds=[42])
    assert second.run_dir == run_dir  # same command -> same folder
    assert sum(rows) == N - 3  # only the missing samples of the missing run were generated
    meta = json.loads((run_dir / "meta.json").read_text())
    assert [i["computed"] for i in meta["invocations"]] == [
        sorted(k[:-6] for k in before),
        ["same_norm_random__seed42"],
    ]
    assert sorted(meta["invocations"][1]["skipped_existing"]) == [
        "no_inject__deterministic",
        "zero_replacement__deterministic",
    ]
    assert target.read_text() == old
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "records").glob("*.jsonl")}
    assert all(after[k] == v for k, v in before.items() if k != target.name)


@pytest.mark.parametrize("stack_runs", [False, True])
def test_generation_time_goes_to_the_runs_that_generated(tmp_path, ckpt, monkeypatch, stack_runs):
    import lightning_modules.injection_eval as ie

    waited = []  # each resolve of a sub-batch waits 0.2 s more: that time belongs to the runs it generated

    def slow(*a, **k):
        waited.append(0.2)
        time.sleep(0.2)
        return real(*a, **k)

    real = ie.resolve
    monkeypatch.setattr(ie, "resolve", slow)
    module = run_eval(
        tmp_path, ckpt, batch_size=4, conditions=["no_inject", "additive"], seeds=[42], stack_runs=stack_runs
    )
    seconds = module.timing_by_run
    assert set(seconds) == {"no_inject__deterministic", "additive__seed42"}
    assert sum(seconds.values()) >= sum(waited)  # the runs' shares add up to the time spent generating
    # both runs generate the same rows, so each gets about half of it
    assert min(seconds.values()) >= sum(waited) / 3


# --------------------------------------------------------------------------------------------- bad input


def test_unknown_condition(ckpt):
    with pytest.raises(ValueError, match="unknown condition 'adittive'"):
        InjectionEvalModule(SENDER, RECEIVER, translator_ckpt=ckpt, conditions=["adittive"])


def test_translator_conditions_need_a_checkpoint():
    with pytest.raises(ValueError, match="need a translator: set --model.translator_ckpt"):
        InjectionEvalModule(SENDER, RECEIVER, conditions=["replace"])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval(tmp_path, str(tmp_path / "nope.ckpt"), conditions=["additive"], seeds=[42])


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a translator checkpoint"):
        run_eval(tmp_path, str(bad), conditions=["additive"], seeds=[42])


def test_checkpoint_for_other_layers_is_refused_unless_allowed(tmp_path):
    other = make_ckpt(tmp_path / "other.ckpt", receiver=ModelRef("tiny-neox-large", layer=1))
    with pytest.raises(ValueError, match="receiver layer.*allow_mismatch"):
        run_eval(tmp_path, other, conditions=["additive"], seeds=[42])
    module = run_eval(tmp_path, other, conditions=["additive"], seeds=[42], allow_mismatch=True)
    assert len(module.results["additive__seed42"]) == N


def test_checkpoint_for_other_models_has_wrong_dims(tmp_path):
    swapped = make_ckpt(tmp_path / "swapped.ckpt", sender=RECEIVER, receiver=SENDER)
    with pytest.raises(ValueError, match="hidden size"):
        run_eval(tmp_path, swapped, conditions=["additive"], seeds=[42])
    with pytest.raises(ValueError, match="maps 48 -> 32 dims, but the sender has 32"):
        run_eval(tmp_path, swapped, conditions=["additive"], seeds=[42], allow_mismatch=True)


class _CutSenderDifferently(pl.Callback):
    def on_test_start(self, trainer, pl_module):
        pl_module.sender.tokenizer.truncation_side = "left"


def test_prompt_truncated_differently_for_the_two_models(tmp_path, ckpt):
    with pytest.raises(ValueError, match=r"sample 'syn_.*tokenize the prompt differently.*identical token ids"):
        run_eval(
            tmp_path,
            ckpt,
            conditions=["replace"],
            seeds=[42],
            max_prompt_tokens=12,
            callbacks=[_CutSenderDifferently()],
        )


def test_generation_is_one_option_saved_as_a_plain_dict(tmp_path):
    settings = GenerationSettings(max_new_tokens=7, repetition_penalty=1.0)
    module = InjectionEvalModule(SENDER, RECEIVER, conditions=["no_inject"], generation=settings)
    assert module.generation == settings and module.generation is not settings
    assert module.hparams["generation"] == {
        **GenerationSettings().to_dict(),
        "max_new_tokens": 7,
        "repetition_penalty": 1.0,
    }
    torch.save(dict(module.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["generation"]["max_new_tokens"] == 7
    assert InjectionEvalModule(SENDER, RECEIVER, conditions=["no_inject"]).generation == GenerationSettings()
    assert InjectionEvalModule(**module.hparams).generation == settings  # hparams rebuild the module


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_same_norm_random_writes_the_papers_sequential_draw(tmp_path, ckpt, monkeypatch, batch_size):
    # The paper: one generator seeded by the run seed, randn((1, L_i, H)) sample after sample in dataset order.
    import activation_transfer.injection.protocols.paper as paper
    from activation_transfer.injection.conditions import sequential_random_vectors

    seen: dict[str, torch.Tensor] = {}
    original = paper.condition_source

    def capture(spec, seed, sample_ids, ids, mask, *args, **kwargs):
        source, rows = original(spec, seed, sample_ids, ids, mask, *args, **kwargs)
        for i, (sid, n) in enumerate(zip(sample_ids, mask.sum(1).tolist())):
            seen[sid] = source[i, source.shape[1] - int(n) :].clone()
        return source, rows

    monkeypatch.setattr(paper, "condition_source", capture)
    module = run_eval(tmp_path, ckpt, batch_size=batch_size, conditions=["same_norm_random"], seeds=[42])
    samples = list(module.samples_by_id.values())
    tok = module.receiver.tokenizer([s.prompt for s in samples], truncation=True, max_length=256)["input_ids"]
    expected = sequential_random_vectors(42, [(s.sample_id, len(t)) for s, t in zip(samples, tok)], 48)
    assert set(seen) == set(expected)
    for sid, rows in expected.items():
        assert torch.equal(seen[sid], rows), sid


def test_reordered_seeds_with_one_translator_each_are_another_run(tmp_path):
    # The folder kept seed 42's records (translator A) and, resumed with the seeds reordered, ran seed 123 with A too:
    # B was never evaluated and the report merged the two identical runs into one.
    a, b = make_ckpt(tmp_path / "a.ckpt", seed=1), make_ckpt(tmp_path / "b.ckpt", seed=2)
    conds = ["no_inject", "additive"]
    first = run_eval(tmp_path / "out", [str(a), str(b)], conditions=conds, seeds=[42, 123])
    again = run_eval(tmp_path / "out", [str(a), str(b)], conditions=conds, seeds=[42, 123])
    swapped = run_eval(tmp_path / "out", [str(a), str(b)], conditions=conds, seeds=[123, 42])
    assert again.run_dir == first.run_dir != swapped.run_dir
    sha = {
        (m, s): m.results[f"additive__seed{s}"][0]["diagnostics"]["translator_sha256"]
        for m in (first, swapped)
        for s in (42, 123)
    }
    assert sha[first, 42] == sha[swapped, 123] != sha[first, 123] == sha[swapped, 42]
    # One translator for every seed: the order of the seeds changes nothing, the folder is reused.
    one = run_eval(tmp_path / "one", a, conditions=conds, seeds=[42, 123])
    assert run_eval(tmp_path / "one", a, conditions=conds, seeds=[123, 42]).run_dir == one.run_dir
