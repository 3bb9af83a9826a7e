"""The split-context protocol (``--model.protocol split``) through ``trainer.test`` on tiny offline models."""

from __future__ import annotations

import json

import pytest
import torch
from test_injection_eval import RECEIVER, SENDER, N, make_ckpt, preds, run_eval
from test_translator_loading import make_functional_ckpt

import activation_transfer.injection.answering as answering
import activation_transfer.injection.protocols.split as split_protocol
import activation_transfer.models.generation as generation
from activation_transfer.injection.prefill_hook import PrefillInjection, prefill_injection
from activation_transfer.injection.protocols.split import CONDITION_NAMES as SPLIT_CONDITION_NAMES
from activation_transfer.injection.slots import SlotSpec, encode_parts, receiver_batch, slot_grid
from activation_transfer.injection.sources import capture_block
from activation_transfer.models.frozen_lm import load_ref
from activation_transfer.models.generation import GenerationSettings, decode, generate_ids
from activation_transfer.report import records as rio
from lightning_modules.injection_eval import InjectionEvalModule

SEEDS = [42, 123]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    # Two different linear maps: an aligned translator and an (untrained) functional one.
    return make_ckpt(folder / "aligned.ckpt", seed=0), make_functional_ckpt(folder / "functional.ckpt", seed=1)


class _Spy(PrefillInjection):
    """A prefill injection that keeps what its block produced and what it returned (first call only)."""

    seen: list = []

    def __call__(self, h):
        out = super().__call__(h)
        if self.calls == 1:
            self.record = (self.mode, self.mask.clone(), h.detach().clone(), None if out is None else out.clone())
            _Spy.seen.append(self.record)
        return out


class _PenaltySpy(generation.MaskedRepetitionPenalty):
    """The repetition penalty, keeping the prompt ids it counts (first call of each ``generate``)."""

    counted: list = []

    def __call__(self, input_ids, scores):
        if not getattr(self, "_seen", False):
            self._seen = True
            width = self.prompt_mask.shape[1]
            _PenaltySpy.counted.append(input_ids[:, :width][self.prompt_mask.to(input_ids.device)].cpu())
        return super().__call__(input_ids, scores)


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, ckpts):
    """Every split condition, slot scheme ``all``; the calls to ``request_injected`` and the prefill hooks kept."""
    calls: list[dict] = []
    real = answering.request_injected

    def spy_answer(ids, mask, spec, sample_ids, source, rows=None, donors=None, write_mask=None):
        calls.append(
            {
                "condition": spec.name,
                "ids": ids.clone(),
                "mask": mask.clone(),
                "sample_ids": list(sample_ids),
                "source": None if source is None else source.clone(),
                "write_mask": None if write_mask is None else write_mask.clone(),
            }
        )
        run = real(ids, mask, spec, sample_ids, source, rows, donors, write_mask)
        calls[-1]["injection"] = run.injection  # its prefill hook (it fires when the module generates)
        return run

    _Spy.seen = []
    _PenaltySpy.counted = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(split_protocol, "request_injected", spy_answer)
        mp.setattr(answering, "PrefillInjection", _Spy)
        mp.setattr(generation, "MaskedRepetitionPenalty", _PenaltySpy)
        module = run_eval(
            tmp_path_factory.mktemp("split"),
            ckpts[0],
            conditions=SPLIT_CONDITION_NAMES,
            seeds=SEEDS,
            protocol="split",
            functional_translator_ckpt=ckpts[1],
        )
    return module, calls, list(_Spy.seen)


def _by_sample(calls, condition):
    """sample id -> (ids row, mask row, source row or None, write mask row or None) of one condition's calls."""
    out = {}
    for c in (c for c in calls if c["condition"] == condition):
        for i, sid in enumerate(c["sample_ids"]):
            src, wm = c["source"], c["write_mask"]
            out[sid] = (c["ids"][i], c["mask"][i], None if src is None else src[i], None if wm is None else wm[i])
    return out


def test_the_repetition_penalty_counts_no_slot(split_run):
    # Slot tokens are EOS ids (like the padding); the penalty used to count them, so every slot condition decoded
    # with its EOS logit penalized and its baselines without: longer answers, which contains-scoring favours.
    module, calls, _ = split_run
    eos = module.protocol.receiver.tokenizer.eos_token_id
    assert _PenaltySpy.counted and sum(c.numel() for c in _PenaltySpy.counted) > 0
    assert all(not bool((c == eos).any()) for c in _PenaltySpy.counted)
    assert any(c["write_mask"] is not None and bool(c["write_mask"].any()) for c in calls)  # slots were written


def test_every_split_condition_is_written_with_the_fixed_schema(split_run):
    module, _, _ = split_run
    deterministic = {"receiver_alone", "skyline", "nl_relay", "slots_self", "slots_zero"}
    expected = {f"{c}__deterministic" for c in deterministic} | {
        f"{c}__seed{s}" for c in SPLIT_CONDITION_NAMES if c not in deterministic for s in SEEDS
    }
    assert {p.stem for p in (module.run_dir / "records").glob("*.jsonl")} == expected
    for key in expected:
        recs = rio.read_records(module.run_dir / "records" / f"{key}.jsonl")
        assert len(recs) == N and all(list(r) == list(rio.RECORD_FIELDS) for r in recs)
    # The functional conditions read the second checkpoint: the report must not pool them with the aligned ones.
    sha = {
        c: module.results[f"{c}__seed42"][0]["diagnostics"]["translator_sha256"]
        for c in ("slots_translated", "slots_functional", "slots_random", "slots_random_functional")
    }
    assert sha["slots_translated"] == sha["slots_random"] != sha["slots_functional"] == sha["slots_random_functional"]
    assert sha["slots_functional"] == module.functional_info[0]["sha256"]
    meta = json.loads((module.run_dir / "meta.json").read_text())
    assert meta["protocol"] == "split" and meta["slots"] == SlotSpec().to_dict()
    assert module.run_identity["protocol"] == "split" and len(module.run_identity["functional_translators"]) == 1


def test_split_report_compares_with_receiver_alone_and_skyline(split_run):
    module, _, _ = split_run
    baselines = {c["baseline"] for c in module.report_result.comparisons}
    assert baselines == {"receiver_alone", "skyline"}
    assert {c["condition"] for c in module.report_result.comparisons} >= {"slots_self", "slots_functional", "nl_relay"}


def test_slots_self_writes_the_receivers_own_context_states(split_run):
    # A separate computation, one sample at a time (no padding): the receiver's block output over the context part
    # alone, written with a PrefillInjection on the slot mask before [slot] * K + question part, then decoded.
    module, calls, _ = split_run
    receiver = load_ref(RECEIVER)
    settings = GenerationSettings(max_new_tokens=4, relay_max_new_tokens=6)
    written = _by_sample(calls, "slots_self")
    got = preds(module)["slots_self__deterministic"]
    eos = receiver.tokenizer.eos_token_id
    for sid, sample in module.samples_by_id.items():
        (ctx,), (qst,) = encode_parts(receiver.tokenizer, [sample.context], [sample.question], 224, 256)
        ones = torch.ones((1, len(ctx)), dtype=torch.long)
        states = capture_block(receiver.model, receiver.layer.path, torch.tensor([ctx]), ones)[0]
        batch = receiver_batch([qst], [len(ctx)], eos, eos)
        ids, mask, slot_mask = written[sid][0], written[sid][1], written[sid][3]
        real = mask.bool()
        assert ids[real].tolist() == batch["input_ids"][0].tolist() and int(slot_mask.sum()) == len(ctx)
        assert torch.allclose(written[sid][2][slot_mask.bool()], states, atol=1e-5), sid
        inj = PrefillInjection(batch["slot_mask"], mode="replace", source=slot_grid([states], batch["slot_mask"]))
        with prefill_injection(receiver.model, receiver.layer.path, inj):
            new = generate_ids(
                receiver.model, receiver.tokenizer, batch["input_ids"], batch["attention_mask"], settings
            )
        assert decode(receiver.tokenizer, new)[0].strip() == got[sid], sid


def test_receiver_alone_reads_the_question_part_and_skyline_the_papers_prompt(split_run, ckpts, tmp_path):
    module, calls, _ = split_run
    tok = module.receiver.tokenizer
    alone = _by_sample(calls, "receiver_alone")
    for sid, sample in module.samples_by_id.items():
        ids, mask, source, write_mask = alone[sid]
        _, (qst,) = encode_parts(tok, [sample.context], [sample.question], 224, 256)
        assert ids[mask.bool()].tolist() == qst and source is None and write_mask is None  # no slot, nothing written
    skyline = _by_sample(calls, "skyline")
    for sid, sample in module.samples_by_id.items():
        ids, mask, _, _ = skyline[sid]
        assert ids[mask.bool()].tolist() == tok(sample.prompt)["input_ids"]
    paper = run_eval(tmp_path, ckpts[0], conditions=["no_inject"], seeds=SEEDS)
    assert "protocol" not in paper.run_identity and "slots" not in paper.run_identity  # paper folders keep their hash
    p_split, p_paper = preds(module), preds(paper)
    assert p_split["skyline__deterministic"] == p_paper["no_inject__deterministic"]
    lens = {r["sample_id"]: r["diagnostics"]["prompt_len"] for r in module.results["receiver_alone__deterministic"]}
    sky = {r["sample_id"]: r["diagnostics"]["prompt_len"] for r in module.results["skyline__deterministic"]}
    assert all(lens[s] < sky[s] for s in lens)  # the question part alone is shorter than the full prompt


def test_slots_zero_writes_zeros_exactly_at_the_slots(split_run):
    module, calls, seen = split_run
    zero = [c for c in calls if c["condition"] == "slots_zero"]
    assert zero
    for call in zero:
        mode, write_mask, h, new = call["injection"].record  # the prefill hook of this very call
        assert mode == "replace" and torch.equal(write_mask, call["write_mask"])
        slot = write_mask.bool()
        assert new[slot].eq(0).all() and torch.equal(new[~slot], h[~slot])  # every other position bit-identical
        assert not h[slot].eq(0).all()  # the receiver's own slot states were not zero before
        slot_counts = {
            r["sample_id"]: r["diagnostics"]["slot_count"] for r in module.results["slots_zero__deterministic"]
        }
        assert slot.sum(1).tolist() == [slot_counts[s] for s in call["sample_ids"]]
        assert all(slot_counts[s] == module.protocol.slot_counts[s] > 0 for s in call["sample_ids"])


def test_slot_diagnostics_follow_their_definitions(split_run):
    module, _, _ = split_run
    r = {k: {x["sample_id"]: x["diagnostics"] for x in v} for k, v in module.results.items()}
    for seed in SEEDS:
        for sfx in ("", "_functional"):
            trans = r[f"slots_{'translated' if not sfx else 'functional'}__seed{seed}"]
            for sid, d in r[f"slots_random{sfx}__seed{seed}"].items():
                # Random vectors are rescaled per slot to the translated slot norms they replace.
                assert d["injected_norm_mean"] == pytest.approx(trans[sid]["translated_norm_mean"], rel=1e-4)
            for d in r[f"slots_shuffled{sfx}__seed{seed}"].values():
                donor = d["donor_id"]
                assert d["slot_count"] == trans[donor]["slot_count"]  # donor from the same slot-count bucket
                assert d["injected_norm_mean"] == pytest.approx(trans[donor]["injected_norm_mean"], rel=1e-5)
    rows = module.protocol.random_rows  # the seed draws other vectors
    assert all(
        not torch.equal(rows[(42, ("aligned", 0))][s], rows[(123, ("aligned", 0))][s]) for s in module.protocol.ids
    )


def test_pooled_slots_shuffle_within_one_bucket(tmp_path, ckpts):
    # Pooled slots: every sample has k slots, so all share one bucket and every donor is another sample.
    conds = ["receiver_alone", "slots_translated", "slots_shuffled"]
    module = run_eval(
        tmp_path, ckpts[0], conditions=conds, seeds=[42], protocol="split", slots={"scheme": "pooled", "k": 2}
    )
    recs = module.results["slots_shuffled__seed42"]
    assert all(r["diagnostics"]["slot_count"] == 2 for r in recs)
    donors = {r["sample_id"]: r["diagnostics"]["donor_id"] for r in recs}
    assert all(d != s for s, d in donors.items()) and sorted(donors.values()) == sorted(donors)  # a derangement
    assert module.hparams["slots"] == {**SlotSpec().to_dict(), "scheme": "pooled", "k": 2}


def test_split_run_resumes_like_a_paper_run(tmp_path, ckpts, monkeypatch):
    conds = ["receiver_alone", "slots_zero", "slots_random"]
    first = run_eval(tmp_path, ckpts[0], conditions=conds, seeds=[42], protocol="split")
    run_dir = first.run_dir
    target = rio.records_path(run_dir, "slots_random", 42)
    old = target.read_text()
    target.unlink()  # a crash after 3 samples reached the partial shard
    rio.append_partial(run_dir, "slots_random", 42, 0, [json.loads(line) for line in old.splitlines()[:3]])
    rows = []
    real = answering.generate_ids
    monkeypatch.setattr(answering, "generate_ids", lambda *a, **k: rows.append(a[2].shape[0]) or real(*a, **k))
    second = run_eval(tmp_path, ckpts[0], conditions=conds, seeds=[42], protocol="split")
    assert second.run_dir == run_dir and sum(rows) == N - 3
    assert target.read_text() == old  # the sequential draw does not depend on which samples are left
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["invocations"][1]["computed"] == ["slots_random__seed42"]
    # Another slot scheme is another configuration: refused in the same folder.
    with pytest.raises(ValueError, match="another configuration.*slots"):
        run_eval(
            tmp_path,
            ckpts[0],
            conditions=conds,
            seeds=[42],
            protocol="split",
            run_name=run_dir.name,
            slots={"scheme": "last", "k": 2},
        )


def test_split_options_are_checked(ckpts):
    both = InjectionEvalModule(
        SENDER, RECEIVER, translator_ckpt=ckpts[0], functional_translator_ckpt=ckpts[1], protocol="split"
    )
    assert tuple(s.name for s in both.specs) == SPLIT_CONDITION_NAMES  # the default list means every split condition
    with pytest.raises(ValueError, match="unknown condition 'no_inject'.*split protocol"):
        InjectionEvalModule(SENDER, RECEIVER, conditions=["no_inject"], protocol="split")
    with pytest.raises(
        ValueError, match="slots_functional.* need a translator: set --model.functional_translator_ckpt"
    ):
        InjectionEvalModule(SENDER, RECEIVER, translator_ckpt=ckpts[0], protocol="split")
    with pytest.raises(ValueError, match="model.protocol must be one of paper, split"):
        InjectionEvalModule(SENDER, RECEIVER, protocol="splitt")
    with pytest.raises(ValueError, match="functional_translator_ckpt lists 2 checkpoints for 3 seeds"):
        InjectionEvalModule(SENDER, RECEIVER, conditions=["replace_functional"], functional_translator_ckpt=list(ckpts))


def test_paper_functional_variants_read_the_functional_translator(tmp_path, ckpts):
    same = make_functional_ckpt(tmp_path / "same.ckpt", like=ckpts[0])  # the aligned weights as a functional one
    module = run_eval(
        tmp_path,
        ckpts[0],
        conditions=["replace", "replace_functional", "scale_corrected_functional"],
        seeds=[42],
        functional_translator_ckpt=same,
    )
    p = preds(module)
    assert p["replace__seed42"] == p["replace_functional__seed42"]  # the same weights under both options
    other = run_eval(
        tmp_path, ckpts[0], conditions=["replace_functional"], seeds=[42], functional_translator_ckpt=ckpts[1]
    )
    sha = other.results["replace_functional__seed42"][0]["diagnostics"]["translator_sha256"]
    assert sha == other.functional_info[0]["sha256"] != module.translator_info[0]["sha256"]


def test_evaluate_cli_runs_the_split_protocol(tmp_path, monkeypatch, capsys):
    import sys

    import wandb
    from test_evaluate_cli import small

    from cli.lightning_cli import eval_main

    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    ckpt = make_ckpt(tmp_path / "translator.ckpt")
    functional = make_functional_ckpt(tmp_path / "functional.ckpt", slots={"scheme": "last", "k": 2})
    args = small(
        tmp_path,
        ckpt,
        "--model.protocol",
        "split",
        "--model.seeds",
        "[42]",
        "--model.conditions",
        "[receiver_alone, skyline, slots_translated, slots_functional]",
        "--model.slots.scheme",
        "last",
        "--model.slots.k",
        "2",
        "--model.functional_translator_ckpt",
        functional,
    )
    try:
        cli = eval_main(args)
    finally:
        if wandb.run is not None:
            wandb.finish()
    assert cli.model.slots == SlotSpec("last", k=2) and cli.model.protocol.name == "split"
    recs = cli.model.results["slots_functional__seed42"]
    assert len(recs) == 6 and all(r["diagnostics"]["slot_count"] == 2 for r in recs)
    assert "skyline" in capsys.readouterr().out


def test_records_and_report_say_what_crossed_per_question(split_run):
    module, _, _ = split_run
    hidden = module.protocol.receiver.identity()["hidden_size"]
    sent: dict[str, list[int]] = {}
    for key, records in module.results.items():
        cond = key.split("__")[0]
        for r in records:
            d = r["diagnostics"]
            if cond in ("receiver_alone", "skyline"):  # nothing crosses
                assert d["bytes_sent"] == 0
            elif cond == "nl_relay":  # the relay's text
                assert d["bytes_sent"] == len(d["relay"].encode("utf-8")) > 0
            else:  # the slot vectors, fp32
                assert d["bytes_sent"] == d["slot_count"] * hidden * 4 > 0
            sent.setdefault(cond, []).append(d["bytes_sent"])
    summary = module.report_result.summary["conditions"]
    assert {c: e["bytes_per_question"] for c, e in summary.items()} == pytest.approx(
        {c: sum(v) / len(v) for c, v in sent.items()}
    )
    assert "| Condition | Runs | n | Bytes/question |" in module.report_result.markdown
