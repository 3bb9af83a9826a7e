"""No pseudo-replication (issue item 1): one translator's seed-free answers written per seed count as one run.

With one translator checkpoint, ``additive``, ``replace``, ``scale_corrected`` and ``best_alpha`` give the same
answers for every seed; the evaluation writes them once per seed, and pooling those copies as three runs triples
n_pairs and narrows the CIs. Records name their translator, the report counts such runs once, and the demo trains one
translator per seed as the paper did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_injection_eval import make_ckpt  # the tiny translator checkpoint of the evaluation tests

from activation_transfer.report import run_report
from activation_transfer.translators.loading import load_translator
from cli import demo

WB = "word_boundary_contains"
N = 40


def _run(condition: str, seed: int | None, correct, sha: str | None = None, seeded: bool = False) -> list[dict]:
    recs = []
    for i, ok in enumerate(correct):
        rec = {
            "sample_id": f"s{i:03d}",
            "condition": condition,
            "seed": seed,
            "gold": "Paris",
            "prediction": "Paris." if ok else "Rome.",
        }
        if sha is not None:
            rec["diagnostics"] = {"prompt_len": 9, "translator_sha256": sha, "seeded": seeded}
        recs.append(rec)
    return recs


def _data():
    rng = np.random.default_rng(1)
    base = (rng.random(N) < 0.5).tolist()
    cond = [b if rng.random() < 0.7 else not b for b in base]
    return base, cond


def _row(res, condition: str = "additive") -> dict:
    return next(c for c in res.comparisons if c["condition"] == condition and c["metric"] == WB)


def test_one_translator_written_for_three_seeds_is_one_run(tmp_path: Path) -> None:
    base, cond = _data()
    recs = _run("no_inject", None, base)
    for seed in (42, 123, 456):
        recs += _run("additive", seed, cond, sha="a" * 64)
    res = run_report(recs, tmp_path / "out", resamples=500)
    add = res.summary["conditions"]["additive"]
    assert (add["runs"], add["n"]) == (1, N)
    assert add["collapsed_runs"] == {"42": ["42", "123", "456"]}
    assert add[WB]["sd"] is None and list(add[WB]["per_run"]) == ["42"]
    c = _row(res)
    assert (c["runs"], c["pooled_n_pairs"]) == (1, N)
    assert c["collapsed_runs"] == {"additive": {"42": ["42", "123", "456"]}}
    # Exactly the statistics of the single computation.
    one = _row(run_report(_run("no_inject", None, base) + _run("additive", 42, cond), tmp_path / "one", resamples=500))
    for key in ("delta", "ci_low", "ci_high", "permutation_p", "pooled_mcnemar_p", "gained", "lost"):
        assert c[key] == one[key], key
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["meta"]["collapsed_runs"] == {"additive": {"42": ["42", "123", "456"]}}
    assert any("additive: runs 42, 123, 456 are one computation" in n for n in res.notes)
    for md in ("summary.md", "comparisons.md"):
        assert "additive: seeds 42, 123, 456 are one translator's answers" in (tmp_path / "out" / md).read_text()
    assert "| additive | 1 | 40 |" in (tmp_path / "out" / "comparisons.md").read_text()


def test_distinct_translators_seeded_conditions_and_unnamed_records_stay_separate_runs(tmp_path: Path) -> None:
    base, cond = _data()
    recs = _run("no_inject", None, base)
    for seed, sha in zip((42, 123, 456), "abc"):
        recs += _run("additive", seed, cond, sha=sha * 64)  # one translator per seed, as in the paper
        recs += _run("shuffled_translation", seed, cond, sha="a" * 64, seeded=True)  # the seed draws the donors
        recs += _run("replace", seed, cond)  # no translator identity: old files, the paper's locked outputs
    # Same translator, seed-free, but other answers: another setting differed, so not one computation.
    recs += _run("best_alpha", 42, cond, sha="a" * 64) + _run("best_alpha", 123, base, sha="a" * 64)
    res = run_report(recs, tmp_path / "out", resamples=200)
    for name, runs in (("additive", 3), ("shuffled_translation", 3), ("replace", 3), ("best_alpha", 2)):
        assert res.summary["conditions"][name]["runs"] == runs, name
        c = _row(res, name)
        assert (c["runs"], c["pooled_n_pairs"], c["collapsed_runs"]) == (runs, runs * N, {}), name
    assert res.summary["meta"]["collapsed_runs"] == {}
    assert "one computation" not in (tmp_path / "out" / "summary.md").read_text()
    # Identical runs whose records name no translator stay separate, but the reader is warned.
    warnings = [n for n in res.notes if n.startswith("WARNING")]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING replace: runs 42, 123, 456 give identical answers")
    assert res.summary["meta"]["unnamed_identical_runs"] == {"replace": [["42", "123", "456"]]}
    for md in ("summary.md", "comparisons.md"):
        assert "**Warning**: replace: seeds 42, 123, 456 give identical answers" in (tmp_path / "out" / md).read_text()
    # Records that say their seed matters (same_norm_random from this evaluation) are not suspects.
    seeded = _run("no_inject", None, base)
    for seed in (42, 123):
        seeded += [{**r, "diagnostics": {"seeded": True}} for r in _run("same_norm_random", seed, cond)]
    assert run_report(seeded, tmp_path / "seeded", resamples=50).summary["meta"]["unnamed_identical_runs"] == {}


def test_the_papers_locked_outputs_are_three_runs_without_warnings(paper_results_dir: Path, tmp_path: Path) -> None:
    res = run_report([paper_results_dir], tmp_path / "out", resamples=200)
    assert res.summary["conditions"]["additive"]["runs"] == 3 and res.summary["meta"]["collapsed_runs"] == {}
    assert not [n for n in res.notes if "WARNING" in n or "one computation" in n]
    assert res.summary["meta"]["unnamed_identical_runs"] == {}


def test_a_repeated_translator_among_several_collapses_only_its_runs(tmp_path: Path) -> None:
    base, cond = _data()
    recs = _run("no_inject", None, base)
    for seed, sha in zip((42, 123, 456), "aab"):
        recs += _run("scale_corrected", seed, cond, sha=sha * 64)
    res = run_report(recs, tmp_path / "out", resamples=200)
    assert res.summary["conditions"]["scale_corrected"]["collapsed_runs"] == {"42": ["42", "123"]}
    assert (_row(res, "scale_corrected")["runs"], _row(res, "scale_corrected")["pooled_n_pairs"]) == (2, 2 * N)


def test_eval_records_name_their_translator_and_its_report_counts_one_translator_once(tmp_path, monkeypatch) -> None:
    import wandb

    from cli.lightning_cli import eval_main

    monkeypatch.setattr(sys, "argv", ["evaluate.py"])  # LightningCLI warns about pytest's own arguments

    ckpts = [make_ckpt(tmp_path / f"t{s}.ckpt", seed=s) for s in (0, 1)]
    conds = ["no_inject", "additive", "shuffled_translation"]

    def evaluate(ckpt_arg: str, name: str):
        args = [
            "test",
            "-c",
            str(Path(__file__).resolve().parents[2] / "configs/eval/tiny.yaml"),
            "--model.translator_ckpt",
            ckpt_arg,
            "--model.seeds",
            "[42, 123]",
            "--model.conditions",
            json.dumps(conds),
            "--model.run_name",
            name,
            "--trainer.default_root_dir",
            str(tmp_path / "out"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "wandb"),
            "--data.num_samples",
            "6",
            "--data.batch_size",
            "6",
            "--model.generation.max_new_tokens",
            "3",
            "--model.report_resamples",
            "50",
        ]
        module = eval_main(args).model
        wandb.finish()  # the config's WandbLogger (disabled mode) leaves its run open
        return module

    shared = evaluate(ckpts[0], "shared")
    sha0 = load_translator(ckpts[0]).sha256  # the weights digest (issue 20 item 9)
    for seed in (42, 123):
        assert all(r["diagnostics"]["translator_sha256"] == sha0 for r in shared.results[f"additive__seed{seed}"])
        assert all(r["diagnostics"]["seeded"] is False for r in shared.results[f"additive__seed{seed}"])
        assert all(r["diagnostics"]["seeded"] is True for r in shared.results[f"shuffled_translation__seed{seed}"])
    assert "translator_sha256" not in shared.results["no_inject__deterministic"][0]["diagnostics"]
    assert shared.report_result.summary["meta"]["unnamed_identical_runs"] == {}
    by = {c["condition"]: c for c in shared.report_result.comparisons if c["metric"] == WB}
    assert (by["additive"]["runs"], by["additive"]["pooled_n_pairs"]) == (1, 6)
    assert (by["shuffled_translation"]["runs"], by["shuffled_translation"]["pooled_n_pairs"]) == (2, 12)

    # One checkpoint per seed (the README's list syntax): seed i uses checkpoint i, two runs.
    per_seed = evaluate(json.dumps(ckpts), "per_seed")
    for seed, ckpt in zip((42, 123), ckpts):
        assert {r["diagnostics"]["translator_sha256"] for r in per_seed.results[f"additive__seed{seed}"]} == {
            load_translator(ckpt).sha256
        }
    add = next(c for c in per_seed.report_result.comparisons if c["condition"] == "additive" and c["metric"] == WB)
    assert (add["runs"], add["pooled_n_pairs"]) == (2, 12)


def test_demo_trains_one_translator_per_seed_and_evaluates_with_the_list(tmp_path: Path, fake_demo) -> None:
    fake_demo.evaluate = lambda args: SimpleNamespace(
        model=SimpleNamespace(report_result=None, run_dir=tmp_path / "demo" / "eval" / "x")
    )
    trained, evaluated = fake_demo.trained, fake_demo.evaluated
    assert demo.main(["--out", str(tmp_path / "demo"), "--skip-split"]) == 0

    def opt(args, name):
        return args[args.index(name) + 1]

    assert [(opt(a, "--seed_everything"), opt(a, "--data.seed")) for a in trained] == [
        ("42", "42"),
        ("123", "123"),
        ("456", "456"),
    ]
    roots = [Path(opt(a, "--trainer.default_root_dir")) for a in trained]
    assert len(set(roots)) == 3 and all(r.parent == tmp_path / "demo" / "translator" for r in roots)
    (ev,) = evaluated
    assert json.loads(opt(ev, "--model.seeds")) == [42, 123, 456]
    ckpts = [Path(p) for p in json.loads(opt(ev, "--model.translator_ckpt"))]
    # checkpoint i belongs to seed i
    assert [opt(p.read_text().split(), "--seed_everything") for p in ckpts] == ["42", "123", "456"]
    # A second demo run reuses the three checkpoints.
    assert demo.main(["--out", str(tmp_path / "demo"), "--skip-split"]) == 0
    assert len(trained) == 3 and evaluated[1] == ev
    # A fresh clone (another output folder, the same cache): the translators come from the cache, none is trained.
    assert demo.main(["--out", str(tmp_path / "clone"), "--skip-split"]) == 0
    clone_ckpts = [Path(p) for p in json.loads(opt(evaluated[2], "--model.translator_ckpt"))]
    assert len(trained) == 3 and all(p.is_relative_to(tmp_path / "clone") for p in clone_ckpts)
    assert [p.read_text() for p in clone_ckpts] == [p.read_text() for p in ckpts]
    # New organism weights in the same folders: the translators are retrained, not reused.
    (fake_demo.organisms["receiver"] / "model.safetensors").write_text("retrained")
    assert demo.main(["--out", str(tmp_path / "demo"), "--skip-split"]) == 0
    assert len(trained) == 6


@pytest.mark.parametrize("bad", [{"translator_sha256": 5}, {"translator_sha256": "ab", "seeded": "no"}])
def test_malformed_translator_identity_names_the_record(tmp_path: Path, bad: dict) -> None:
    recs = _run("no_inject", None, [True, False]) + _run("additive", 42, [True, True])
    recs[3]["diagnostics"] = bad
    with pytest.raises(ValueError, match=r"<records>\[3\]: 'diagnostics\.(translator_sha256|seeded)' must be"):
        run_report(recs, tmp_path / "out", resamples=20)
